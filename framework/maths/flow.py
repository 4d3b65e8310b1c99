"""Flow-matching grids: diffusers' FlowMatchEulerDiscreteScheduler's σ's from its config alone, and
the resolution-dependent shift μ of Flux and dynamic-shift SD3.

A flow model's time t ∈ [0, 1] is σ = t/(1 − t) in σ-space (:func:`framework.maths.sigmas.flow_sigma`).
The schedulers' shifts are constant factors on σ: the static shift t' = s·t/(1 + (s − 1)·t) is
σ' = s·σ, the exponential time shift e^μ/(e^μ + (1/t − 1)) is σ' = e^μ·σ, the linear one μ/(μ + (1/t − 1))
is σ' = μ·σ (:func:`sigma_factor`). ``shift_terminal`` is not a constant factor.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from framework.core.errors import ConfigError

#: FlowMatchEulerDiscreteScheduler's defaults (diffusers 0.42): what a flow model without a
#: scheduler config (the analytic models' flow twin) is sampled with.
FLOW_MATCH_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, shift_terminal=None, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, time_shift_type="exponential",
)
SHIFT_TYPES = ("exponential", "linear")


def flow_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A flow scheduler's config completed with FlowMatchEuler's defaults and checked: the shift
    mode, the shift and the number of training steps (one line naming the fix otherwise)."""
    out = {**FLOW_MATCH_DEFAULTS, **{k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")}}
    if out.get("time_shift_type") not in SHIFT_TYPES:
        raise ConfigError(f"the scheduler config's time_shift_type '{out.get('time_shift_type')}' is not a flow shift mode: "
                          f"use {' or '.join(SHIFT_TYPES)} (scheduler/scheduler_config.json)")
    if not float(out["shift"]) > 0 or int(out["num_train_timesteps"]) < 2:
        raise ConfigError(f"the scheduler config needs shift > 0 and num_train_timesteps ≥ 2, got {out['shift']} "
                          f"and {out['num_train_timesteps']} (scheduler/scheduler_config.json)")
    return out


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """μ, linear in the number of image tokens: base_shift at base_seq_len, max_shift at max_seq_len
    (diffusers' ``calculate_shift`` of the Flux and SD3 pipelines)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def sigma_factor(config: Mapping[str, Any], mu: float | None) -> float:
    """The constant factor the config's shift puts on σ: s (static), e^μ or μ (dynamic,
    exponential or linear ``time_shift_type``)."""
    if not config.get("use_dynamic_shifting"):
        return float(config["shift"])
    if mu is None:
        raise ConfigError("a dynamically shifted flow scheduler needs μ (the image's token count): none was given")
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else float(mu)


def flow_match_sigmas(config: Mapping[str, Any], steps: int, mu: float | None = None,
                      sigmas: Sequence[float] | None = None) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler's ``sigmas`` (t-space, N + 1 values ending at 0, float32)
    after ``set_timesteps(steps, mu=mu, sigmas=sigmas)``, from its config alone, bit for bit:
    the default grid t = shift(linspace(1, shift(t_min), N)) (the end shifted twice), or the given
    ``sigmas`` (Flux: linspace(1, 1/N, N)) shifted once; ``shift_terminal``; the Karras, exponential
    and beta ramps, built in t between the shifted grid's ends."""
    n_train, shift = config["num_train_timesteps"], config["shift"]
    train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / n_train      # __init__: t = 1 … 1/n_train
    if not config["use_dynamic_shifting"]:
        train = shift * train / (1 + (shift - 1) * train)                           # shifted once at __init__
    if sigmas is None:
        t = np.linspace(float(train[0]) * n_train, float(train[-1]) * n_train, steps) / n_train
    else:
        t = np.asarray(sigmas, dtype=np.float32)
    if config["use_dynamic_shifting"]:
        e = sigma_factor(config, mu)
        t = e / (e + (1 / t - 1))                                                   # σ' = e^μ·σ (or μ·σ)
    else:
        t = shift * t / (1 + (shift - 1) * t)                                       # σ' = shift·σ
    if config.get("shift_terminal"):
        t = 1 - (1 - t) / ((1 - t[-1]) / (1 - config["shift_terminal"]))
    t_max, t_min, n = float(t[0]), float(t[-1]), len(t)
    if config.get("use_karras_sigmas"):
        t = (t_max ** (1 / 7) + np.linspace(0, 1, n) * (t_min ** (1 / 7) - t_max ** (1 / 7))) ** 7
    elif config.get("use_exponential_sigmas"):
        t = np.exp(np.linspace(math.log(t_max), math.log(t_min), n))
    elif config.get("use_beta_sigmas"):
        import scipy.stats

        t = np.array([t_min + q * (t_max - t_min) for q in scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)])
    return np.concatenate([np.asarray(t, dtype=np.float32), np.zeros(1, dtype=np.float32)])
