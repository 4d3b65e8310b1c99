"""Every hook is documented and has a test of its own here (test_hook_<name>) that checks the hook's
stated semantics (framework/core/hookspecs.py, docs/hooks.md): how often it runs, in which order,
what it receives, and what the engine does with its answer. The tracing plugins and models are in
tests/plugins_for_tests.py; runs go through the public API (framework.entry.api.run)."""
from __future__ import annotations

import inspect
import sys

import pytest
import torch

from framework.core import hookspecs
from framework.entry.api import run
from framework.models.analytic import Gaussian
from framework.plugin import ConfigError, Prediction, Schedule
from framework.tools.hookref import hook_names
from tests.plugins_for_tests import TRACE, CountingDenoiser, Event, ShiftedGaussian

HOOKS = hook_names()
HERE = "tests.plugins_for_tests"
#: The analytic Gaussian model in float64, nothing but the plugins a test adds (no CFG, no NaN guard).
GAUSS = ["model=gaussian", "dtype=float64", "guidance=[]", "callback=[]"]
ONE_BATCH = ["num_samples=2", "batch_size=2"]
TWO_BATCHES = ["num_samples=3", "batch_size=2"]  # batches [0, 1] and [2]


def plugin(group: str, tag: str, cls: str = "Tracer", only: tuple[str, ...] = (), **params: object) -> list[str]:
    """Overrides adding plugin ``cls`` of tests/plugins_for_tests.py to ``group`` under the key
    ``tag`` (a Tracer noting only the hooks in ``only``, when given)."""
    out = [f"+{group}.{tag}._target_={HERE}.{cls}"]
    if "tag" in inspect.signature(getattr(sys.modules[HERE], cls)).parameters:
        out.append(f"+{group}.{tag}.tag={tag}")
    if only:
        out.append(f"+{group}.{tag}.only=[{','.join(only)}]")
    return out + [f"+{group}.{tag}.{k}={v}" for k, v in params.items()]


def tracers(group: str, *tags: str, only: tuple[str, ...] = ()) -> list[str]:
    return [o for t in tags for o in plugin(group, t, only=only)]


def traced(overrides: list[str], model: object | None = None):
    """Run and return (result, the events the tracing plugins noted, in call order)."""
    TRACE.clear()
    res = run(overrides, model=model)
    return res, list(TRACE)


def of(events: list[Event], hook: str, tag: str | None = None) -> list[Event]:
    return [e for e in events if e.hook == hook and (tag is None or e.tag == tag)]


def order(events: list[Event], hook: str) -> list[str]:
    return [e.tag for e in of(events, hook)]


def test_every_hook_is_documented_and_tested():
    assert len(HOOKS) >= 13
    here = sys.modules[__name__]
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc) > 60, f"hook {name} needs a docstring stating its semantics"
        assert any(w in doc.lower() for w in ("exactly one", "at most one", "all run", "chain")), name
        assert hasattr(here, f"test_hook_{name}"), f"hook {name} has no test_hook_{name}"


def test_hook_reference_is_in_sync():
    from pathlib import Path

    from framework.tools.hookref import FAMILIES, render

    assert set(FAMILIES) == set(HOOKS)
    doc = Path(__file__).resolve().parents[2] / "docs" / "hooks.md"
    assert doc.read_text() == render(), "regenerate: python -m framework.tools.hookref > docs/hooks.md"


# ---------------------------------------------------------------------------------------------
# Lifecycle: configure, run_start, batch_start, batch_end, run_end
# ---------------------------------------------------------------------------------------------
def test_hook_configure():
    """All run, in config order (group order, then the order written), once per run, before any
    other hook of the run."""
    # written callback, metrics, guidance; config order is guidance, callback, metrics
    over = GAUSS + TWO_BATCHES + ["steps=2"] + tracers("callback", "c1", "c2") + tracers("metrics", "m") \
        + tracers("guidance", "g")
    _, events = traced(over)
    assert order(events, "configure") == ["g", "c1", "c2", "m"]
    assert [e.hook for e in events[:4]] == ["configure"] * 4  # before any other hook


