"""The model contract: what a model adapter (a plugin of the ``model`` group) provides.

The engine calls :meth:`Model.setup`, :meth:`Model.prepare_network` and :meth:`Model.prepare_schedule`
once per run, the ``predict`` hook (implemented here: classifier-free-guidance batching and the
count of network calls) at every evaluation, and :meth:`Model.output_latents` / :meth:`Model.decode`
once per batch. An adapter implements :meth:`Model.denoise_batch` (D(x, σ) for a batch) and, for
text-to-image models, :meth:`Model.encode_prompts` and :meth:`Model.decode`. The adapters
themselves (diffusers pipelines, analytic denoisers, any k-diffusion-style denoiser) live in
:mod:`framework.models`: they are the only code that knows a parametrisation.
"""
from __future__ import annotations

from typing import Any, ContextManager

import torch

from framework.core.errors import ConfigError
from framework.core.markers import hookimpl
from framework.core.perturb import BranchPrompt, Perturbation
from framework.core.state import Batch, Conditioning, Prediction, StepView

_OWN_COMPILED = object()  # network_for_call's default: the model's own compiled network


class Model:
    """Base class of model adapters (plugins of the ``model`` group)."""

    sigma_min: float
    sigma_max: float
    #: Shape of one sample's latent.
    latent_shape: tuple[int, ...]
    #: True when the model takes text prompts (and so can be guided by CFG).
    is_conditional: bool = False
    #: The discrete model's σ for each training timestep (ascending in t), or None if continuous.
    train_sigmas: torch.Tensor | None = None
    #: diffusers' steps_offset of a discrete model (1 for Stable Diffusion).
    steps_offset: int = 0
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        """Load weights (lazily) and move to the run's device and dtype."""
        self.device, self.dtype = device, dtype

    def prepare_network(self, compile: bool = False, mode: str | None = None, channels_last: bool = False) -> None:
        """Called once per run after :meth:`setup`: compile the network (``compile=true``, see
        :mod:`framework.models.compiled`) and choose its memory layout, or undo both (a model object
        may serve several runs). Models without a neural network refuse both options."""
        if compile or channels_last:
            option = "compile=true" if compile else "channels_last=true"
            raise ConfigError(f"{option}: model {type(self).__name__} has no neural network to compile or re-lay out; "
                              f"remove {option} (it applies to diffusers models and torch.nn.Module denoisers)")

    def network_for_call(self, eager: Any, compiled: Any = _OWN_COMPILED) -> Any:
        """The compiled network (``compiled``: by default the one :meth:`prepare_network` set as
        ``self._compiled``; a second network passes its own, None when it is not compiled) when there
        is one and no gradient is needed; else ``eager`` (loss guidance differentiates the eager
        module, and perturbed calls run the eager module, whose hooks a compiled graph would not see)."""
        if compiled is _OWN_COMPILED:
            compiled = getattr(self, "_compiled", None)
        return eager if compiled is None or torch.is_grad_enabled() or self._eager_only else compiled

    _eager_only: bool = False

    def prepare_schedule(self, schedule: Any) -> None:
        """Called once per run with the final grid (a :class:`Schedule`): place per-step constants
        (e.g. the timestep of every σ) on the device, so the steps create no tensors."""

    def denoise_batch(
        self, x: torch.Tensor, sigma: float, timestep: float | None, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """D(x, σ) for a batch (one model call)."""
        raise NotImplementedError

    # ---- compile=step (framework.core.graphstep) -----------------------------------------------
    def denoise_tensor(self, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor | None,
                       tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`denoise_batch` with σ (and the model time ``t``, from :meth:`time_input`) as 0-d
        device tensors, in tensor arithmetic only, calling the eager network: what ``compile=step``
        traces. An adapter is captured only when the class that defines its ``denoise_batch`` also
        defines this method (a subclass that changes ``denoise_batch`` is not captured until it
        says how)."""
        raise NotImplementedError

    def time_input(self, sigma: float, timestep: float | None) -> torch.Tensor | None:
        """The 0-d device tensor :meth:`denoise_tensor` receives as ``t`` for a grid σ (made once per
        run by :meth:`prepare_schedule`, looked up here), or None when the network takes σ itself."""
        return None

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning tensors of a list of prompts (conditional models only)."""
        raise ConfigError(f"{type(self).__name__} takes no prompts")

    has_decoder: bool = False

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor | None:
        """Images in [0, 1] from latents (unclamped, differentiable with ``clamp=False``), or None
        for models without a decoder."""
        return None

    def output_latents(self, x: torch.Tensor, sigma_last: float) -> torch.Tensor:
        """The latents a pipeline would decode from x at the grid's last σ (identity at σ = 0)."""
        return x

    def exact_solution(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor | None:
        """The exact (or high-accuracy reference) probability-flow ODE solution, if known."""
        return None

    # ---- perturbed evaluations (framework.core.perturb) ----------------------------------------
    #: Whether the adapter can apply a perturbation to a slice of the batch: then the CFG pair and the
    #: perturbed branches are one network call; else each perturbed branch is a call of its own.
    perturbs_slices: bool = True

    def perturbation_layers(self) -> list[str]:
        """The layers a :class:`Perturbation` indexes, by name, in index order (none: the model has no
        attention to perturb)."""
        return []

    def check_perturbation(self, perturbation: Perturbation) -> None:
        """Refuse, with one line, a perturbation this model cannot apply (called at ``configure``)."""
        layers = self.perturbation_layers()
        name = type(self).__name__
        if not layers:
            raise ConfigError(f"model {name} has no attention layers to perturb ({perturbation.kind}): perturbation guidance "
                              "needs a network model (bundled, sd15, sdxl, sd3, flux, tiny_*); remove the plugin")
        bad = [i for i in perturbation.layers if not 0 <= i < len(layers)]
        if bad:
            raise ConfigError(f"layer {bad[0]} does not exist: model {name} has layers 0–{len(layers) - 1} "
                              f"({layers[0]} … {layers[-1]}); choose layers in that range")

    def perturbed(self, plan: list[tuple[slice, Perturbation]], maps: dict[str, int]) -> ContextManager[dict[str, torch.Tensor]]:
        """A context in which the network's next call applies each perturbation of ``plan`` to its
        rows only and records the self-attention maps of ``maps`` (name → layer; the dict it yields
        fills in). Everything it installs is removed on exit, also when the call raises."""
        raise ConfigError(f"model {type(self).__name__} cannot perturb its network")

    def _call(self, x: torch.Tensor, sigma: float, t: float | None, tensors: dict[str, torch.Tensor],
              plan: list[tuple[slice, Perturbation]], maps: dict[str, int], batch: Batch, rows: int
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One network call over ``rows`` stacked inputs per sample, counted."""
        batch.unet_calls += 1
        batch.network_inputs += rows
        if not plan and not maps:
            return self.denoise_batch(x, sigma, t, tensors), {}
        with self.perturbed(plan, maps) as captured:
            self._eager_only = True
            try:
                return self.denoise_batch(x, sigma, t, tensors), captured
            finally:
                self._eager_only = False

    def evaluate(self, state: StepView, x: torch.Tensor, sigma: float, prompt: str = "cond",
                 perturbation: Perturbation | None = None) -> torch.Tensor:
        """One more network evaluation (one call, one input per sample, one NFE) at ``(x, σ)`` with
        the prompt or the negative prompt, optionally perturbed: the denoised, unguided. For plugins
        whose extra input depends on the evaluation itself (SAG's re-noised blurred prediction)."""
        cond = state.batch.cond
        tensors = {} if cond is None else cond.uncond if prompt == "uncond" else cond.tensors
        if tensors is None:
            raise ConfigError("an evaluation with the negative prompt needs run.request_uncond() in configure")
        state.batch.nfe += 1
        plan = [] if perturbation is None else [(slice(0, x.shape[0]), perturbation)]
        return self._call(x, sigma, state.schedule.timestep(sigma), tensors, plan, {}, state.batch, 1)[0]

    @hookimpl
    def predict(self, state: StepView, x: torch.Tensor, sigma: float, cond: Conditioning | None) -> Prediction:
        """One evaluation: the conditional pass, the unconditional one when ``cond.uncond`` is present,
        and the branches plugins requested (``run.request_branch``: perturbed, or on a prompt of their
        own, encoded once per batch) — one network call when the adapter perturbs slices
        (:attr:`perturbs_slices`), else the pair and the unperturbed branches plus one call per
        perturbed branch.
        ``batch.unet_calls`` counts the calls, ``batch.network_inputs`` the inputs per sample."""
        t = state.schedule.timestep(sigma)
        tensors = cond.tensors if cond is not None else {}
        run = getattr(state, "run", None)
        branches = [b for b in getattr(run, "branches", ()) if b.active(state, sigma)]
        maps: dict[str, int] = dict(getattr(run, "attention_maps", {}))
        uncond = None if cond is None else cond.uncond
        plain_uncond = uncond is not None and (getattr(run, "uncond_pass", True) or not getattr(run, "branches", ()))
        parts = ([uncond] if plain_uncond else []) + [tensors]  # type: ignore[list-item]
        n, batch = x.shape[0], state.batch
        if branches and uncond is None and any(b.prompt == BranchPrompt.uncond for b in branches):
            raise ConfigError("a branch on the negative prompt needs its encoding: request it with the branch")

        def rows(b):  # the conditioning of branch b
            if b.text is not None:
                return self._branch_prompts(state, n)[b.text]
            return uncond if b.prompt == BranchPrompt.uncond else tensors

        # unperturbed branches (own prompts) always join the stacked call; perturbed ones when the
        # adapter perturbs slices, else one call each
        together = [b for b in branches if b.perturbation is None or self.perturbs_slices]
        apart = [b for b in branches if not (b.perturbation is None or self.perturbs_slices)]
        base = len(parts)
        parts += [rows(b) for b in together]
        plan = [(slice(n * (base + k), n * (base + k + 1)), b.perturbation)
                for k, b in enumerate(together) if b.perturbation is not None]
        outs, captured = self._stacked(x, sigma, t, parts, plan, maps, batch)
        d = list(outs.chunk(len(parts)))
        found = {b.name: d[base + k] for k, b in enumerate(together)}
        d = d[:base]
        for b in apart:
            found[b.name] = self._call(x, sigma, t, rows(b), [(slice(0, n), b.perturbation)], {}, batch, 1)[0]
        attention = {name: {"cond": m[n * (len(d) - 1):n * len(d)], "uncond": m[:n] if len(d) == 2 else None}
                     for name, m in captured.items()}
        d_cond = d[-1]
        return Prediction(x=x, sigma=sigma, denoised=d_cond, cond_denoised=d_cond if len(d) == 2 else None,
                          uncond_denoised=d[0] if len(d) == 2 else None, branches=found, attention=attention)

    def _branch_prompts(self, state: StepView, n: int) -> dict[str, dict[str, torch.Tensor]]:
        """The conditioning of every branch prompt of the run (``Branch.text``), ``n`` rows each:
        encoded in one ``encode_prompts`` call at the batch's first evaluation, then reused."""
        store: dict[str, dict[str, torch.Tensor]] = state.batch.stash.get(self, dict, "branch_prompts")
        if not store:
            texts = list(dict.fromkeys(b.text for b in getattr(state.run, "branches", ()) if b.text is not None))
            encoded = self.encode_prompts([text for text in texts for _ in range(n)])
            store.update({text: {k: v[i * n:(i + 1) * n] for k, v in encoded.items()} for i, text in enumerate(texts)})
        return store

    def _stacked(self, x, sigma, t, parts, plan, maps, batch):
        """The network on x repeated once per conditioning in ``parts`` (concatenated once per batch)."""
        both = parts[0] if len(parts) == 1 else batch.stash.get(self, _Stacked).tensors(parts)
        xs = x if len(parts) == 1 else torch.cat([x] * len(parts))
        return self._call(xs, sigma, t, both, plan, maps, batch, len(parts))

    #: The space of the network's raw output, which diffusers' guiders act on: ``epsilon`` here (the
    #: σ-space noise ε = (x − D)/σ, a VP ε-model's output), ``v_prediction``, ``flow`` (a flow model's
    #: velocity v ≈ ε − x0) or ``x0`` (a denoiser that returns D itself) where an adapter overrides
    #: :meth:`to_native` / :meth:`from_native`.
    native_space: str = "epsilon"

    def to_native(self, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
        """The network output (in :attr:`native_space`) that gives ``denoised`` at the state x and σ:
        here ε = (x − D)/σ, the inverse of an ε-model's D = x − σ·ε. At σ = ∞ (where ε is not
        defined by D) the limit up to a common factor, x − D: the guidance methods that are
        homogeneous of degree one in the prediction pair combine it exactly as ε."""
        return x - denoised if sigma == float("inf") else (x - denoised) / sigma

    def from_native(self, x: torch.Tensor, sigma: float, native: torch.Tensor) -> torch.Tensor:
        """D from a prediction in :attr:`native_space` (the inverse of :meth:`to_native`)."""
        return x - native if sigma == float("inf") else x - sigma * native


class _Stacked:
    """The stacked conditioning tensors of a batch ([uncond; cond; branches…]), concatenated once per
    batch (not per step): reused while the same tensor objects come in (kept in the batch's stash)."""

    def __init__(self) -> None:
        self.parts: list[list[torch.Tensor]] = []
        self.both: dict[str, torch.Tensor] = {}

    def tensors(self, dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        parts = [[d[k] for d in dicts] for k in dicts[-1]]
        if len(parts) != len(self.parts) or any(len(a) != len(b) or any(u is not v for u, v in zip(a, b))
                                                for a, b in zip(parts, self.parts)):
            self.parts = parts
            self.both = {k: torch.cat(p) for k, p in zip(dicts[-1], parts)}
        return self.both

    def __deepcopy__(self, memo: dict) -> "_Stacked":
        """Itself: a cache of its inputs' concatenation, which a copied stash (a trajectory branched, as the schedule
        optimisers do at every node) may share — a copy would only hold the encoding again (GBs on a long teacher)."""
        return self
