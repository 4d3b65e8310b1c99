"""Per-sample seeded noise: the noise of sample k depends only on (seed, k), never on the batch.

Each sample owns a CPU ``torch.Generator`` seeded from (seed, k) through numpy's SeedSequence; the
initial latents are its first draw and every stochastic step draws from the same stream in order.
Noise is drawn on the CPU in the run's dtype and moved to the device, so results do not depend on
the device's RNG either.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of a run seeded ``seed``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SampleNoise:
    """Unit Gaussian noise for a batch of samples, one generator per sample."""

    def __init__(
        self,
        seed: int,
        indices: Sequence[int],
        shape: Sequence[int],
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.shape = tuple(shape)
        self.device, self.dtype = device, dtype
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, k)) for k in indices]

    def draw(self) -> torch.Tensor:
        """One draw per sample, stacked to a batch ``[B, *shape]`` on the run's device."""
        rows = [torch.randn(self.shape, generator=g, dtype=self.dtype) for g in self.generators]
        return torch.stack(rows).to(self.device, non_blocking=True)
