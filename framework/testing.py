"""The conformance kit: pytest helpers for plugin authors' test suites (and our own).

Every ``assert_*`` helper runs the sampler through the ordinary config path (the overrides you
would type on the command line, e.g. ``["solver=ralston"]``) and raises ``AssertionError`` with a
message that says what is wrong and what to look at::

    from framework import testing

    def test_order():
        testing.assert_order(["solver=ralston"], expected=2)              # analytic model, float64

    def test_honest():
        testing.assert_solver_conforms(["solver=ralston"])                # determinism, batch, NFE

The analytic models (``model="gaussian"``, ``model="mixture"``) have an exact (or high-accuracy
reference) ODE solution, so errors are measured, not estimated; runs on them use float64. Any
other model is named by its config choice (``"bundled"``, ``"tiny_random"``) or passed as an
object (a model adapter, or anything following k-diffusion's denoiser protocol).

Each helper composes its config once and varies only the top-level keys (steps, seed,
num_samples, batch_size) between runs, so a whole check costs about one Hydra composition.

``diffusers_loop`` is the reference every parity check with diffusers compares against: the
sampling loop of diffusers' StableDiffusionPipeline written out by hand (prompt encoding, batched
CFG pass, ``scale_model_input``, ``scheduler.step``), optionally followed by the VAE decode.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from framework.core.memo import Memo

ANALYTIC = ("gaussian", "mixture")

__all__ = [
    "sample", "load_model", "count_evaluations", "measure_order", "assert_order", "assert_deterministic",
    "assert_batch_invariant", "assert_nfe_honest", "assert_solver_conforms", "assert_matches_reference",
    "assert_gradient_descends", "assert_loss_lowered", "assert_schedule_conforms", "diffusers_loop",
]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
#: What the kit keeps across the runs of a test session (explicit caches, ``framework.core.memo``):
#: composed configs, model adapters by config choice, the mixture's reference solutions.
COMPOSED: Memo[tuple[DictConfig, dict[str, str]]] = Memo("testing: composed configs", 64)
MODELS: Memo[Any] = Memo("testing: model adapters", 16)
EXACT: Memo[torch.Tensor] = Memo("testing: mixture reference solutions", 256)


def _mixture() -> Any:
    """The default mixture, its reference solution memoised per starting point (the reference is
    an adaptive DOP853 solve; every run of a convergence study starts from the same x_T)."""
    from framework.models.analytic import Mixture

    class CachedMixture(Mixture):
        def exact_solution(self, x_start, sigma_start, sigma_end):
            key = (x_start.double().cpu().numpy().tobytes(), tuple(x_start.shape), sigma_start, sigma_end)
            exact = EXACT.get(key, lambda: Mixture.exact_solution(self, x_start, sigma_start, sigma_end))
            return exact.to(device=x_start.device, dtype=x_start.dtype)

    return CachedMixture()


def load_model(name: str) -> Any:
    """The model adapter of a ``model`` config choice (``"gaussian"``, ``"bundled"``, …), built once
    per process (``"mixture"`` memoises its reference solutions)."""
    from framework.entry.compose import compose
    from framework.models.base import wrap_model
    from framework.core.registry import instantiate

    def build() -> Any:
        if name == "mixture":
            return wrap_model(_mixture())
        return wrap_model(instantiate(compose([f"model={name}"])[0].model, f"model={name}"))

    return MODELS.get(name, build)


def _model(model: Any) -> tuple[Any, str]:
    """(model object, label) for a model given by config name or as an object."""
    if isinstance(model, str):
        return load_model(model), f"model={model}"
    return model, f"model {type(model).__name__}"


def _is_analytic(model: Any) -> bool:
    from framework.models.analytic import Gaussian, Mixture

    if isinstance(model, str):
        return model in ANALYTIC
    inner = getattr(model, "denoiser", model)
    return isinstance(inner, (Gaussian, Mixture))


def _composed(overrides: Sequence[str]) -> tuple[DictConfig, dict[str, str]]:
    from framework.entry.compose import compose

    cfg, choices = COMPOSED.get((tuple(overrides), tuple(sys.path)), lambda: compose(list(overrides)))
    return cfg, dict(choices)  # callers set only the top-level keys they vary, before every run


def sample(
    overrides: Sequence[str],
    model: Any = "gaussian",
    steps: int = 6,
    num_samples: int = 2,
    batch_size: int | None = None,
    seed: int = 0,
    dtype: str | None = None,
) -> Any:
    """One run of ``overrides`` on ``model`` (a :class:`framework.core.run.Result`).

    A model named by its config choice is built once per process (see :func:`load_model`) and
    passed to the engine as an object, so the record names it ``custom``.

    ``dtype`` defaults to float64 on the analytic models and float32 otherwise; the default
    ``callback=[nan_guard]`` is dropped so that it cannot hide a diverging solver. ``overrides``
    are applied after these defaults, so they may change any of them (but steps, seed,
    num_samples and batch_size are the arguments').
    """
    from framework.runs.execute import execute

    if any(o.split("=", 1)[0].lstrip("+~") == "model" for o in overrides):
        raise ValueError("choose the model with the kit's model= argument (e.g. model=\"mixture\"), not an override")
    obj, _ = _model(model)
    dtype = dtype or ("float64" if _is_analytic(model) else "float32")
    cfg, choices = _composed([f"dtype={dtype}", "callback=[]"] + list(overrides))
    with open_dict(cfg):
        cfg.steps, cfg.seed, cfg.num_samples = steps, seed, num_samples
        cfg.batch_size = num_samples if batch_size is None else batch_size
    return execute(cfg, choices, model=obj)


class count_evaluations:
    """Context manager counting the model's evaluations (calls of its ``denoise_batch``).

    ``with count_evaluations("gaussian") as counter: sample(..., model=counter.model)`` — a
    classifier-free-guidance pair is one batched call, hence one evaluation, as in the record.
    """

    def __init__(self, model: Any = "gaussian"):
        from framework.models.base import wrap_model

        self.model = load_model(model) if isinstance(model, str) else wrap_model(model)
        self.calls = 0

    def __enter__(self) -> count_evaluations:
        inner = type(self.model).denoise_batch.__get__(self.model)

        def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.calls += 1
            return inner(*args, **kwargs)

        self.model.denoise_batch = counted
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.denoise_batch


def _where(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """(max abs difference, index of the sample where it occurs)."""
    diff = (a.double() - b.double()).abs().flatten(1)
    per_sample = diff.max(1).values
    k = int(per_sample.argmax())
    return float(per_sample[k]), k


def _label(overrides: Sequence[str]) -> str:
    return " ".join(overrides) or "(defaults)"


# ---------------------------------------------------------------------------------------------
# Solvers: convergence order, determinism, batch invariance, NFE honesty
# ---------------------------------------------------------------------------------------------
def measure_order(
    overrides: Sequence[str], model: Any = "gaussian", steps: tuple[int, int] = (64, 128), num_samples: int = 2
) -> tuple[float, tuple[float, float]]:
    """(measured order, (error at steps[0], error at steps[1])): the slope of the RMS error to the
    exact ODE solution against the step count, log(e₁/e₂)/log(n₂/n₁), on an analytic model."""
    n1, n2 = steps
    errors = []
    for n in (n1, n2):
        res = sample(overrides, model=model, steps=n, num_samples=num_samples)
        err = res.record["metrics"].get("rmse_to_reference")
        if err is None:
            raise AssertionError(f"{_model(model)[1]} has no exact solution: measure the order on model=gaussian or model=mixture")
        errors.append(float(err))
    e1, e2 = errors
    order = math.log(e1 / e2) / math.log(n2 / n1) if e1 > 0 and e2 > 0 else math.nan
    return order, (e1, e2)


def assert_order(
    overrides: Sequence[str],
    expected: float,
    model: Any = "gaussian",
    steps: tuple[int, int] = (64, 128),
    tol: float = 0.3,
    floor: float = 1e-13,
) -> float:
    """Assert the measured convergence order is ``expected ± tol`` (analytic model, float64).

    Use a doubling (64→128 by default) on a grid where the method is in its asymptotic regime;
    errors below ``floor`` are round-off, and no order can be read from them. Returns the order.
    """
    order, (e1, e2) = measure_order(overrides, model, steps)
    (n1, n2), where = steps, _model(model)[1]
    errs = f"errors {e1:.3g} at {n1} steps, {e2:.3g} at {n2} steps, {where}"
    if not (math.isfinite(e1) and math.isfinite(e2)):
        raise AssertionError(f"{_label(overrides)} diverged ({errs})")
    if min(e1, e2) < floor:
        raise AssertionError(f"errors reach the floating-point floor ({errs}): measure with fewer steps")
    if not abs(order - expected) <= tol:
        raise AssertionError(f"measured order {order:.2f}, expected {expected:g} ± {tol:g} ({errs}; {_label(overrides)})")
    return order


def _same_output(a: Any, b: Any, atol: float, overrides: Sequence[str]) -> None:
    diff, k = _where(a.latents, b.latents)
    if not diff <= atol:
        raise AssertionError(
            f"two runs with the same seed differ by {diff:.3g} (sample {k}, tolerance {atol:g}; {_label(overrides)}): "
            "draw noise with state.noise(...) (per-sample generators), never from the global RNG, and keep "
            "per-run state in state.stash, not on self"
        )


def _seed_matters(a: Any, c: Any, overrides: Sequence[str]) -> None:
    if torch.equal(a.latents, c.latents):
        raise AssertionError(f"seeds 0 and 1 give the same output ({_label(overrides)}): the run ignores its noise")


def _batch_invariant(whole: Any, part: Any, size: int, atol: float, overrides: Sequence[str]) -> None:
    diff, k = _where(whole.latents, part.latents)
    if not diff <= atol:
        raise AssertionError(
            f"sample {k} differs by {diff:.3g} between batch_size={whole.latents.shape[0]} and batch_size={size} "
            f"(tolerance {atol:g}; {_label(overrides)}): a sample's update must not depend on the other samples "
            "of its batch (reduce per sample; draw noise with state.noise(...))"
        )


def assert_deterministic(
    overrides: Sequence[str], model: Any = "gaussian", steps: int = 6, num_samples: int = 2, atol: float = 0.0
) -> None:
    """Same config and seed → the same output (bit-identical with ``atol=0``), and another seed
    → another output."""
    a = sample(overrides, model=model, steps=steps, num_samples=num_samples)
    _same_output(a, sample(overrides, model=model, steps=steps, num_samples=num_samples), atol, overrides)
    _seed_matters(a, sample(overrides, model=model, steps=steps, num_samples=num_samples, seed=1), overrides)


def assert_batch_invariant(
    overrides: Sequence[str], model: Any = "gaussian", steps: int = 6, num_samples: int = 3, atol: float = 0.0
) -> None:
    """Sample k is the same whatever the batch size (bit-identical with ``atol=0``; use ~1e-5 for
    UNets, whose batched matmuls differ in the last bits): one batch of ``num_samples`` against
    batches of 1 and of 2."""
    whole = sample(overrides, model=model, steps=steps, num_samples=num_samples)
    for size in (1, 2):
        part = sample(overrides, model=model, steps=steps, num_samples=num_samples, batch_size=size)
        _batch_invariant(whole, part, size, atol, overrides)


def assert_nfe_honest(
    overrides: Sequence[str], model: Any = "gaussian", steps: int = 6, num_samples: int = 2, batch_size: int | None = None
) -> Any:
    """The record's ``nfe`` equals the number of model evaluations actually made (counted by
    wrapping the model). Fails for a plugin that calls the model behind the engine's back (every
    evaluation must go through ``denoise(x, σ)``). Returns the run's result."""
    batch = num_samples if batch_size is None else batch_size
    with count_evaluations(model) as counter:
        res = sample(overrides, model=counter.model, steps=steps, num_samples=num_samples, batch_size=batch)
    batches = math.ceil(num_samples / batch)
    per_batch = counter.calls / batches
    nfe = res.record["metrics"]["nfe"]
    if per_batch != nfe:
        raise AssertionError(
            f"the model was evaluated {per_batch:g} times in {steps} steps ({per_batch / steps:.3g} per step) "
            f"but the record says nfe {nfe:g} ({nfe / steps:.3g} per step; {_label(overrides)}): "
            "every evaluation must go through denoise(x, σ), never the model directly"
        )
    return res


