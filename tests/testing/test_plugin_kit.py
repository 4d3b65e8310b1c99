"""The plugin authoring kit: the template (framework/tools/newplugin.py) makes docs/plugins.md's example
package, which is found through its entry point (a temporary dist-info on sys.path; one slow test
installs it with pip), runs in a sweep beside the built-ins and passes its generated tests; broken
plugins fail the conformance kit (framework/testing.py) with a message that says what is wrong;
built-in momentum plugins, schedules and color_loss pass the kit of their family (solvers:
tests/plugins/test_solvers.py). docs/plugins.md itself is checked by tests/tools/test_plugins_tutorial.py."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import conf
from framework import testing
from framework.entry.cli import main
from framework.plugin import ConfigError, hookimpl
from framework.tools.newplugin import create
from framework.tools.newplugin import main as new_plugin
from tests.distributions import installed_in_place, plugin_sources

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = Path(conf.__file__).parent
PACKAGE = "my_samplers"  # docs/plugins.md's example package
PLUGINS = [("solver", "ralston"), ("loss", "brightness"), ("schedule", "warped"), ("momentum", "ema")]


def make_package(root: Path) -> Path:
    """The tutorial's package, with one plugin of each family, made by the template in ``root``."""
    for family, name in PLUGINS:
        assert new_plugin([family, name, "--dest", str(root), "--package", PACKAGE]) == 0
    return root / PACKAGE


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package, installed for discovery as ``pip install -e`` would leave it: a temporary
    ``my_samplers-0.1.0.dist-info`` (name, version, entry points from its pyproject.toml) and the
    project folder on sys.path (tests/distributions.py)."""
    root = tmp_path_factory.mktemp("plugins")
    project = make_package(root)
    with installed_in_place(project, root / "site"):
        yield project


@pytest.fixture(scope="module")
def pip_installed(tmp_path_factory):
    """The package (a copy of its own) installed with pip into a folder; used by the slow tests in
    fresh processes only, so that this process never sees two installations."""
    root = tmp_path_factory.mktemp("pip_plugins")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAMPLERLAB_DISABLE_ENTRY_POINTS", "1")  # the template must not see the other installation
        project, site = make_package(root), root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "--target", str(site), str(project)], check=True)
    return project, site


def fresh_env(site: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), OMP_NUM_THREADS="1")


def run_generated(project: Path, *selection: str) -> None:
    """Run the generated tests in this process with pytest (their own rootdir and config)."""
    args = [str(project / "tests" / s) for s in selection]
    code = pytest.main(["-q", "-p", "no:cacheprovider", "--import-mode=importlib", "--rootdir", str(project), *args])
    assert code == 0, f"generated tests failed: {selection}"


def test_template_package_is_found_through_the_entry_point(installed):
    project = installed
    assert plugin_sources("solver")["ralston"] == "my-samplers"
    assert plugin_sources("guidance")["brightness"] == "my-samplers"
    assert plugin_sources("schedule")["warped"] == "my-samplers"
    assert plugin_sources("momentum")["ema"] == "my-samplers"
    assert (project / "pyproject.toml").read_text().count("[project.entry-points.samplerlab]") == 1


def test_template_plugins_run_in_a_sweep_beside_builtins(installed, tmp_path, capsys):
    """`samplerlab -m` over the new solver and a built-in one, with the new loss (one sweep, the
    tiny random SD model: the loss needs a decoder)."""
    code = main(["-m", "model=tiny_random", "solver=euler,ralston", "guidance=[cfg,brightness]", "steps=2",
                 "num_samples=1", "save_images=false", f"hydra.sweep.dir={tmp_path}/sweep"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/record.json")]
    assert sorted(r["plugins"]["step"][0] for r in records) == ["euler", "ralston"]
    assert all(r["plugins"]["guidance"] == ["cfg", "brightness"] for r in records)
    nfe = {r["plugins"]["step"][0]: r["metrics"]["nfe"] for r in records}
    assert nfe == {"euler": 2, "ralston": 4}  # two evaluations per Ralston step


def test_generated_solver_and_loss_tests_pass(installed):
    """The tutorial's solver tests (order on both analytic models, NFE, determinism, batch) and the
    loss's gradient test; the bundled-model loss tests run in the slow test below."""
    run_generated(installed, "test_ralston.py", "test_brightness.py::test_gradient_moves_the_target")