def test_hook_run_start():
    """All run, in config order, once per run (however many batches), after configure and before
    the first batch."""
    for tags in (("a", "b"), ("b", "a")):
        _, events = traced(GAUSS + TWO_BATCHES + ["steps=2"] + tracers("callback", *tags))
        assert order(events, "run_start") == list(tags)
        hooks = [e.hook for e in events]
        start = hooks.index("run_start")
        assert hooks[start : start + 2] == ["run_start", "run_start"]
        assert "configure" in hooks[:start] and "configure" not in hooks[start:]
        assert not {"before_step", "after_step", "batch_end", "run_end"} & set(hooks[:start])


def test_hook_batch_start():
    """All run, in config order, once per batch when it starts sampling: after its conditioning,
    before init_latents and its first step."""
    model = ShiftedGaussian()
    over = ["dtype=float64", "callback=[]", "guidance=[]", "steps=2", *TWO_BATCHES]
    for tags in (("a", "b"), ("b", "a")):
        _, events = traced(over + tracers("conditioning", *tags) + plugin("guidance", "start", "TracedStart"),
                           model=model)
        assert order(events, "batch_start") == [*tags, *tags]
        assert [e.seen for e in of(events, "batch_start", "a")] == [[0, 1], [2]]
        hooks = [(e.tag, e.hook) for e in events]
        for batch in range(2):
            at = [i for i, h in enumerate(hooks) if h == (tags[0], "batch_start")][batch]
            assert hooks[at - 1] == (tags[1], "conditioning")  # after the batch's conditioning chain
            assert hooks[at + 1 : at + 3] == [(tags[1], "batch_start"), ("start", "init_latents")]


def test_hook_batch_end():
    """All run, in config order, once per batch after the batch is sampled (its last after_step),
    with the batch, its final latents and images=None for a model without a decoder."""
    res, events = traced(GAUSS + TWO_BATCHES + ["steps=2"] + tracers("callback", "a", "b"))
    assert order(events, "batch_end") == ["a", "b", "a", "b"]
    hooks = [e.hook for e in events if e.tag == "a"]
    first_end = hooks.index("batch_end")
    assert hooks[first_end - 1] == "after_step" and hooks[first_end + 1] == "batch_start"  # before the next batch
    assert hooks.count("after_step") == 4  # 2 steps × 2 batches
    rows = 0
    for e in of(events, "batch_end", "a"):
        indices, latents, images = e.seen
        assert images is None
        assert torch.equal(latents, res.latents[rows : rows + len(indices)])  # passed through, not recomputed
        rows += len(indices)
    assert [e.seen[0] for e in of(events, "batch_end", "a")] == [[0, 1], [2]]


