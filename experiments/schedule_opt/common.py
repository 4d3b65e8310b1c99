"""Overrides shared by the study's runs (kept apart so the study and a pre-started reference agree)."""
from __future__ import annotations


def quoted(items) -> str:
    """A Hydra list of quoted strings."""
    return "[" + ",".join("'" + str(s).replace("'", "\\'") + "'" for s in items) + "]"


def base_overrides(model: str, dtype: str, prompts, seed: int, n: int) -> list[str]:
    """A held-out (or calibration) set of ``n`` samples as samplerlab overrides, one batch."""
    out = [f"model={model}", f"dtype={dtype}", f"num_samples={n}", f"batch_size={n}", f"seed={seed}",
           "callback=[]", "save_images=false", "device=cpu"]
    if model in ("mixture", "gaussian"):
        out.append("guidance=[]")
    else:
        out.append(f"prompts={quoted(prompts)}")
    return out


def reference_overrides(sigma_max: float, sigma_min: float, rtol: float, atol: float,
                        init_noise: float | None = None) -> list[str]:
    """``solver=reference`` from σ_max (x_T = σ_max·ε, or ``init_noise``·ε) to σ_min, then D there:
    the final step every fixed-step solver takes on a grid ending [σ_min, 0]. A grid that starts
    below the model's σ_max (diffusers' ``leading`` spacing) gets a reference from its own start."""
    scale = sigma_max if init_noise is None else init_noise
    return ["solver=reference", f"solver.rtol={rtol!r}", f"solver.atol={atol!r}", "solver.final=denoise",
            "schedule=custom", f"schedule.sigmas=[{sigma_max!r},{sigma_min!r},0.0]", f"schedule.init_noise={scale!r}",
            "steps=2"]