@pytest.mark.slow  # the schedule and momentum templates (also run by the fresh-process test)
def test_generated_schedule_and_momentum_tests_pass(installed):
    run_generated(installed, "test_warped.py", "test_ema.py")


@pytest.mark.slow
def test_pip_install_is_found_through_the_entry_point(pip_installed):
    """The real thing once: pip installs the package (its YAMLs as package data) and a fresh
    process finds every plugin of it through the entry point."""
    project, site = pip_installed
    assert (site / PACKAGE / "conf" / "solver" / "ralston.yaml").is_file()  # installed, not read in place
    code = ("from tests.distributions import plugin_sources as s; "
            "print(*(s(g)[n] for g, n in [('solver', 'ralston'), ('guidance', 'brightness'), "
            "('schedule', 'warped'), ('momentum', 'ema')]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=site, env=fresh_env(site), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["my-samplers"] * 4


@pytest.mark.slow
def test_generated_suite_passes_in_a_fresh_process(pip_installed):
    """The whole generated suite, as an author runs it (~1–3 minutes here, most of it the bundled model)."""
    project, site = pip_installed
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=project,
                         env=fresh_env(site), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "12 passed" in out.stdout


def test_generated_code_imports_only_the_public_api(installed):
    """A plugin author needs one import: every template imports framework.plugin, and the generated
    tests framework.testing, and nothing else of samplerlab."""
    public = {"framework.plugin", "framework.testing"}
    files = sorted(installed.rglob("*.py"))
    assert len(files) == 9  # __init__, 4 plugins, 4 test files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "framework":
                names = {node.module} if node.module != "framework" else {f"framework.{a.name}" for a in node.names}
                assert names <= public, f"{path.name} imports {sorted(names - public)}: use framework.plugin"
            elif isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "framework" for a in node.names), path.name


def test_template_refuses_bad_requests(tmp_path, capsys):
    assert new_plugin(["solver", "heun", "--dest", str(tmp_path)]) == 2
    assert "solver 'heun' exists already (builtin): choose another name" in capsys.readouterr().err
    assert new_plugin(["sampler", "x", "--dest", str(tmp_path)]) == 2
    assert "unknown family 'sampler': choose one of solver, schedule, momentum, loss" in capsys.readouterr().err
    assert new_plugin(["solver", "My-Solver", "--dest", str(tmp_path)]) == 2
    assert "must be a lowercase Python identifier" in capsys.readouterr().err
    assert new_plugin(["solver", "rk3", "--dest", str(tmp_path)]) == 0
    assert new_plugin(["solver", "rk3", "--dest", str(tmp_path)]) == 2
    assert "exist(s) already" in capsys.readouterr().err


def test_template_extends_an_existing_package(tmp_path):
    first = create("solver", "rk_a", tmp_path, package="pkg")
    second = create("guidance", "loss_b", tmp_path, package="pkg")  # "guidance" is the loss family
    assert first.project == second.project
    assert (tmp_path / "pkg" / "pkg" / "conf" / "guidance" / "loss_b.yaml").read_text().startswith(
        "# @package guidance.loss_b\n")
    assert not any(p.name == "pyproject.toml" for p in second.files)
    compile((tmp_path / "pkg" / "pkg" / "loss_b.py").read_text(), "loss_b.py", "exec")


# ---------------------------------------------------------------------------------------------
# Broken plugins fail the kit, and the message says what is wrong
# ---------------------------------------------------------------------------------------------
@dataclass
class ClaimsSecondOrder:
    """Says 'Heun' but steps like Euler: first order."""

    @hookimpl
    def step(self, state, denoise):
        return state.pred.x + (state.sigma_next - state.sigma) * state.pred.derivative


@dataclass
class HiddenEvaluation:
    """Heun whose corrector calls the model directly: 2 evaluations per step, the record counts 1."""

    @hookimpl
    def step(self, state, denoise):
        pred, h = state.pred, state.sigma_next - state.sigma
        x_next = pred.x + h * pred.derivative
        if state.sigma_next == 0:
            return x_next
        d_next = (x_next - state.run.model.denoise_batch(x_next, state.sigma_next, None, {})) / state.sigma_next
        return pred.x + h * (pred.derivative + d_next) / 2


@dataclass
class GlobalNoise:
    """Euler plus noise from the global RNG: neither reproducible nor batch-invariant."""

    @hookimpl
    def step(self, state, denoise):
        return state.pred.x + (state.sigma_next - state.sigma) * state.pred.derivative + 0.01 * torch.randn_like(state.x)


