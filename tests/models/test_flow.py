"""Flow-matching arithmetic in σ-space (framework/models/flow.py) through the analytic models' flow
twin (``model.parametrization=flow``: the exact D served as a velocity v(x_t, t) and turned back),
and grids that start at σ = ∞ (t = 1, pure noise)."""
from __future__ import annotations

import math

import pytest
import torch

from framework import testing
from framework.core.noise import SampleNoise
from framework.entry.api import run
from framework.models.analytic import Gaussian, Mixture
from framework.models.base import FlowTwin, wrap_model

F64 = ["dtype=float64", "num_samples=2", "batch_size=2"]


@pytest.mark.parametrize("model", ["gaussian", "mixture"])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "lms", "dpmpp_2m_sde"])
def test_the_flow_twin_samples_the_same_paths(model, solver):
    """v = (x_t − D)/t and back D = x_t − t·v: the flow arithmetic changes nothing but rounding."""
    base = [f"model={model}", f"solver={solver}", "steps=8", *F64]
    a, b = run(base), run(base + ["model.parametrization=flow"])
    assert isinstance(wrap_model(Gaussian(parametrization="flow")), FlowTwin)
    assert (a.latents - b.latents).abs().max() <= 1e-12 * a.latents.abs().max()


@pytest.mark.parametrize("solver,expected", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_measured_order_through_the_flow_twin(solver, expected):
    twin = wrap_model(Mixture(parametrization="flow"))  # order tests start from a finite σ_max (80)
    testing.assert_order([f"solver={solver}", "schedule=karras"], expected, model=twin, steps=(64, 128))


def from_infinity(*sigmas: float, extra: tuple[str, ...] = ()) -> list[str]:
    grid = ",".join(["inf", *map(str, sigmas)])
    return ["model=gaussian", "model.parametrization=flow", "schedule=custom", f"schedule.sigmas=[{grid}]",
            f"steps={len(sigmas)}", *F64, *extra]


def test_one_step_from_infinity_lands_on_the_limit_step():
    """From σ = ∞ the state is the unit noise ε and the step is x₁ = D(∞) + σ₁·ε (DDIM's limit,
    FlowMatchEuler's first step); on N(m, s²) data D(∞) = m, and the exact path is m + ε·√(s² + σ²)."""
    res = run(from_infinity(2.0, extra=("model.mean=0.5",)))
    assert res.record["init_noise_scale"] == 1.0 and res.record["sigmas"][0] == math.inf
    assert res.record["metrics"]["nfe"] == 1
    torch.testing.assert_close(res.latents, 0.5 + 2.0 * res.x_T, rtol=1e-14, atol=1e-14)
    exact = 0.5 + res.x_T * math.sqrt(1.0 + 4.0)
    assert res.record["metrics"]["rmse_to_reference"] == pytest.approx(float((res.latents - exact).pow(2).mean().sqrt()), rel=1e-12)


def test_the_error_of_the_start_from_infinity_falls_with_its_first_sigma():
    """The limit step's error on the Gaussian is ε·(√(s² + σ₁²) − σ₁) ≈ ε·s²/(2σ₁): 10× the first σ,
    about 10× less error after one step."""
    errs = [run(from_infinity(s1)).record["metrics"]["rmse_to_reference"] for s1 in (8.0, 80.0)]
    assert 8 < errs[0] / errs[1] < 12


@pytest.mark.parametrize("grid", [(2.0,), (2.0, 0.5, 0.0), (0.0,)])
def test_the_reference_solver_integrates_from_infinity(grid):
    """solver=reference from σ = ∞ integrates the flow-coordinate ODE from t = 1 (not the
    first-order limit step): the exact path m + ε·√(s² + σ²) to 1e-9 (DOP853 at 1e-10), where one
    Euler step is 0.1 or more off."""
    base = from_infinity(*grid, extra=("model.mean=0.5",))
    ref = run(base + ["solver=reference"]).record["metrics"]
    assert ref["rmse_to_reference"] < 1e-9 and ref["nfe"] > 10
    assert run(base).record["metrics"]["rmse_to_reference"] > 0.1


def test_ancestral_solvers_leave_infinity_with_fresh_noise():
    """euler_ancestral (η = 1) from ∞: σ_up → σ₁, σ_down → 0, so x₁ = D(∞) + σ₁·z with z the
    sample's next draw (its first is x_T = ε)."""
    res = run(from_infinity(3.0, extra=("solver=euler_ancestral",)))
    noise = SampleNoise(0, [0, 1], (16,), torch.device("cpu"), torch.float64)
    eps, z = noise.draw(), noise.draw()
    torch.testing.assert_close(res.x_T, eps, rtol=0, atol=0)
    torch.testing.assert_close(res.latents, 3.0 * z, rtol=1e-14, atol=1e-14)


def test_a_denoiser_without_data_moments_cannot_start_at_infinity():
    class Plain:
        sigma_min, sigma_max, shape, parametrization = 0.002, 80.0, (4,), "flow"

        def __call__(self, x, sigma):
            return x / (1 + sigma.reshape(-1, 1) ** 2)

    with pytest.raises(Exception, match="cannot start at σ = ∞"):
        run(["schedule=custom", "schedule.sigmas=[inf,1,0]", "steps=2", *F64], model=Plain())