def assert_solver_conforms(
    overrides: Sequence[str], model: Any = "gaussian", steps: int = 6, atol: float = 0.0,
    batch_invariant: bool = True,
) -> Any:
    """The solver kit without the order check, in four runs: NFE honesty, determinism (same seed,
    and another seed), batch invariance against batches of one (pass ``batch_invariant=False``
    only for solvers whose error control couples a batch, and say so). Returns the first run."""
    res = assert_nfe_honest(overrides, model, steps, num_samples=3)
    _same_output(res, sample(overrides, model=model, steps=steps, num_samples=3), atol, overrides)
    _seed_matters(res, sample(overrides, model=model, steps=steps, num_samples=3, seed=1), overrides)
    if batch_invariant:
        part = sample(overrides, model=model, steps=steps, num_samples=3, batch_size=1)
        _batch_invariant(res, part, 1, atol, overrides)
    return res


# ---------------------------------------------------------------------------------------------
# Parity with a reference
# ---------------------------------------------------------------------------------------------
def assert_matches_reference(
    overrides: Sequence[str],
    reference: torch.Tensor | Sequence[str] | Callable[[Any], torch.Tensor],
    tol: float,
    model: Any = "gaussian",
    steps: int = 6,
    num_samples: int = 2,
) -> float:
    """Assert max |output − reference| ≤ ``tol`` on the final latents; returns the difference.

    ``reference`` is a tensor, the overrides of a reference run (same model, seed and steps, e.g.
    ``["solver=euler"]``), or a function of the run's :class:`~framework.core.run.Result` (e.g. a
    hand-written loop started from ``result.x_T`` on ``result.schedule``).
    """
    res = sample(overrides, model=model, steps=steps, num_samples=num_samples)
    if isinstance(reference, torch.Tensor):
        expected, what = reference, "the given tensor"
    elif callable(reference):
        expected, what = reference(res), getattr(reference, "__name__", "the reference function")
    else:
        expected = sample(list(reference), model=model, steps=steps, num_samples=num_samples).latents
        what = _label(list(reference))
    expected = torch.as_tensor(expected).to(res.latents.device)
    if expected.shape != res.latents.shape:
        raise AssertionError(f"output shape {tuple(res.latents.shape)} != reference shape {tuple(expected.shape)} ({what})")
    diff, k = _where(res.latents, expected)
    if not diff <= tol:
        raise AssertionError(
            f"max abs difference {diff:.3g} to the reference ({what}) exceeds tol {tol:g} at sample {k} "
            f"({_label(overrides)}, {steps} steps)"
        )
    return diff