@dataclass
class BatchMean:
    """Euler on the batch's mean derivative: couples the samples of a batch."""

    @hookimpl
    def step(self, state, denoise):
        d = state.pred.derivative
        return state.pred.x + (state.sigma_next - state.sigma) * (d + d.mean(0, keepdim=True)) / 2


def _target(cls: type) -> str:
    return f"solver._target_={__name__}.{cls.__name__}"


def test_wrong_order_fails_with_the_measured_order():
    with pytest.raises(AssertionError, match=r"measured order 1\.0\d, expected 2 ± 0\.3 \(errors .* at 64 steps, .* at 128 steps"):
        testing.assert_order([_target(ClaimsSecondOrder)], 2)


def test_hidden_evaluation_fails_nfe_honesty():
    with pytest.raises(AssertionError, match=r"evaluated 11 times in 6 steps \(1\.83 per step\) but the record says nfe 6 \(1 per step"):
        testing.assert_nfe_honest([_target(HiddenEvaluation)])
    testing.assert_nfe_honest(["solver=heun"])  # the honest Heun: 11 evaluations, nfe 11


def test_global_rng_fails_determinism_and_batch_coupling_fails_invariance():
    with pytest.raises(AssertionError, match="two runs with the same seed differ .* never from the global RNG"):
        testing.assert_deterministic([_target(GlobalNoise)])
    with pytest.raises(AssertionError, match=r"sample \d differs by .* between batch_size=3 and batch_size=1"):
        testing.assert_batch_invariant([_target(BatchMean)])
    with pytest.raises(AssertionError, match="between batch_size=3 and batch_size=1"):
        testing.assert_solver_conforms([_target(BatchMean)])


def test_parity_failure_names_the_difference_and_the_sample():
    with pytest.raises(AssertionError, match=r"max abs difference .* to the reference \(solver=euler\) exceeds tol 1e-06 at sample \d"):
        testing.assert_matches_reference(["solver=heun"], ["solver=euler"], tol=1e-6)
    # an exact reference: Heun on model=gaussian against a hand-written Heun loop from the same x_T
    def heun_loop(res):
        from framework.models.analytic import Gaussian

        g, x, s = Gaussian(), res.x_T, res.schedule.sigmas
        for a, b in zip(s, s[1:]):
            d = (x - g(x, torch.full((x.shape[0],), a, dtype=x.dtype))) / a
            xn = x + (b - a) * d
            if b > 0:
                xn = x + (b - a) * (d + (xn - g(xn, torch.full((x.shape[0],), b, dtype=x.dtype))) / b) / 2
            x = xn
        return x

    assert testing.assert_matches_reference(["solver=heun"], heun_loop, tol=1e-12) <= 1e-12


@dataclass
class PullTo:
    """Loss guidance on the latents of a model without a decoder: loss = mean (x0 − value)², step
    x ← x − scale·σ²·∇loss at each step's first evaluation (negative scale: the wrong sign)."""

    value: float = 1.0
    scale: float = 0.05

    @staticmethod
    def loss(x, value=1.0):
        return ((x - value) ** 2).flatten(1).mean(1)

    @hookimpl
    def configure(self, run):
        run.request_grad(self)

    @hookimpl
    def guidance(self, state, pred):
        if state.pred is not None:
            return pred
        d = pred.denoised.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.loss(d, self.value).sum() * self.scale, d)
        return pred.shifted(-(pred.sigma**2) * grad / (1 + pred.sigma**2))


PULL = f"+guidance.pull._target_={__name__}.PullTo"


def test_loss_guidance_kit_passes_and_fails():
    testing.assert_gradient_descends(PullTo.loss, torch.zeros(2, 16))
    testing.assert_loss_lowered([PULL], [], PullTo.loss, model="gaussian")
    with pytest.raises(AssertionError, match=r"guidance did not lower its loss: mean .* with it \(\+guidance.pull"):
        testing.assert_loss_lowered([PULL, "+guidance.pull.scale=-0.05"], [], PullTo.loss, model="gaussian")
    with pytest.raises(AssertionError, match=r"gradient of the loss is zero for sample\(s\) \[0, 1\]"):
        testing.assert_gradient_descends(lambda x: PullTo.loss(x.round()), torch.zeros(2, 16))
    with pytest.raises(AssertionError, match="the loss has no gradient with respect to its target"):
        testing.assert_gradient_descends(lambda x: PullTo.loss(x.detach()), torch.zeros(2, 16))