def test_hook_adjust_images(tiny_overrides, tmp_path):
    """Chain, in config order, once per batch after decoding: b receives a's answer; the last answer
    (clamped to [0, 1]) is what batch_end sees, the result returns and the run folder saves; models
    without a decoder get no call."""
    import numpy as np
    from PIL import Image

    base = tiny_overrides + ["guidance=[]", "callback=[]", "steps=2", *TWO_BATCHES]
    plain = run(base).images
    a, b = plugin("callback", "a", add=0.25, only=("adjust_images", "batch_end")), plugin("callback", "b", only=("adjust_images",))
    TRACE.clear()
    res = run(base + a + b, output_dir=tmp_path / "run")
    events = list(TRACE)
    assert order(events, "adjust_images") == ["a", "b", "a", "b"]  # once per batch, config order
    first_a, first_b = of(events, "adjust_images")[:2]
    assert torch.equal(first_a.seen[1], plain[:2])  # the decoded images
    assert torch.allclose(first_b.seen[1], plain[:2] + 0.25)  # b receives a's answer
    assert torch.allclose(res.images, (plain + 0.25).clamp(0, 1))  # the last answer, clamped
    assert torch.equal(of(events, "batch_end", "a")[0].seen[2], res.images[:2])
    saved = np.asarray(Image.open(tmp_path / "run" / "samples" / "000000.png").convert("RGB")) / 255
    assert np.abs(saved - res.images[0].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6  # what is saved
    _, events = traced(GAUSS + ONE_BATCH + ["steps=2"] + a)
    assert not of(events, "adjust_images") and of(events, "batch_end")  # no decoder, no call


def test_hook_run_end():
    """All run, in config order, once per run after the last batch_end, with the run's result;
    the scores it adds to run.metrics reach the record."""
    for tags in (("a", "b"), ("b", "a")):
        res, events = traced(GAUSS + TWO_BATCHES + ["steps=2"] + tracers("callback", *tags))
        assert [(e.tag, e.hook) for e in events[-2:]] == [(t, "run_end") for t in tags]
        assert len(of(events, "run_end")) == 2
        assert torch.equal(events[-1].seen, res.latents)
        assert res.record["metrics"]["a_run_end"] == 1.0 and res.record["metrics"]["b_run_end"] == 1.0


# ---------------------------------------------------------------------------------------------
# Before sampling: conditioning, schedule, adjust_schedule, init_latents
# ---------------------------------------------------------------------------------------------
def test_hook_conditioning():
    """Chain, in config order, once per batch before sampling; the model samples with the last
    plugin's answer."""
    prompts = "prompts=[ab,abcd,abc]"
    for tags, adds in ((("a", "b"), (1.0, 10.0)), (("b", "a"), (10.0, 1.0))):
        model = ShiftedGaussian()
        over = ["dtype=float64", "callback=[]", "guidance=[]", prompts, "steps=2", *TWO_BATCHES]
        over += [o for t, v in zip(tags, adds) for o in plugin("conditioning", t, add=v, only=("conditioning", "before_step"))]
        _, events = traced(over, model=model)
        conds = of(events, "conditioning")
        assert [e.tag for e in conds] == [*tags, *tags]  # once per batch, config order
        first, second = conds[0].seen, conds[1].seen
        assert first[0] == ["ab", "abcd"] and second[0] == ["ab+" + tags[0], "abcd+" + tags[0]]  # the chain
        torch.testing.assert_close(second[1]["c"], first[1]["c"] + adds[0], rtol=0, atol=1e-12)
        hooks = [e.hook for e in events if e.tag == tags[0]]
        assert hooks.index("conditioning") < hooks.index("before_step")
        # every evaluation of batch 0 saw the encoding (2, 4) plus both plugins' additions
        torch.testing.assert_close(model.seen[0], torch.tensor([[2.0], [4.0]], dtype=torch.float64) + 11.0,
                                   rtol=0, atol=1e-12)
        assert model.seen[-1].shape == (1, 1)  # batch 1 holds prompt 2 only


def test_hook_schedule():
    """Exactly one plugin answers, once per run, with the model and ``steps``; the run samples on
    its grid. A second answer is a configuration error at start-up, before any evaluation."""
    model = CountingDenoiser(Gaussian(shape=(4,)))
    over = ["dtype=float64", "guidance=[]", "callback=[]", "steps=4", *TWO_BATCHES, "~schedule",
            f"+schedule._target_={HERE}.TracedSchedule", *tracers("callback", "a")]
    res, events = traced(over, model=model)
    calls = of(events, "schedule")
    assert len(calls) == 1 and calls[0].seen == 4
    assert [e.hook for e in events].index("schedule") < [e.hook for e in events].index("run_start")
    sigmas = res.schedule.sigmas
    assert len(sigmas) == 5 and sigmas[-1] == 0.0
    assert sigmas[0] == pytest.approx(80.0, rel=1e-12) and sigmas[3] == pytest.approx(0.002, rel=1e-12)
    assert res.record["sigmas"] == pytest.approx(list(sigmas), rel=1e-12)
    assert [e.sigma for e in of(events, "before_step")[:4]] == pytest.approx(sigmas[:4], rel=1e-12)

    model = CountingDenoiser(Gaussian(shape=(4,)))
    with pytest.raises(ConfigError, match="exactly one plugin must answer 'schedule'"):
        run(GAUSS + ["steps=2", *plugin("callback", "second", "TracedSchedule")], model=model)
    assert model.calls == 0


def test_hook_adjust_schedule():
    """Chain, in config order, once per run after ``schedule``; the run samples on the last answer."""
    steps = 5
    over = GAUSS + TWO_BATCHES + [f"steps={steps}"]
    plain = run(over)
    a, b = plugin("callback", "a", drop=2), plugin("callback", "b")
    res, events = traced(over + a + b)
    calls = of(events, "adjust_schedule")
    assert [e.tag for e in calls] == ["a", "b"]  # once per run, config order
    assert calls[0].seen == pytest.approx(plain.schedule.sigmas, rel=1e-12)
    assert calls[1].seen == pytest.approx(plain.schedule.sigmas[2:], rel=1e-12)  # b receives a's answer
    assert res.schedule.sigmas == pytest.approx(plain.schedule.sigmas[2:], rel=1e-12)
    assert res.record["metrics"]["nfe"] == steps - 2  # euler: one evaluation per remaining step
    assert len(of(events, "before_step", "a")) == 2 * (steps - 2)
    _, events = traced(over + b + a)
    assert [e.tag for e in of(events, "adjust_schedule")] == ["b", "a"]
    assert of(events, "adjust_schedule", "b")[0].seen == pytest.approx(plain.schedule.sigmas, rel=1e-12)


def test_hook_init_latents():
    """At most one plugin answers, once per batch with the batch's unit noise, and the batch starts
    from its answer; without one the engine starts from noise × init_noise_scale; two are a
    configuration error at start-up, before any evaluation."""
    over = GAUSS + TWO_BATCHES + ["steps=3"] + tracers("callback", "a", only=("before_step",))
    res, events = traced(over + plugin("guidance", "start", "TracedStart", value=3.0))
    starts = of(events, "init_latents")
    assert len(starts) == 2  # once per batch
    assert torch.equal(res.x_T, torch.full_like(res.x_T, 3.0))
    firsts = [e for e in of(events, "before_step") if e.step == 0]
    assert [e.seen.shape[0] for e in firsts] == [2, 1] and all(torch.equal(e.seen, e.seen.new_full(e.seen.shape, 3.0))
                                                               for e in firsts)  # each batch starts there
    hooks = [e.hook for e in events]
    assert hooks.index("init_latents") < hooks.index("before_step")
    noise = torch.cat([e.seen[0] for e in starts])  # the same seeds, so the same noise, without the plugin:
    default = run(over)
    torch.testing.assert_close(default.x_T, noise * default.schedule.init_noise_scale, rtol=1e-12, atol=0)

    model = CountingDenoiser(Gaussian(shape=(4,)))
    with pytest.raises(ConfigError, match="init_latents"):
        run(GAUSS + ["steps=2", *plugin("guidance", "s1", "TracedStart"), *plugin("callback", "s2", "TracedStart")],
            model=model)
    assert model.calls == 0


# ---------------------------------------------------------------------------------------------
# Per step: before_step, predict, guidance, momentum, step, after_step
# ---------------------------------------------------------------------------------------------
MIDPOINT = [f"solver._target_={HERE}.TracedMidpoint"]


def test_hook_before_step():
    """All run, in config order, once per step before any evaluation of the step; a plugin may
    replace ``state.x`` (the next plugin and the step's first evaluation start from it)."""
    steps = 3
    for tags in (("a", "b"), ("b", "a")):
        over = GAUSS + ONE_BATCH + [f"steps={steps}"] + plugin("callback", tags[0], only=("before_step",), shift_x=1.0) \
            + plugin("callback", tags[1], only=("before_step",)) + tracers("guidance", "g", only=("guidance",))
        _, events = traced(over)
        assert order(events, "before_step") == list(tags) * steps
        assert [e.step for e in of(events, "before_step")] == [0, 0, 1, 1, 2, 2]
        for i in range(steps):
            in_step = [e for e in events if e.step == i]
            assert [e.hook for e in in_step[:3]] == ["before_step", "before_step", "guidance"]
            x0, x1, (x_eval, _) = (e.seen for e in in_step[:3])
            torch.testing.assert_close(x1, x0 + 1.0, rtol=0, atol=1e-12)  # the first plugin moved x
            assert torch.equal(x_eval, x1)  # the step's first evaluation is at the moved x


def test_hook_predict():
    """Exactly one plugin answers (the model adapter); the engine counts one NFE per call, so the
    model is evaluated exactly nfe times per batch, for one- and multi-evaluation solvers and with
    a batched CFG pair (one call, one NFE). A second answer is rejected at start-up."""
    for solver, steps, nfe in (("solver=euler", 4, 4), ("solver=heun", 4, 7), ("solver=dpm_2", 3, 5)):
        model = CountingDenoiser(Gaussian(shape=(4,)))
        res = run(GAUSS + TWO_BATCHES + [solver, f"steps={steps}"], model=model)
        assert res.record["metrics"]["nfe"] == nfe
        assert model.calls == 2 * nfe, (solver, model.calls)  # two batches
    model = ShiftedGaussian()
    res = run(["dtype=float64", "callback=[]", "guidance=[cfg]", "cfg_scale=3", "steps=4", *ONE_BATCH, "solver=heun"],
              model=model)
    assert res.record["metrics"]["nfe"] == 7 and model.calls == 7
    assert all(c.shape == (4, 1) for c in model.seen)  # [uncond; cond] of 2 samples in one call
    assert res.record["metrics"]["unet_calls"] == 7

    model = CountingDenoiser(Gaussian(shape=(4,)))
    with pytest.raises(ConfigError, match="exactly one plugin must answer 'predict'"):
        run(GAUSS + ["steps=2", *plugin("callback", "second", "SecondModel")], model=model)
    assert model.calls == 0


def test_hook_guidance():
    """Chain, in config order, after every evaluation (every stage of a multi-stage solver): each
    plugin receives the previous one's answer; the first call of a step sees ``state.pred`` None."""
    steps = 3
    for tags in (("a", "b"), ("b", "a")):
        over = GAUSS + ONE_BATCH + [f"steps={steps}", "solver=heun"] \
            + plugin("guidance", tags[0], only=("guidance",), add=1.0) + plugin("guidance", tags[1], only=("guidance",))
        res, events = traced(over)
        nfe = 2 * steps - 1  # heun: two evaluations per step, Euler to σ = 0
        assert res.record["metrics"]["nfe"] == nfe
        calls = of(events, "guidance")
        assert [e.tag for e in calls] == list(tags) * nfe  # both, in config order, at every evaluation
        for e1, e2 in zip(calls[::2], calls[1::2]):
            (x1, d1), (x2, d2) = e1.seen, e2.seen
            assert e1.sigma == e2.sigma and torch.equal(x1, x2)
            torch.testing.assert_close(d2, d1 + 1.0, rtol=0, atol=1e-12)  # the second gets the first's answer
        firsts = [(e.step, e.first) for e in calls[::2]]
        assert firsts == [(0, True), (0, False), (1, True), (1, False), (2, True)]  # heun: Euler to σ = 0
        sig = res.schedule.sigmas
        assert [e.sigma for e in calls[::2]] == pytest.approx([sig[0], sig[1], sig[1], sig[2], sig[2]], rel=1e-12)


def test_hook_momentum():
    """Chain, in config order, at each step's first evaluation only (not at a multi-stage solver's
    later evaluations): it receives the guided first evaluation and the solver steps along the
    last plugin's answer."""
    steps = 3
    guided = tracers("guidance", "g", only=("guidance",))
    res, events = traced(GAUSS + ONE_BATCH + [f"steps={steps}", "solver=heun"] + guided
                         + tracers("callback", "m1", "m2", only=("momentum",)))
    assert res.record["metrics"]["nfe"] == 2 * steps - 1 == len(of(events, "guidance"))
    assert order(events, "momentum") == ["m1", "m2"] * steps  # once per step, config order
    assert [e.step for e in of(events, "momentum", "m1")] == list(range(steps))
    for i in range(steps):  # right after the step's first evaluation, at (state.x, σ_i)
        in_step = [(e.tag, e.hook) for e in events if e.step == i]
        assert in_step[:3] == [("g", "guidance"), ("m1", "momentum"), ("m2", "momentum")]
        assert ("m1", "momentum") not in in_step[3:]
    for e in of(events, "momentum", "m1"):
        assert e.sigma == pytest.approx(res.schedule.sigmas[e.step], rel=1e-12)

    # the chain, both orders, on a two-stage solver that reports the direction it received
    for tags in (("m1", "m2"), ("m2", "m1")):
        over = GAUSS + ONE_BATCH + [f"steps={steps}"] + MIDPOINT + guided \
            + plugin("callback", tags[0], only=("momentum",), add=1.0) \
            + plugin("callback", tags[1], only=("momentum",), add=10.0)
        _, events = traced(over)
        assert order(events, "momentum") == list(tags) * steps
        firsts = [e for e in of(events, "guidance") if e.first]
        for i, (g, m1, m2, st) in enumerate(zip(firsts, of(events, "momentum", tags[0]),
                                                of(events, "momentum", tags[1]), of(events, "step"))):
            assert torch.equal(m1.seen[1], g.seen[1])  # the guided first evaluation
            torch.testing.assert_close(m2.seen[1], m1.seen[1] + 1.0, rtol=0, atol=1e-12)
            torch.testing.assert_close(st.seen[1], m2.seen[1] + 10.0, rtol=0, atol=1e-12)  # state.pred


def test_hook_step():
    """Exactly one plugin answers, once per step, after momentum with ``state.pred`` at
    (state.x, σ); asking ``denoise`` for that evaluation again costs no NFE, every further call is
    one NFE with guidance; after_step receives its answer. A second solver is rejected at start-up."""
    steps = 4
    res, events = traced(GAUSS + ONE_BATCH + [f"steps={steps}"] + MIDPOINT + tracers("callback", "a"))
    calls = of(events, "step")
    assert [e.step for e in calls] == list(range(steps))  # exactly once per step
    nfe = 2 * steps - 1  # two stages per step, Euler to σ = 0
    assert res.record["metrics"]["nfe"] == nfe == len(of(events, "guidance", "a"))
    for i, e in enumerate(calls):
        pred_sigma, _, x_next = e.seen
        assert pred_sigma == pytest.approx(res.schedule.sigmas[i], rel=1e-12)
        in_step = [x.hook for x in events if x.step == i]
        assert in_step.index("momentum") < in_step.index("step") < in_step.index("after_step")
        assert torch.equal(of(events, "after_step", "a")[i].seen, x_next)
    assert torch.equal(res.latents, calls[-1].seen[2])

    model = CountingDenoiser(Gaussian(shape=(4,)))
    with pytest.raises(ConfigError, match="exactly one plugin must answer 'step'"):
        run(GAUSS + ["steps=2", *plugin("callback", "second", "TracedMidpoint")], model=model)
    assert model.calls == 0


def test_hook_after_step():
    """All run, in config order, once per step after ``step``, with the step's answer; the next
    step starts from it."""
    steps = 4
    for tags in (("a", "b"), ("b", "a")):
        res, events = traced(GAUSS + ONE_BATCH + [f"steps={steps}"] + MIDPOINT + tracers("callback", *tags))
        assert order(events, "after_step") == list(tags) * steps
        for i, e in enumerate(of(events, "step")):
            in_step = [(x.tag, x.hook) for x in events if x.step == i]
            assert in_step[-3:] == [("solver", "step"), (tags[0], "after_step"), (tags[1], "after_step")]
            assert all(torch.equal(a.seen, e.seen[2]) for a in of(events, "after_step") if a.step == i)
            if i + 1 < steps:
                assert torch.equal(of(events, "before_step", tags[0])[i + 1].seen, e.seen[2])


def test_shifted_prediction_keeps_noise_estimate():
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    p = Prediction(x=x, sigma=2.0, denoised=x * 0.5)
    q = p.shifted(torch.ones(2, 3))
    torch.testing.assert_close(q.derivative, p.derivative, rtol=0, atol=1e-6)
    assert isinstance(Schedule((1.0, 0.0)), Schedule)
