"""Generate the hook reference (docs/hooks.md) from framework/core/hookspecs.py.

    python -m framework.tools.hookref > docs/hooks.md

A test keeps the committed file in sync with the specs.
"""
from __future__ import annotations

import inspect

from framework.core import hookspecs

#: Which plugin families implement each hook (for the reader; the specs define the contract).
FAMILIES = {
    "configure": "any (compatibility checks, declaring needs)",
    "run_start": "metrics, logger, callback (previews)",
    "batch_start": "metrics (timers)",
    "adjust_images": "guidance (inpainting: the known pixels pasted back)",
    "batch_end": "metrics, logger, callback (savers), the built-in progress bar",
    "run_end": "metrics (and the built-in exact error), logger, callback (previews)",
    "conditioning": "conditioning",
    "schedule": "schedule (or a solver that owns its grid)",
    "adjust_schedule": "guidance (img2img strength)",
    "init_latents": "guidance (img2img, inpainting)",
    "before_step": "callback (churn, previews), solver (optimize distill: re-noising)",
    "predict": "model",
    "guidance": "guidance (CFG variants, loss guidance)",
    "momentum": "momentum",
    "step": "solver",
    "after_step": "callback (NaN guard, previews), momentum (history), the built-in progress bar",
}


def hook_names() -> list[str]:
    """Hook names in the order the spec module defines them."""
    return [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "samplerlab_spec")]


def render() -> str:
    lines = [
        "# Hook reference",
        "",
        "Generated from `framework/core/hookspecs.py` by `python -m framework.tools.hookref > docs/hooks.md`;",
        "a test fails when this file and the specs disagree.",
        "",
        inspect.getdoc(hookspecs) or "",
        "",
        "| hook | implemented by |",
        "| --- | --- |",
    ]
    lines += [f"| `{n}` | {FAMILIES.get(n, '')} |" for n in hook_names()]
    for name in hook_names():
        fn = getattr(hookspecs, name)
        sig = str(inspect.signature(fn)).replace("'", "")
        lines += ["", f"## `{name}{sig}`", "", inspect.getdoc(fn) or ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
