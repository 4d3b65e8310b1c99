"""What perturbation-guidance plugins share (PAG, SEG, SLG; docs/guidance.md, "Inside the network").

A plugin of this family asks, in ``configure``, for one perturbed branch of every evaluation in its
window (``run.request_branch``) and adds the published guidance term to the prediction:

    D ← D + scale·(D_c − D_pert)

where D is what the guidance plugins before it made of the evaluation (CFG's
D_u + s·(D_c − D_u), or D_c without a CFG plugin) and D_c the conditional prediction. With ``cfg``
before it this is the papers' (and diffusers' guiders') combined rule
D = D_u + s·(D_c − D_u) + scale·(D_c − D_pert); without it, D_c + scale·(D_c − D_pert) (PAG's eq. in
Ahn et al. 2024, diffusers' ``use_original_formulation=True``). Linear in D, so the same in ε or v.

Window: steps i with ⌊start·N⌋ ≤ i < ⌊stop·N⌋ of the run's N steps (every evaluation of those
steps); outside it no branch is evaluated and D is unchanged. Layers: indices into the model's
``perturbation_layers()``; ``null`` picks the model's middle layers (a UNet's mid-block blocks, else
the middle transformer block).
"""
from __future__ import annotations

from typing import Any, ClassVar

from framework.bases.guidance import UncondGuidance
from framework.core.errors import ConfigError
from framework.core.markers import hookimpl
from framework.core.perturb import Perturbation


def default_layers(model: Any) -> list[int]:
    """The model's middle layers: a UNet's mid-block transformer blocks, else the middle one."""
    names = model.perturbation_layers()
    mid = [i for i, n in enumerate(names) if n.startswith("mid_block")]
    return mid or ([len(names) // 2] if names else [0])


def step_window(start: float, stop: float, index: int, steps: int) -> bool:
    """Whether step ``index`` of ``steps`` lies in ⌊start·N⌋ ≤ i < ⌊stop·N⌋."""
    return int(start * steps) <= index < int(stop * steps)


def check_window(name: str, start: float, stop: float) -> None:
    if not 0.0 <= start < stop <= 1.0:
        raise ConfigError(f"guidance.{name}: need 0 ≤ start < stop ≤ 1 (fractions of the steps), got start={start}, stop={stop}")


class PerturbationGuidance:
    """Base of PAG, SEG and SLG: subclasses are dataclasses with ``scale``, ``layers``, ``start``,
    ``stop`` and say which :class:`Perturbation` their branch takes."""

    #: The branch's name in ``pred.branches`` (the plugin's name).
    branch: ClassVar[str] = ""
    scale: float
    layers: list[int] | None
    start: float
    stop: float

    def perturbation(self, layers: tuple[int, ...]) -> Perturbation:
        raise NotImplementedError

    def resolved_layers(self, model: Any) -> Any:
        """The configured layers (a list, or one index), or the model's middle ones."""
        return default_layers(model) if self.layers is None else self.layers

    def active(self, state: Any, sigma: float = 0.0) -> bool:
        return step_window(self.start, self.stop, state.index, state.schedule.steps)

    @hookimpl
    def configure(self, run) -> None:
        check_window(self.branch, self.start, self.stop)
        guidance = [e for e in run.plugins.by_group("guidance")]
        mine = next(k for k, e in enumerate(guidance) if e.obj is self)
        later = [e.name for e in guidance[mine + 1:] if isinstance(e.obj, UncondGuidance)]
        if later:
            raise ConfigError(f"guidance {later[0]} comes after {self.branch} and would overwrite its term: write "
                              f"guidance=[{later[0]},{self.branch}] (the CFG combiner first)")
        if self.scale == 0:
            return
        run.request_branch(self.branch, self.perturbation(self.resolved_layers(run.model)), when=self.active)

    @hookimpl
    def guidance(self, state, pred):
        perturbed = pred.branches.get(self.branch)
        if perturbed is None:
            return pred
        cond = pred.cond_denoised if pred.cond_denoised is not None else pred.denoised
        return pred.with_denoised(pred.denoised + self.scale * (cond - perturbed))
