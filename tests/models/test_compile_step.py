"""Issue 26 item 1: ``compile=step``, the whole sampling step in one compiled function
(framework/core/graphstep.py).

The fast tests trace with dynamo's ``eager`` backend (the same graphs, guards and recompilations,
no code generation) on the small conv denoiser of test_performance.py; the slow one runs inductor
on the tiny SD pipeline (~2–4 min cold on a CPU)."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from framework import testing
from framework.core import engine, graphstep
from framework.core.errors import ConfigError
from framework.models import compiled
from framework.plugin import hookimpl
from framework.runs import records
from tests.models.test_performance import SmallDenoiser, counting_host_reads
from tests.models.test_performance import small  # noqa: F401  (the small conv denoiser, a module fixture)
from tests.models.test_performance import trace_only as trace_network  # noqa: F401  (a fixture)

SOLVERS = ["euler", "heun", "dpmpp_2m"]
CFG = ["cfg_scale=5.0", "callback=[nan_guard]"]


@pytest.fixture
def trace_only(trace_network, monkeypatch):
    """The network and the step traced with dynamo's eager backend: graphs and guards, no code."""
    monkeypatch.setattr(graphstep, "BACKEND", "eager")


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("solver", [*SOLVERS, "ddim", "euler_cfg_pp"])
def test_captured_step_matches_eager_with_cfg(small, trace_only, solver):
    eager = testing.sample([f"solver={solver}", *CFG], model=small, steps=5, num_samples=2)
    step = testing.sample([f"solver={solver}", *CFG, "compile=step"], model=small, steps=5, num_samples=2)
    scale = eager.latents.abs().max().item()
    # σ arithmetic in float32 on the device instead of Python's float64: Euler and Heun come out
    # bit-identical here, DPM-Solver++(2M)'s log/expm1 of σ differ by ~1e-6 of the scale
    assert (eager.latents - step.latents).abs().max().item() <= 1e-5 * scale
    report = step.record["compile"]
    assert report["captured"] == ["custom", "cfg", solver] and report["fallback"] == {}
    assert report["steps_captured"] == 5 and report["steps_uncaptured"] == 0
    for key in ("nfe", "unet_calls"):  # counted on the host from what the graph evaluated
        assert step.record["metrics"][key] == eager.record["metrics"][key], key
    assert step.record["metrics"]["nfe"] == (9 if solver == "heun" else 5)


@pytest.mark.parametrize("solver, variants", [("euler", 1), ("heun", 2), ("dpmpp_2m", 3), ("ddim", 1), ("euler_cfg_pp", 1)])
def test_one_graph_per_variant_and_no_recompilation_across_runs(small, trace_only, solver, variants):
    """Euler (and DDIM at η = 0, Euler CFG++) has one graph; Heun two (the last step to σ = 0 is
    Euler's); DPM-Solver++(2M) three (first, middle, last). Two seeds × two grids add none."""
    graphstep.STEPS.clear()  # a fresh code object: this test's graphs are its own
    before = graphs()
    testing.sample([f"solver={solver}", *CFG, "compile=step"], model=small, steps=4, num_samples=2)
    assert graphs() - before == variants
    for seed in (1, 2):
        for steps in (4, 7):
            testing.sample([f"solver={solver}", *CFG, "compile=step"], model=small, steps=steps, num_samples=2, seed=seed)
    assert graphs() - before == variants, "a later run, seed or grid recompiled the step"


def test_a_plugin_that_is_not_capturable_falls_back_and_is_listed(small, trace_only):
    eager = testing.sample(["solver=lms", *CFG], model=small, steps=4, num_samples=2)
    step = testing.sample(["solver=lms", *CFG, "compile=step"], model=small, steps=4, num_samples=2)
    report = step.record["compile"]
    assert report["captured"] == [] and report["fallback"] == {"lms": "not marked capturable"}
    assert report["steps_captured"] == 0
    assert (eager.latents - step.latents).abs().max().item() <= 1e-5 * eager.latents.abs().max().item()
    assert step.record["metrics"]["nfe"] == eager.record["metrics"]["nfe"]
    # a configuration of a capturable plugin that decides on the host says why
    windowed = testing.sample(["guidance=[interval]", "cfg_scale=5.0", "compile=step"], model=small, steps=3, num_samples=1)
    assert "window" in windowed.record["compile"]["fallback"]["interval"]
    noisy = testing.sample(["solver=ddim", "solver.eta=1", "compile=step"], model=small, steps=3, num_samples=1)
    assert "noise" in noisy.record["compile"]["fallback"]["ddim"]


def test_steps_the_graph_cannot_take_run_uncaptured_in_the_same_run(small, trace_only):
    """Churn raises σ in before_step inside its window: those steps (and a multistep solver's next
    one, whose history is off the grid) take the ordinary path; the others are captured."""
    ov = ["solver=dpmpp_2m", *CFG, "callback=[churn,nan_guard]", "callback.churn.s_churn=2", "callback.churn.s_tmin=2",
          "callback.churn.s_tmax=6"]
    eager = testing.sample(ov, model=small, steps=8, num_samples=2)
    step = testing.sample(ov + ["compile=step"], model=small, steps=8, num_samples=2)
    report = step.record["compile"]
    assert report["steps_captured"] > 0 and report["steps_uncaptured"] > 0
    assert report["steps_captured"] + report["steps_uncaptured"] == 8
    assert (eager.latents - step.latents).abs().max().item() <= 1e-5 * eager.latents.abs().max().item()
    assert step.record["metrics"]["nfe"] == eager.record["metrics"]["nfe"] == 8


