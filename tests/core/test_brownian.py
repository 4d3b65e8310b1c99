"""Brownian-tree noise (noise=brownian): batch-invariant, deterministic, and SDE solutions converge
as steps grow (the same Brownian path at every step count)."""
from __future__ import annotations

import pytest
import torch

from framework.entry.api import run

BASE = ["model=gaussian", "model.shape=[4]", "dtype=float64", "num_samples=4", "noise=brownian"]


@pytest.mark.parametrize("solver", ["dpmpp_2m_sde", "dpmpp_sde", "euler_ancestral"])
def test_brownian_deterministic_and_batch_invariant(solver):
    a = run(BASE + [f"solver={solver}", "steps=6", "batch_size=4"])
    b = run(BASE + [f"solver={solver}", "steps=6", "batch_size=1"])
    assert torch.equal(a.latents, run(BASE + [f"solver={solver}", "steps=6", "batch_size=4"]).latents)
    assert (a.latents - b.latents).abs().max().item() < 1e-12
    c = run(BASE[:-1] + [f"solver={solver}", "steps=6", "batch_size=4"])  # independent noise differs
    assert not torch.allclose(a.latents, c.latents)


def test_brownian_sde_converges_as_steps_grow():
    """Same path, finer steps: successive differences shrink (they do not with independent noise)."""
    def final(n, noise):
        return run(["model=gaussian", "model.shape=[4]", "dtype=float64", "num_samples=8", "batch_size=8",
                    "solver=dpmpp_2m_sde", f"steps={n}", f"noise={noise}"]).latents

    diffs = [(final(n, "brownian") - final(2 * n, "brownian")).abs().max().item() for n in (8, 16, 32)]
    assert diffs[2] < diffs[1] < diffs[0]
    assert diffs[2] < 0.5 * diffs[0]
    indep = (final(32, "independent") - final(64, "independent")).abs().max().item()
    assert diffs[2] < indep
