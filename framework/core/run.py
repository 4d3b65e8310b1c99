"""The run as plugins see it (:class:`Run`), the hooks it calls (:class:`Hooks`) and what it returns
(:class:`Result`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from framework.core.errors import ConfigError
from framework.core.model import Model
from framework.core.perturb import Branch, BranchPrompt, Perturbation
from framework.core.registry import PluginSet
from framework.core.settings import Settings
from framework.core.state import Schedule, Stash

#: (plugin name, bound hook function)
Call = tuple[str, Callable[..., Any]]


@dataclass(frozen=True)
class Hooks:
    """Every per-step hook's implementations, resolved once per run in config order."""

    before_step: list[Call]
    after_step: list[Call]
    momentum: list[Call]
    guidance: list[tuple[str, Callable[..., Any], bool]]  # (name, hook, runs with gradients)
    predict: Call
    step: Call


class Run:
    """One run: its config and settings, the plugins, the model, the device and dtype, the metrics
    plugins report, and what plugins declare in ``configure``.

    ``stash`` holds per-run private state of plugins (``run.stash.get(self, factory)``); state of
    one trajectory lives in the batch's stash (``state.stash``)."""

    def __init__(self, cfg: DictConfig, settings: Settings, plugins: PluginSet, device: torch.device):
        self.cfg = cfg
        self.settings = settings
        self.plugins = plugins
        self.model: Model = plugins.by_group("model")[0].obj  # type: ignore[assignment]
        self.device = device
        self.dtype: torch.dtype = getattr(torch, str(settings.dtype))
        self.metrics: dict[str, float] = {}
        self.output_dir: Path | None = None
        self.schedule: Schedule | None = None  # the grid every batch samples on, once it is made
        self.hooks: Hooks | None = None  # resolved by the engine after ``configure``
        self.stash = Stash()
        self.needs_uncond = False  # encode the negative prompt
        self.uncond_pass = False  # evaluate it unperturbed (CFG); branches may use it without
        self.branches: list[Branch] = []
        self.attention_maps: dict[str, int] = {}  # name → layer whose self-attention maps are captured
        self.finite_checks = False
        self.step_capture: Any = None  # compile=step: the captured step (framework.core.graphstep)
        self.compile_report: dict[str, Any] | None = None  # compile=step: record.json's "compile"
        self._grad_plugins: set[int] = set()

    # declarations made in ``configure``
    def request_uncond(self) -> None:
        """Ask the model adapter to batch the unconditional (negative-prompt) pass."""
        self.needs_uncond = self.uncond_pass = True

    def request_branch(self, name: str, perturbation: Perturbation | None = None, prompt: str = "cond",
                       when: Callable[[Any, float], bool] | None = None, text: str | None = None) -> None:
        """Ask the model adapter for an extra branch of every evaluation (where ``when(state, σ)``
        holds): the network at the same (x, σ) with ``perturbation`` applied inside it (or none),
        on the prompt (``cond``), the negative prompt (``uncond``) or a prompt of its own
        (``text``, encoded once per batch by the model); its denoised is ``pred.branches[name]``
        (:mod:`framework.core.perturb`). The model checks the layers now."""
        if any(b.name == name for b in self.branches):
            raise ConfigError(f"two plugins request the network branch '{name}': give them different names")
        if perturbation is None and text is None:
            raise ConfigError(f"the network branch '{name}' needs a perturbation or a prompt of its own (text=...)")
        if text is not None:
            if not isinstance(text, str):
                raise ConfigError(f"the network branch '{name}': its prompt must be a string, got {text!r}")
            if str(prompt) != BranchPrompt.cond:
                raise ConfigError(f"the network branch '{name}' has a prompt of its own: leave prompt='cond'")
            if not self.model.is_conditional:
                raise ConfigError(f"the network branch '{name}' has a prompt, but model {type(self.model).__name__} "
                                  "takes no prompts: use a text-to-image model (sd15, sdxl, tiny_random, …)")
        branch = Branch(name, perturbation, BranchPrompt(str(prompt)), when, text)
        if perturbation is not None:
            self.model.check_perturbation(perturbation)
        self.branches.append(branch)
        if branch.prompt == BranchPrompt.uncond:
            self.needs_uncond = True

    def request_attention_map(self, name: str, layer: int) -> None:
        """Capture the self-attention probabilities of model layer ``layer`` (averaged over heads) at
        every evaluation, unperturbed: ``pred.attention[name]`` (SAG's mask)."""
        self.model.check_perturbation(Perturbation("identity_attention", (layer,)))
        self.attention_maps[name] = layer

    def request_grad(self, plugin: object) -> None:
        """Run ``plugin``'s guidance hook with gradients enabled."""
        self._grad_plugins.add(id(plugin))

    def wants_grad(self, plugin: object) -> bool:
        return id(plugin) in self._grad_plugins

    def request_finite_checks(self) -> None:
        """Check every hook's output for NaN/Inf on the device (``NonFinite.of(batch)`` reads it)."""
        self.finite_checks = True


@dataclass
class Result:
    """What a run returns: initial noisy latents, final latents, decoded images (or None), record.

    Row ``r`` of the tensors is global sample ``indices[r]`` (all samples unless sharded).
    ``resumed`` lists the samples read back from the run folder instead of being generated;
    ``skipped`` is true when the whole run was already finished there. ``failures`` says why each
    failed sample failed (step, σ and plugin of its first non-finite value).
    """

    x_T: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor | None
    record: dict[str, Any]
    schedule: Schedule
    failed: list[int] = field(default_factory=list)  # global indices of failed samples (see failures)
    indices: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    skipped: bool = False
    failures: dict[int, str] = field(default_factory=dict)