# ---------------------------------------------------------------------------------------------
# Losses (guidance)
# ---------------------------------------------------------------------------------------------
def assert_gradient_descends(loss: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor, step: float = 1e-2) -> None:
    """A small step against the gradient of ``loss`` lowers it, for every sample of ``target``.

    ``loss`` maps a batch (images or latents) to one value per sample (or a scalar); the step is
    ``step``·‖target‖ along the normalised gradient of each sample.
    """
    x = target.detach().clone().requires_grad_(True)
    values = loss(x)
    if not values.requires_grad:
        raise AssertionError("the loss has no gradient with respect to its target: build it from torch operations on "
                             "the input, without .detach(), .item() or numpy")
    (grad,) = torch.autograd.grad(values.sum(), x, allow_unused=True)
    if grad is None or not torch.isfinite(grad).all():
        raise AssertionError("the loss has no finite gradient with respect to its target: is it built from torch operations on the input?")
    g = grad.flatten(1)
    norms = g.norm(dim=1)
    if (norms == 0).any():
        raise AssertionError(f"the gradient of the loss is zero for sample(s) {norms.eq(0).nonzero().flatten().tolist()}: it cannot move its target")
    scale = step * x.detach().flatten(1).norm(dim=1).clamp_min(1.0)
    moved = x.detach() - (scale / norms).reshape(-1, *[1] * (x.ndim - 1)) * grad
    with torch.no_grad():
        before, after = loss(x.detach()), loss(moved)
    before, after = before.reshape(-1), after.reshape(-1)
    worse = (after >= before).nonzero().flatten().tolist()
    if worse:
        raise AssertionError(
            f"a step against the gradient did not lower the loss for sample(s) {worse} "
            f"(before {before.tolist()}, after {after.tolist()}): the gradient does not describe the loss "
            "(non-smooth, or the step is too large: lower step)"
        )


