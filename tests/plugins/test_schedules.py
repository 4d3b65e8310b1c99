"""The schedule zoo, parametrised over conf/schedule: every schedule gives a valid grid for every step
count, and each matches its reference formula (diffusers' converters, the published AYS grid,
ComfyUI's schedulers re-stated here)."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from framework.core.errors import ConfigError
from framework.core.registry import instantiate
from framework.maths.sigmas import train_sigmas_from_alphas_cumprod
from framework.core.state import Schedule

CONF = Path(__file__).parents[2] / "conf" / "schedule"
SCHEDULES = sorted(p.stem for p in CONF.glob("*.yaml"))
DISCRETE_ONLY = {"uniform", "simple", "ddim_uniform"}
FLOW_ONLY = {"flow_match"}  # a flow model's own grid: tests/models/test_families.py
FILE_ONLY = {"optimized"}  # grids from a schedule file: tests/tools/test_schedule_opt.py


def build(name: str, **changes):
    node = OmegaConf.load(CONF / f"{name}.yaml")
    for k, v in changes.items():
        node[k] = v
    return instantiate(node, f"schedule={name}")


@pytest.fixture(scope="module")
def sd():
    """A stand-in for SD 1.5's discrete model: its 1000 training σ's and steps_offset."""
    from diffusers import DDPMScheduler

    from framework.models.tiny import SD_SCHEDULER

    ac = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"}).alphas_cumprod
    train = train_sigmas_from_alphas_cumprod(ac)
    return SimpleNamespace(train_sigmas=train, steps_offset=1, sigma_min=float(train[0]), sigma_max=float(train[-1]))


CONTINUOUS = SimpleNamespace(train_sigmas=None, steps_offset=0, sigma_min=0.002, sigma_max=80.0)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 10, 37])
def test_every_schedule_gives_a_valid_grid(name, steps, sd):
    if name in FILE_ONLY:
        pytest.skip("its grids come from a schedule file (tests/tools/test_schedule_opt.py)")
    kw = {"sigmas": [14.6, 1.0, 0.0]} if name == "custom" else {}
    plugin = build(name, **kw)
    if name == "custom":
        steps = 2
    for model in (sd, CONTINUOUS):
        if name in FLOW_ONLY or (name in DISCRETE_ONLY and model is CONTINUOUS):
            with pytest.raises(ConfigError):
                plugin.schedule(model=model, steps=steps)
            continue
        s = plugin.schedule(model=model, steps=steps)
        assert isinstance(s, Schedule) and s.steps == steps
        assert all(a > b for a, b in zip(s.sigmas, s.sigmas[1:]))
        assert s.sigmas[-1] == 0.0 and s.init_noise_scale >= s.sigmas[0] > 0


def test_exponential_matches_diffusers_converter():
    from diffusers import EulerDiscreteScheduler

    s = build("exponential").schedule(model=CONTINUOUS, steps=12)
    ref = EulerDiscreteScheduler()._convert_to_exponential(np.array([80.0, 0.002]), 12)
    assert s.sigmas[:-1] == pytest.approx(list(ref), rel=1e-12)
    assert np.allclose(np.diff(np.log(s.sigmas[:-1])), np.log(0.002 / 80) / 11)  # uniform in log-SNR
    no_zero = build("exponential", final_zero=False).schedule(model=CONTINUOUS, steps=12)
    assert no_zero.sigmas[-1] == pytest.approx(0.002) and no_zero.steps == 12


def test_beta_matches_diffusers_converter():
    from diffusers import EulerDiscreteScheduler

    s = build("beta").schedule(model=CONTINUOUS, steps=9)
    ref = EulerDiscreteScheduler()._convert_to_beta(np.array([80.0, 0.002]), 9)
    assert s.sigmas[:-1] == pytest.approx(list(ref), rel=1e-10)


def test_polyexponential_rho1_is_exponential():
    a = build("polyexponential").schedule(model=CONTINUOUS, steps=8)
    b = build("exponential").schedule(model=CONTINUOUS, steps=8)
    assert a.sigmas == pytest.approx(b.sigmas, rel=1e-12)


def test_vp_matches_its_formula():
    s = build("vp").schedule(model=CONTINUOUS, steps=5)
    t = np.linspace(1, 1e-3, 5)
    assert s.sigmas[:-1] == pytest.approx(list(np.sqrt(np.exp(19.9 * t**2 / 2 + 0.1 * t) - 1)), rel=1e-12)


def test_kl_optimal_is_uniform_in_atan_sigma():
    s = build("kl_optimal").schedule(model=CONTINUOUS, steps=7)
    assert np.allclose(np.diff(np.arctan(s.sigmas[:-1])), (math.atan(0.002) - math.atan(80)) / 6)


def test_ays_is_the_published_sd15_grid_and_interpolates_log_linearly():
    from plugins.schedule.ays import SD15

    ten = build("ays").schedule(model=CONTINUOUS, steps=10)
    assert ten.sigmas[:-1] == pytest.approx(SD15[:-1]) and ten.sigmas[-1] == 0  # ComfyUI: last σ → 0
    twenty = build("ays").schedule(model=CONTINUOUS, steps=20)
    assert twenty.sigmas[0] == pytest.approx(SD15[0])
    assert twenty.sigmas[2] == pytest.approx(SD15[1])  # every other point of the 21-point grid is published
    assert twenty.sigmas[1] == pytest.approx(math.sqrt(SD15[0] * SD15[1]))  # log-linear in between


def test_time_uniform_on_continuous_model_is_karras():
    from plugins.schedule.karras import Karras

    for rho in (1.0, 7.0):
        a = build("time_uniform", rho=rho).schedule(model=CONTINUOUS, steps=9)
        b = Karras(rho=rho).schedule(model=CONTINUOUS, steps=9)
        assert a.sigmas == pytest.approx(b.sigmas, rel=1e-9)


def _log_sigma(sd, t: float) -> float:
    ls = np.log(np.asarray(sd.train_sigmas, dtype=np.float64))
    lo = int(math.floor(t))
    hi = min(lo + 1, len(ls) - 1)
    return float(np.exp(ls[lo] + (t - lo) * (ls[hi] - ls[lo])))


def test_comfyui_normal_and_sgm_uniform(sd):
    """ComfyUI: normal = σ(linspace(T−1, 0, N)); sgm_uniform = σ(linspace(T−1, 0, N+1)[:-1]); then 0;
    both start from √(1+σ₀²)-scaled noise."""
    for name, times in (("normal", np.linspace(999, 0, 10)), ("sgm_uniform", np.linspace(999, 0, 11)[:-1])):
        s = build(name).schedule(model=sd, steps=10)
        assert s.sigmas[:-1] == pytest.approx([_log_sigma(sd, t) for t in times], rel=1e-9)
        assert s.timesteps[:-1] == pytest.approx(list(times))
        assert s.init_noise_scale == pytest.approx(math.sqrt(1 + s.sigmas[0] ** 2))


def test_comfyui_simple_and_ddim_uniform(sd):
    train = [float(v) for v in sd.train_sigmas]
    n = 10
    ss = len(train) / n
    simple = [train[-(1 + int(i * ss))] for i in range(n)]
    ddim, x = [], 1
    while x < len(train):
        ddim.append(train[x])
        x += max(len(train) // n, 1)
    assert build("simple").schedule(model=sd, steps=n).sigmas[:-1] == pytest.approx(simple, rel=1e-6)
    assert build("ddim_uniform").schedule(model=sd, steps=n).sigmas[:-1] == pytest.approx(ddim[::-1], rel=1e-6)


def test_custom_replays_grid_and_checks_steps(sd):
    c = build("custom", sigmas=[10.0, 2.0, 0.5], timesteps=[900.0, 500.0, None], init_noise="vp")
    s = c.schedule(model=sd, steps=2)
    assert s.sigmas == (10.0, 2.0, 0.5) and s.timestep(2.0) == 500.0
    assert s.init_noise_scale == pytest.approx(math.sqrt(101))
    with pytest.raises(ConfigError, match="set steps=2"):
        c.schedule(model=sd, steps=3)
    with pytest.raises(ConfigError, match="init_noise"):
        build("custom", init_noise="loud")


def test_bad_schedule_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="sigma_min < sigma_max"):
        build("exponential", sigma_min=5.0, sigma_max=1.0).schedule(model=CONTINUOUS, steps=4)
    with pytest.raises(ConfigError, match="rho"):
        build("time_uniform", rho=0.0)


@pytest.mark.parametrize("name,key,bad,allowed", [
    ("karras", "init_noise", "loud", "sigma, vp"),
    ("exponential", "init_noise", "loud", "sigma, vp"),
    ("uniform", "spacing", "middle", "linspace, leading, trailing"),
    ("uniform", "final", "one", "zero, alpha0"),
    ("uniform", "init_noise", "loud", "auto, sigma, vp"),
])
def test_fixed_choice_options_are_typed(name, key, bad, allowed):
    """A string option from a fixed set is an enum field: the schema rejects other values in one line
    naming the allowed ones, and the value still compares equal to (and prints as) its string."""
    one_line = rf"^schedule={name}\.{key}: Invalid value '{bad}', expected one of \[{allowed}\]$"
    with pytest.raises(ConfigError, match=one_line):
        build(name, **{key: bad})
    good = allowed.split(", ")[-1]
    value = getattr(build(name, **{key: good}), key)
    assert value == good and f"{value}" == good
