"""Per-sample seeded noise: the noise of sample k depends only on (seed, k), never on the batch.

Each sample owns a CPU ``torch.Generator`` seeded from (seed, k) through numpy's SeedSequence, which
mixes every bit of the seed (any non-negative integer, however large); the initial latents are its
first draw and every stochastic step draws from the same stream in order.
Noise is drawn on the CPU in the run's dtype and moved to the device, so results do not depend on
the device's RNG either.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from framework.core.errors import ConfigError
from framework.core.settings import check_seed

#: Sample indices fit one 32-bit word, so (seed, index) → SeedSequence entropy is one-to-one.
MAX_INDEX = 2**32 - 1


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of a run seeded ``seed``.

    SeedSequence takes the seed's 32-bit words, least significant first, then the index's: seeds
    below 2**48 give the words they gave when seeds were cut to 48 bits (their noise is unchanged),
    and larger seeds, which were cut before, now give noise of their own."""
    check_seed(int(seed))
    if not 0 <= int(index) <= MAX_INDEX:
        raise ConfigError(f"sample index {index} is outside 0..{MAX_INDEX}: use fewer samples")
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SampleNoise:
    """Unit Gaussian noise for a batch of samples, one generator per sample.

    With ``brownian_until`` set, :meth:`between` returns normalised increments of one Brownian
    motion per sample over σ ∈ [0, brownian_until] (torchsde's BrownianTree seeded from (seed, k)):
    the noise an SDE step sees over [σ_a, σ_b] is then the same path whatever the step count, so
    SDE solutions converge as steps grow (Kidger et al. 2021; k-diffusion's BrownianTreeNoiseSampler).
    """

    def __init__(
        self,
        seed: int,
        indices: Sequence[int],
        shape: Sequence[int],
        device: torch.device,
        dtype: torch.dtype,
        brownian_until: float | None = None,
    ):
        self.shape = tuple(shape)
        self.device, self.dtype = device, dtype
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, k)) for k in indices]
        self._tree_seeds = [sample_seed(seed + 1, k) for k in indices] if brownian_until else []
        self._until = brownian_until
        self._trees: list = []

    def draw(self) -> torch.Tensor:
        """One draw per sample, stacked to a batch ``[B, *shape]`` on the run's device."""
        rows = [torch.randn(self.shape, generator=g, dtype=self.dtype) for g in self.generators]
        return torch.stack(rows).to(self.device, non_blocking=True)

    def between(self, sigma_a: float, sigma_b: float) -> torch.Tensor:
        """Unit noise for an SDE step over [σ_b, σ_a]: a Brownian increment / √|σ_a − σ_b| in
        Brownian mode, a fresh draw otherwise."""
        if self._until is None or sigma_a == sigma_b:
            return self.draw()
        if not self._trees:
            import torchsde

            zero = torch.zeros(self.shape, dtype=torch.float64)
            self._trees = [torchsde.BrownianTree(t0=0.0, w0=zero, t1=self._until, entropy=e, tol=1e-6)
                           for e in self._tree_seeds]
        lo, hi = sorted((float(sigma_a), float(sigma_b)))
        if hi > self._until:
            raise ValueError(f"σ={hi} is above the Brownian tree's range [0, {self._until}]")
        rows = [tree(lo, hi) for tree in self._trees]
        return (torch.stack(rows) / (hi - lo) ** 0.5).to(self.device, self.dtype)
