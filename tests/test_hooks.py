"""Every hook is documented and has a test of its own here (test_hook_<name>)."""
from __future__ import annotations

import inspect
import sys

import torch

from framework.core import hookspecs
from framework.entry.api import run
from framework.core.state import Prediction, Schedule
from tests.plugins_for_tests import Recorder

from framework.tools.hookref import hook_names

HOOKS = hook_names()
REC = "+callback.rec._target_=tests.plugins_for_tests.Recorder"
GAUSS = ["model=gaussian", "dtype=float64", "num_samples=2", "batch_size=2"]


def test_every_hook_is_documented_and_tested():
    assert len(HOOKS) >= 13
    here = sys.modules[__name__]
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc) > 60, f"hook {name} needs a docstring stating its semantics"
        assert any(w in doc.lower() for w in ("exactly one", "all run", "chain", "first result")), name
        assert hasattr(here, f"test_hook_{name}"), f"hook {name} has no test_hook_{name}"


def recorded(overrides):
    Recorder.log.clear()
    res = run(overrides + [REC])
    return res, [h for _, h in Recorder.log]


def test_hook_configure():
    _, log = recorded(GAUSS + ["steps=2"])
    assert log[0] == "configure"


def test_hook_run_start():
    _, log = recorded(GAUSS + ["steps=2"])
    assert log.index("run_start") < log.index("before_step")


def test_hook_batch_end():
    _, log = recorded(GAUSS + ["steps=2", "num_samples=3", "batch_size=2"])
    assert log.count("batch_end") == 2


def test_hook_run_end():
    res, log = recorded(GAUSS + ["steps=2"])
    assert log[-1] == "run_end"
    assert res.record["metrics"]["rec_seen"] == 1.0


def test_hook_conditioning(tiny_overrides):
    _, log = recorded(tiny_overrides + ["steps=1", "num_samples=1", "batch_size=1"])
    assert log.count("conditioning") == 1 and log.index("conditioning") < log.index("before_step")


def test_hook_schedule():
    res = run(GAUSS + ["steps=3", "schedule.rho=3.0"])
    assert isinstance(res.schedule, Schedule) and res.schedule.steps == 3
    assert res.record["sigmas"] == list(res.schedule.sigmas)
    assert res.schedule.sigmas[0] == 80.0 and res.schedule.sigmas[-1] == 0.0


def test_hook_init_latents():
    res = run(GAUSS + ["steps=2"])
    from framework.core.noise import SampleNoise

    noise = SampleNoise(0, [0, 1], (16,), torch.device("cpu"), torch.float64).draw()
    assert torch.equal(res.x_T, noise * 80.0)


def test_hook_before_step():
    _, log = recorded(GAUSS + ["steps=3"])
    assert log.count("before_step") == 3


def test_hook_predict():
    res = run(GAUSS + ["steps=3", "solver=heun"])
    assert res.record["plugins"]["predict"] == ["gaussian"]
    assert res.record["metrics"]["nfe"] == 5


def test_hook_guidance():
    _, log = recorded(GAUSS + ["steps=3", "solver=heun"])
    assert log.count("guidance") == 5  # every evaluation, both Heun stages


def test_hook_momentum():
    res = run(GAUSS + ["steps=3", "solver=heun", "momentum=[]"])
    assert "momentum" not in res.record["plugins"]
    res = run(GAUSS + ["steps=3", "momentum=[heavy_ball]"])
    assert res.record["plugins"]["momentum"] == ["heavy_ball"]


def test_hook_step():
    res = run(GAUSS + ["steps=3", "solver=ddim"])
    assert res.record["plugins"]["step"] == ["ddim"]


def test_hook_after_step():
    _, log = recorded(GAUSS + ["steps=4"])
    assert log.count("after_step") == 4
    assert log.index("after_step") > log.index("before_step")


def test_shifted_prediction_keeps_noise_estimate():
    x = torch.randn(2, 3)
    p = Prediction(x=x, sigma=2.0, denoised=x * 0.5)
    q = p.shifted(torch.ones(2, 3))
    assert torch.allclose(q.derivative, p.derivative, atol=1e-6)


def test_hook_reference_is_in_sync():
    from pathlib import Path

    from framework.tools.hookref import FAMILIES, hook_names, render

    assert set(FAMILIES) == set(hook_names())
    doc = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"
    assert doc.read_text() == render(), "regenerate: python -m framework.tools.hookref > docs/hooks.md"


def test_hook_adjust_schedule(tmp_path):
    from framework.bundled.world import sample_scenes
    from framework.runs.images import to_pil

    to_pil((sample_scenes(1, seed=0).images[0] + 1) / 2).save(tmp_path / "a.png")
    res = run(["guidance=[img2img]", f"guidance.img2img.image={tmp_path / 'a.png'}", "guidance.img2img.strength=0.5",
               "steps=6", "num_samples=1", "batch_size=1"])
    assert res.record["plugins"]["adjust_schedule"] == ["img2img"]
    assert res.schedule.steps == 3 and res.record["metrics"]["nfe"] == 3