# ---------------------------------------------------------------------------------------------
# Built-in plugins pass the kit of their family (solvers: tests/plugins/test_solvers.py)
# ---------------------------------------------------------------------------------------------
MOMENTUM = sorted(p.stem for p in (CONF_DIR / "momentum").glob("*.yaml"))
SCHEDULES = sorted(p.stem for p in (CONF_DIR / "schedule").glob("*.yaml"))


def _momentum_solver(name: str) -> str:
    """The first single-evaluation solver the plugin composes with (the others are a ConfigError)."""
    for solver in ("euler", "ddim"):
        try:
            testing.sample([f"solver={solver}", f"momentum=[{name}]"], steps=1, num_samples=1, batch_size=1)
        except ConfigError:
            continue
        return solver
    raise AssertionError(f"momentum {name} composes with neither euler nor ddim")


@pytest.mark.parametrize("name", MOMENTUM)
def test_every_momentum_plugin_passes_the_kit(name):
    """NFE honest (momentum adds no evaluation), deterministic and batch-invariant on its first solver."""
    overrides = [f"solver={_momentum_solver(name)}", f"momentum=[{name}]"]
    res = testing.assert_solver_conforms(overrides)
    assert res.record["plugins"]["momentum"] == [name]


DISCRETE_ONLY = {"ddim_uniform", "simple", "uniform"}  # need a model with training timesteps
OWN_RANGE = {"vp"}  # k-diffusion's VP grid: its σ range comes from beta_d, beta_min, eps_s
FIXED = {"custom": (2,)}  # a given grid of 2 steps
FLOW_ONLY = {"flow_match"}  # a flow model's own grid, from σ = ∞ (t = 1): on the Gaussian's flow twin


def optimized_file(folder: Path) -> list[str]:
    """A schedule file for model=gaussian with log-uniform grids of 1, 2 and 7 steps (the kit's counts)."""
    import numpy as np
    from omegaconf import OmegaConf

    from framework.runs.schedule_file import model_fingerprint, write_schedule_file

    node = OmegaConf.load(Path(__file__).parents[2] / "conf" / "model" / "gaussian.yaml")
    model = testing.load_model("gaussian")
    grids = {str(n): {"steps": n, "sigmas": [*np.geomspace(model.sigma_max, model.sigma_min, n).tolist(), 0.0]}
             for n in (1, 2, 7)}
    grids["1"]["sigmas"] = [model.sigma_max, 0.0]
    write_schedule_file(folder / "grids.json", {"model": {"name": "gaussian", "fingerprint": model_fingerprint(node)},
                                                "grids": grids})
    # the kit hands the run a model object, which the run's config node does not describe: the
    # fingerprint check (tests/tools/test_schedule_opt.py) would compare it with the default model's
    return [f"schedule.file={folder / 'grids.json'}", "schedule.on_mismatch=warn"]


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_passes_the_kit(name, tmp_path):
    model = "tiny_random" if name in DISCRETE_ONLY else "gaussian"
    if name in FLOW_ONLY:
        from framework.models.analytic import Gaussian
        from framework.models.base import wrap_model

        model = wrap_model(Gaussian(parametrization="flow"))
    extra = optimized_file(tmp_path) if name == "optimized" else []  # its grids come from a file
    testing.assert_schedule_conforms([f"schedule={name}"] + extra, model=model, steps=FIXED.get(name, (1, 2, 7)),
                                     within_model_range=name not in OWN_RANGE | FLOW_ONLY)


@pytest.mark.slow
def test_color_loss_lowers_its_loss_on_the_bundled_model():
    from plugins.guidance.color_loss import ColorLoss

    blue = ColorLoss()
    loss = lambda images: (images[:, blue.channel] - blue.target).abs().flatten(1).mean(1)  # noqa: E731
    testing.assert_loss_lowered(["guidance=[cfg,color_loss]", "guidance.color_loss.every=1"], ["guidance=[cfg]"],
                                loss, model="bundled", steps=4)


def test_kit_takes_the_model_as_an_argument_not_an_override():
    with pytest.raises(ValueError, match="choose the model with the kit's model= argument"):
        testing.sample(["model=bundled"])