@dataclass
class IndexEuler:
    """Euler that claims to be capturable but reads state.index (a value per step)."""

    capturable: ClassVar[bool] = True

    @hookimpl
    def step(self, state, denoise):
        return state.pred.x + (state.sigma_next - state.sigma) * state.pred.derivative * (1 + 0 * state.index)


def test_a_broken_promise_falls_back_with_a_warning_and_the_reason(small, trace_only):
    bad = ["solver=euler", f"solver._target_={__name__}.IndexEuler", *CFG]
    eager = testing.sample(bad, model=small, steps=3, num_samples=2)
    with pytest.warns(UserWarning, match="compile=step: capture failed at step 0"):
        step = testing.sample(bad + ["compile=step"], model=small, steps=3, num_samples=2)
    report = step.record["compile"]
    assert report["captured"] == [] and "state.index" in report["fallback"]["step"], report
    assert report["steps_captured"] == 0 and report["steps_uncaptured"] == 3
    assert (eager.latents - step.latents).abs().max().item() <= 1e-6 * eager.latents.abs().max().item()


class NaNDenoiser(SmallDenoiser):
    """Sample 1 (odd rows, also in a CFG pair) turns NaN below σ = 2."""

    def forward(self, x, sigma, ctx):
        out = super().forward(x, sigma, ctx)
        odd = (torch.arange(x.shape[0], device=x.device) % 2 == 1)[:, None, None, None]
        return torch.where(odd & (sigma.reshape(-1, 1, 1, 1) < 2), torch.nan, out)


def test_the_nan_guard_points_at_the_same_step_and_plugin(trace_only):
    model = NaNDenoiser()
    eager = testing.sample(["solver=heun", *CFG], model=model, steps=6, num_samples=2)
    step = testing.sample(["solver=heun", *CFG, "compile=step"], model=model, steps=6, num_samples=2)
    assert step.record["compile"]["steps_captured"] == 6
    assert list(eager.failures) == [1] and step.failures == eager.failures, (eager.failures, step.failures)


def test_the_captured_step_never_reads_the_device(small, trace_only, monkeypatch):
    """The loop under compile=step: no .item()/float()/.cpu(), and no tensor made per step."""
    def loop_counts(steps: int) -> collections.Counter:
        seen: collections.Counter[str] = collections.Counter()
        loop = engine.sample_batch

        def counted_loop(*args, **kwargs):
            with counting_host_reads() as counts:
                try:
                    return loop(*args, **kwargs)
                finally:
                    seen.update(counts)

        with monkeypatch.context() as patch:
            patch.setattr(engine, "sample_batch", counted_loop)
            result = testing.sample(["solver=dpmpp_2m", *CFG, "compile=step"], model=small, steps=steps, num_samples=2)
        assert result.record["compile"]["steps_captured"] == steps
        return seen

    loop_counts(3)  # traced here: dynamo's own work is not the loop's
    short, long = loop_counts(3), loop_counts(6)
    reads = {k: v for k, v in long.items() if k != "torch.tensor"}
    assert reads == {}, f"host reads in the sampling loop: {reads}"
    assert short == long, f"per-step tensor creation: {short} (3 steps) vs {long} (6 steps)"


def test_compile_takes_false_true_or_step_and_step_stays_out_of_the_run_key():
    with pytest.raises(ConfigError, match="compile must be false, true .* or step"):
        testing.sample(["compile=graph"], model="gaussian", steps=2, num_samples=1)
    base = {"steps": 4, "seed": 0, "compile": False}
    assert records.run_key(base, {}, {}) == records.run_key(dict(base, compile="step"), {}, {})


@pytest.mark.slow
def test_captured_step_matches_eager_inductor():
    """The tiny SD pipeline's whole DPM-Solver++(2M) step with CFG under inductor (needs a C++
    compiler; three variants, several minutes cold on a CPU) against the eager loop."""
    ov = ["solver=dpmpp_2m", *CFG]
    eager = testing.sample(ov, model="tiny_random", steps=4, num_samples=2)
    graphstep.STEPS.clear()
    before = graphs()
    step = testing.sample(ov + ["compile=step"], model="tiny_random", steps=4, num_samples=2)
    again = testing.sample(ov + ["compile=step"], model="tiny_random", steps=4, num_samples=2, seed=1)
    assert step.record["compile"]["steps_captured"] == 4 and again.record["compile"]["steps_captured"] == 4
    assert graphs() - before == 3
    scale = eager.latents.abs().max().item()
    assert (eager.latents - step.latents).abs().max().item() <= 1e-4 * scale
    assert step.record["metrics"]["nfe"] == eager.record["metrics"]["nfe"]


@pytest.mark.slow
def test_gpu_benchmark_smoke_has_the_step_and_floor_rows(tmp_path):
    """benchmarks/gpu_engine.py section (b) on the CPU (~25 s): the compile=step row against the
    floor of N compiled UNet calls, every step captured, the same latents as eager."""
    from tests.benchmark_scripts import load_benchmark

    data = load_benchmark("gpu_engine").main(["--smoke", "--sections", "b", "--out", str(tmp_path)])
    assert data["errors"] == {}
    row = data["sections"]["b"]["step"]
    assert row["compile"]["steps_captured"] == data["args"]["steps"] and row["compile"]["fallback"] == {}
    assert row["floor_ms"] > 0 and row["ratio_step_vs_floor"] > 0 and row["within_tolerance"]
    assert compiled.BACKEND == graphstep.BACKEND == "inductor"  # the smoke run's trace-only backends were put back
