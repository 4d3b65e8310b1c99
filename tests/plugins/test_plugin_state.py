"""Per-run plugin state lives in the run's stash (``run.stash``), per-trajectory state in the batch's
(``state.stash``), never on the plugin object: one plugin object serving two runs — here a second
run made inside the first, so their hooks interleave — gives each run the metrics, files and
latents it gets with fresh objects."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from omegaconf import OmegaConf

from framework.core import registry
from framework.entry.api import run
from framework.plugin import hookimpl

INSIDE: list = []  # the result of the run made inside another one


@dataclass
class RunInside:
    """A callback that, after its run's first step, makes a whole other run (``overrides``)."""

    overrides: list[str] = field(default_factory=list)

    @hookimpl
    def after_step(self, state, x_next):
        if state.index == 0 and state.batch.indices[0] == 0:
            INSIDE.append(run(self.overrides))


@pytest.fixture
def shared_plugins(monkeypatch):
    """Every plugin built once per (config location, parameters): a later run, even one inside the
    first, receives the very same objects. Models are built per run."""
    real, built = registry.instantiate, {}

    def once(node, where):
        if where.startswith("model"):
            return real(node, where)
        key = (where, json.dumps(OmegaConf.to_container(node, resolve=True), sort_keys=True, default=str))
        if key not in built:
            built[key] = real(node, where)
        return built[key]

    monkeypatch.setattr(registry, "instantiate", once)
    INSIDE.clear()
    return built


def inside(overrides: list[str]) -> list[str]:
    listed = json.dumps(overrides).replace('"', "'")
    return ["+callback.inside._target_=tests.plugins.test_plugin_state.RunInside", f"+callback.inside.overrides={listed}"]


def nested(outer: list[str], inner: list[str]):
    """(outer, inner) results of ``inner`` run inside ``outer`` on shared plugin objects."""
    res = run(outer + inside(inner))
    (inner_res,) = INSIDE
    return res, inner_res


def same_metrics(a: dict, b: dict, keys: list[str]) -> None:
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-12, abs=0), k


def test_analytic_runs_sharing_plugin_objects(shared_plugins):
    common = ["metrics=[frechet_to_data,speed]", "momentum=[heavy_ball]", "dtype=float64", "steps=4",
              "num_samples=8", "batch_size=4"]
    outer, inner = ["model=gaussian", *common], ["model=mixture", "seed=3", *common]
    fresh_outer, fresh_inner = run(outer), run(inner)
    got_outer, got_inner = nested(outer, inner)
    assert any(type(p).__name__ == "FrechetToData" for p in shared_plugins.values())
    for got, fresh in ((got_outer, fresh_outer), (got_inner, fresh_inner)):
        assert torch.equal(got.latents, fresh.latents)
        same_metrics(got.record["metrics"], fresh.record["metrics"], ["frechet_to_data", "rmse_to_reference", "nfe"])
        m = got.record["metrics"]
        assert m["sampling_seconds"] / m["sampling_seconds_per_sample"] == pytest.approx(8)  # its own samples only


def test_image_runs_sharing_plugin_objects(shared_plugins, tmp_path):
    common = ["metrics=[prompt_accuracy,clip_score]", "callback=[nan_guard,preview]", "steps=2", "num_samples=4",
              "batch_size=2", "callback.preview.samples=4"]
    outer = [*common, "prompts=[a red circle,a blue square]"]
    inner = [*common, "seed=5", "prompts=[a green triangle]"]
    fresh_outer = run(outer + [f"output_dir={tmp_path / 'fresh_outer'}"])
    fresh_inner = run(inner + [f"output_dir={tmp_path / 'fresh_inner'}"])
    got_outer, got_inner = nested(outer + [f"output_dir={tmp_path / 'outer'}"],
                                  inner + [f"output_dir={tmp_path / 'inner'}"])
    keys = ["prompt_accuracy_colour_n", "prompt_accuracy_colour", "prompt_accuracy_shape", "clip_score"]
    for got, fresh, name in ((got_outer, fresh_outer, "outer"), (got_inner, fresh_inner, "inner")):
        assert torch.equal(got.latents, fresh.latents)
        same_metrics(got.record["metrics"], fresh.record["metrics"], keys)
        assert got.record["metrics"]["prompt_accuracy_colour_n"] == 4
        for f in ("preview.png", "preview.json"):
            assert (tmp_path / name / f).read_bytes() == (tmp_path / f"fresh_{name}" / f).read_bytes(), f
