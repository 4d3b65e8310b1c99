"""Overrides shared by the study's runs (kept apart so the study and a pre-started reference agree), and the
ratio's sampling interval."""
from __future__ import annotations

from collections.abc import Sequence


def quoted(items) -> str:
    """A Hydra list of quoted strings."""
    return "[" + ",".join("'" + str(s).replace("'", "\\'") + "'" for s in items) + "]"


def base_overrides(model: str, dtype: str, prompts, seed: int, n: int, batch: int | None = None) -> list[str]:
    """A held-out (or calibration) set of ``n`` samples as samplerlab overrides, one batch (or batches of ``batch``:
    the same x_T, each sample's noise is its own)."""
    out = [f"model={model}", f"dtype={dtype}", f"num_samples={n}", f"batch_size={batch or n}", f"seed={seed}",
           "callback=[]", "save_images=false", "device=cpu"]
    if model in ("mixture", "gaussian"):
        out.append("guidance=[]")
    else:
        out.append(f"prompts={quoted(prompts)}")
    return out


def pair_key(model: str, pair: str, nfe: int) -> str:
    """A (method spec, solver) pair's entry in a probe record (experiments.schedule_opt.probe): the VP model's
    unprefixed, as its first records were."""
    return f"{pair}/{int(nfe)}" if model == "bundled" else f"{model}/{pair}/{int(nfe)}"


def reference_overrides(sigma_max: float, sigma_min: float, rtol: float, atol: float,
                        init_noise: float | None = None) -> list[str]:
    """``solver=reference`` from σ_max (x_T = σ_max·ε, or ``init_noise``·ε) to σ_min, then D there:
    the final step every fixed-step solver takes on a grid ending [σ_min, 0]. A grid that starts
    below the model's σ_max (diffusers' ``leading`` spacing) gets a reference from its own start."""
    scale = sigma_max if init_noise is None else init_noise
    return ["solver=reference", f"solver.rtol={rtol!r}", f"solver.atol={atol!r}", "solver.final=denoise",
            "schedule=custom", f"schedule.sigmas=[{sigma_max!r},{sigma_min!r},0.0]", f"schedule.init_noise={scale!r}",
            "steps=2"]


def ratio_interval(stock: Sequence[float], optimised: Sequence[float], level: float = 0.90, draws: int = 4000,
                   seed: int = 0) -> list[float]:
    """The ``level`` interval of the pooled-RMSE ratio optimised / stock over held-out sets like this one: a paired
    bootstrap of the per-sample RMSEs (the same x_T per sample). A few samples that land in another mode carry the
    pooled RMSE, so on 128 samples the ratio is known to about ±0.1–0.2."""
    import numpy as np

    a, b = np.square(np.asarray(stock, dtype=float)), np.square(np.asarray(optimised, dtype=float))
    if a.shape != b.shape or a.size < 2:
        raise ValueError("ratio_interval needs the per-sample errors of the same held-out samples, two at least")
    idx = np.random.default_rng(seed).integers(0, a.size, (draws, a.size))
    r = np.sqrt(b[idx].mean(1) / a[idx].mean(1))
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(r, tail)), float(np.percentile(r, 100 - tail))]
