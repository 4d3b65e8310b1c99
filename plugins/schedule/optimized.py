"""An optimised σ grid read from a schedule file written by ``samplerlab-optimize-schedule``
(GITS/OSS dynamic programming, AYS's KLUB, LD3-style learned grids; docs/optimisation.md).

The file holds one grid per NFE budget for one model, solver and method; the run's ``steps`` picks
the grid with that many steps (``nfe`` names a budget instead; ``steps`` must then agree). The
grid ends at 0 and starts at the file's σ_0 (x_T = init_noise·ε: σ_max·ε by default, √(1+σ_0²)·ε for a
grid optimised from a ``leading`` start). A file made for other weights
(its model fingerprint differs from the run's) is an error by default: a grid tuned for one
network, silently run on another, would be reported as "optimised" when it is not; set
``on_mismatch: warn`` to transfer a grid on purpose."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from framework.plugin import Choice, ConfigError, Schedule, hookimpl, model_fingerprint, read_schedule_file


class OnMismatch(Choice):
    error = "error"
    warn = "warn"


@dataclass
class Optimized:
    file: str = ""
    nfe: int | None = None
    on_mismatch: OnMismatch = OnMismatch.error

    input_files = ("file",)  # the run key follows the file's content

    def _content(self) -> dict:
        if not self.file:
            raise ConfigError("schedule=optimized needs schedule.file=<schedule file from samplerlab-optimize-schedule>")
        return read_schedule_file(self.file)

    @hookimpl
    def configure(self, run):
        content = self._content()
        want = content["model"].get("fingerprint")
        node = run.cfg.get("model")
        have = model_fingerprint(node) if node is not None else None
        if have is not None and want != have:
            msg = (f"schedule file {self.file} was made for model {content['model'].get('name')} weights {want}, "
                   f"this run's are {have}")
            if self.on_mismatch == "error":
                raise ConfigError(f"{msg}: remake the file for these weights, or set schedule.on_mismatch=warn to use it anyway")
            warnings.warn(msg, stacklevel=1)

    @hookimpl
    def schedule(self, model, steps):
        grids = self._content()["grids"]
        have = ", ".join(f"NFE {k}: steps={g['steps']}" for k, g in sorted(grids.items(), key=lambda kv: int(kv[0])))
        if self.nfe is not None:
            g = grids.get(str(self.nfe))
            if g is None:
                raise ConfigError(f"{self.file} has no grid for NFE {self.nfe} (it has {have})")
            if g["steps"] != steps:
                raise ConfigError(f"the grid for NFE {self.nfe} has {g['steps']} steps: set steps={g['steps']}")
        else:
            g = next((g for g in grids.values() if g["steps"] == steps), None)
            if g is None:
                raise ConfigError(f"{self.file} has no grid with steps={steps} (it has {have})")
        sig = tuple(float(s) for s in g["sigmas"])
        return Schedule(sig, None, float(g.get("init_noise", sig[0])))  # x_T = init_noise·ε (√(1+σ_0²) for start=leading)
