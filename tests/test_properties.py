"""Property-based: every random valid composition (model × solver × schedule × momentum list ×
guidance list, over every YAML in conf/) either runs to finite outputs with honest NFE accounting,
or is rejected at config time with a one-line ConfigError before any model evaluation."""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.entry.api import run
from framework.core.errors import ConfigError
from framework.models.analytic import Gaussian, Mixture
from framework.core.registry import CONF_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


class Counting:
    """A denoiser-protocol model that counts its own evaluations (independently of the engine)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.sigma_min, self.sigma_max, self.shape = inner.sigma_min, inner.sigma_max, inner.shape

    def __call__(self, x, sigma):
        self.calls += 1
        return self.inner(x, sigma)


compositions = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["gaussian", "mixture"]),
        "solver": st.sampled_from(options("solver")),
        "schedule": st.sampled_from(options("schedule")),
        "momentum": st.lists(st.sampled_from(options("momentum")), max_size=2, unique=True),
        "guidance": st.lists(st.sampled_from(options("guidance")), max_size=2, unique=True),
        "steps": st.integers(1, 6),
        "num_samples": st.integers(1, 3),
        "batch_size": st.integers(1, 3),
        "seed": st.integers(0, 2**31),
    }
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=compositions)
def test_random_composition_runs_or_is_rejected(c):
    inner = Gaussian(shape=(4,)) if c["model"] == "gaussian" else Mixture(shape=(4,))
    model = Counting(inner)
    overrides = [f"solver={c['solver']}", f"schedule={c['schedule']}", f"momentum=[{','.join(c['momentum'])}]",
                 f"guidance=[{','.join(c['guidance'])}]",
                 f"steps={c['steps']}", f"num_samples={c['num_samples']}", f"batch_size={c['batch_size']}",
                 f"seed={c['seed']}", "dtype=float64"]
    try:
        res = run(overrides, model=model)
    except ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) > 10
        assert model.calls == 0  # rejected before any evaluation
        return
    assert res.latents.shape == (c["num_samples"], 4)
    assert torch.isfinite(res.latents).all() and res.failed == []
    batches = math.ceil(c["num_samples"] / c["batch_size"])
    m = res.record["metrics"]
    assert m["nfe"] * batches == model.calls  # NFE counted as evaluated
    assert m["nfe"] >= 1
