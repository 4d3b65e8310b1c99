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


def reference_overrides(sigma_max: float, sigma_min: float, rtol: float, atol: float) -> list[str]:
    """``solver=reference`` from σ_max (x_T = σ_max·ε) to σ_min, then D there: the final step every
    fixed-step solver takes on a grid ending [σ_min, 0]."""
    return ["solver=reference", f"solver.rtol={rtol!r}", f"solver.atol={atol!r}", "solver.final=denoise",
            "schedule=custom", f"schedule.sigmas=[{sigma_max!r},{sigma_min!r},0.0]", f"schedule.init_noise={sigma_max!r}",
            "steps=2"]