def assert_loss_lowered(
    guided: Sequence[str],
    unguided: Sequence[str],
    loss: Callable[[torch.Tensor], torch.Tensor],
    model: Any = "bundled",
    steps: int = 6,
    num_samples: int = 2,
    margin: float = 0.0,
) -> tuple[float, float]:
    """A guidance plugin lowers its own loss: the mean ``loss`` of the final images (latents for a
    model without a decoder) of the ``guided`` run is below that of the ``unguided`` run (same
    seed) by at least the fraction ``margin``. Returns (guided, unguided) mean losses."""
    runs = []
    for overrides in (guided, unguided):
        res = sample(overrides, model=model, steps=steps, num_samples=num_samples)
        out = res.images if res.images is not None else res.latents
        with torch.no_grad():
            runs.append(loss(out.float() if res.images is not None else out).reshape(-1).double())
    g, u = runs
    if not (torch.isfinite(g).all() and torch.isfinite(u).all()):
        raise AssertionError(f"the loss is not finite (guided {g.tolist()}, unguided {u.tolist()})")
    gm, um = float(g.mean()), float(u.mean())
    lowered = gm < um - margin * abs(um) if margin else gm < um
    if not lowered:
        raise AssertionError(
            f"guidance did not lower its loss: mean {gm:.4g} with it ({_label(guided)}) vs {um:.4g} without "
            f"({_label(unguided)}), required margin {margin:.0%}; per sample {g.tolist()} vs {u.tolist()}"
        )
    return gm, um


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------
def assert_schedule_conforms(
    overrides: Sequence[str], model: Any = "gaussian", steps: Sequence[int] = (1, 2, 10), within_model_range: bool = True
) -> None:
    """A schedule gives ``steps`` steps (steps + 1 σ values), the same grid twice, inside the
    model's σ range (the last may be 0; ``within_model_range=False`` for grids that define their
    own range), and a sampler run on it is finite."""
    for n in steps:
        a = sample(overrides, model=model, steps=n, num_samples=1)
        b = sample(overrides, model=model, steps=n, num_samples=1)
        sig = a.schedule.sigmas
        if a.schedule.steps != n:
            raise AssertionError(f"steps={n} gave a grid of {a.schedule.steps} steps ({len(sig)} σ values): return steps + 1 values")
        if a.schedule != b.schedule:
            raise AssertionError(f"steps={n} gave two different grids for the same config: {sig} vs {b.schedule.sigmas}")
        m = load_model(model) if isinstance(model, str) else model
        hi, lo = float(getattr(m, "sigma_max", math.inf)), float(getattr(m, "sigma_min", 0.0))
        inner = [s for s in sig if s > 0]
        if within_model_range and inner and (max(inner) > hi * (1 + 1e-6) or min(inner) < lo * (1 - 1e-6)):
            grid = ", ".join(f"{v:.4g}" for v in sig)
            raise AssertionError(f"steps={n}: σ grid [{grid}] leaves the model's range [{lo:g}, {hi:g}] (0 may end it)")
        if not torch.isfinite(a.latents).all():
            raise AssertionError(f"steps={n}: a run on this grid is not finite")


# ---------------------------------------------------------------------------------------------
# diffusers' loop, written out (the parity reference)
# ---------------------------------------------------------------------------------------------
def diffusers_loop(
    pipe: Any, scheduler: Any, steps: int, latents: torch.Tensor, prompts: list[str], cfg_scale: float,
    decode: bool = False,
) -> torch.Tensor:
    """Final latents (or images in [0, 1] with ``decode``) of a hand-written diffusers loop."""
    scheduler.set_timesteps(steps, device=latents.device)  # as the pipeline does: no per-step transfer
    tok = pipe.tokenizer(prompts + [""] * len(prompts), padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        cond, uncond = pipe.text_encoder(tok.input_ids.to(latents.device))[0].chunk(2)
        ctx = torch.cat([uncond, cond])
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            eps_u, eps_c = pipe.unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
            latents = scheduler.step(eps_u + cfg_scale * (eps_c - eps_u), t, latents).prev_sample
        if not decode:
            return latents
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)
