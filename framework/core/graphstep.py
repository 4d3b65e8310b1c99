"""``compile=step``: the device work of a whole sampling step as one compiled function.

With ``compile=true`` only the network is compiled; the scalings, the CFG combination and the
solver's arithmetic run eagerly between its calls. With ``compile=step`` one function per step is
captured with ``torch.compile``: the model's input scaling and network on the ``[uncond; cond]``
pair (:meth:`Model.denoise_tensor`), the guidance chain (the CFG combination), the solver's update
with all its evaluations (Heun's second one included) and the NaN guard's device-side checks of
each of them. σ values reach it as 0-d device tensors from a table made once per run, so a run
compiles once, not once per step. The plugins branch only on host facts (:class:`Facts`: to σ = 0,
first step, a previous step or none), and dynamo guards on a fact only where a plugin reads it:
Euler has one graph, Heun two, DPM-Solver++(2M) three, chosen without reading the device.

What stays on the host, between two launches: ``before_step``/``after_step`` plugins (they see the
state as usual; ``state.pred`` carries the guided denoised only), the NFE and call counts (the
captured function returns how many evaluations it made), the step history, and the check of the
solver's output by the engine loop. A step runs uncaptured, through the ordinary path with the
network compiled alone, when its σ is ∞ (a flow model's first step), when a ``before_step``
plugin changed σ (churn), or when the previous step's σ values are not the grid's.

**The contract.** A plugin whose hook runs inside the step (``predict``: the model adapter,
``guidance``, ``step``: the solver; momentum plugins are not captured) opts in with a class attribute
``capturable = True`` (or a property: ``True``, or a string saying why this configuration cannot
be captured). It promises that the hook is tensor arithmetic of its inputs and of ``state.sigma``
/ ``state.sigma_next`` (0-d tensors inside the graph), that it branches only on host facts
(``state.to_zero``, ``state.is_first``, ``bool(state.history)``, its own options, the run's
settings), never on tensor values, reads no tensor back to the host, draws no noise, and uses at
most the previous step of the history. ``state.index`` is refused inside the graph (a value per
step would compile a graph per step). If any hook of the step is not capturable, the whole run
falls back to ``compile=true``; ``record.json``'s ``compile`` lists ``captured`` plugins and
``fallback`` (plugin → reason).
"""
from __future__ import annotations

import math
import types
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch

from framework.core.errors import ConfigError
from framework.core.memo import Memo
from framework.core.model import Model, _Stacked
from framework.core.run import Run
from framework.core.state import Prediction, StepRecord
from framework.core.step import Denoiser, SamplerState

#: torch.compile backend; tests of the plumbing set ``eager`` (dynamo's graphs and guards, no code).
BACKEND = "inductor"


def resolve_mode(mode: str | None, device: torch.device) -> str:
    """The torch.compile mode for ``compile_mode`` (null: reduce-overhead on CUDA, default elsewhere)."""
    if mode is None:
        return "reduce-overhead" if device.type == "cuda" else "default"
    from framework.core.settings import CompileMode

    modes = tuple(m.value for m in CompileMode)
    if mode not in modes:
        raise ConfigError(f"compile_mode '{mode}' is not one of {', '.join(modes)} (or null for the device's default)")
    return str(mode)


def uses_cuda_graphs(mode: str, device: torch.device) -> bool:
    return device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


class CaptureError(RuntimeError):
    """A capturable plugin did something the captured step cannot do."""


def why_not(obj: object) -> str | None:
    """None when a plugin declares itself capturable, else the reason it is not."""
    flag = getattr(obj, "capturable", False)
    if flag is True:
        return None
    return flag if isinstance(flag, str) and flag else "not marked capturable"


def _owner(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def plan(run: Run) -> tuple[list[str], dict[str, str]]:
    """The plugins the captured step would run, and those that keep it from being captured (→ why)."""
    assert run.hooks is not None
    model, name = run.model, run.hooks.predict[0]
    cls = type(model)
    reasons: dict[str, str | None] = {}
    if _owner(cls, "denoise_tensor") in (None, Model) or _owner(cls, "denoise_tensor") is not _owner(cls, "denoise_batch"):
        reasons[name] = f"model {cls.__name__} does not define denoise_tensor (the σ-tensor form of denoise_batch)"
    elif run.branches or run.attention_maps:
        reasons[name] = "perturbed network branches or attention maps (hooks inside the network)"
    elif run.needs_uncond and not run.uncond_pass:
        reasons[name] = "a negative-prompt encoding without the unconditional pass"
    else:
        reasons[name] = None
    for name, fn, grad in run.hooks.guidance:
        reasons[name] = "needs gradients (loss guidance)" if grad else why_not(fn.__self__)
    for name, _fn in run.hooks.momentum:  # the loop applies momentum between the evaluation and the step
        reasons[name] = "momentum plugins are not captured (the engine loop applies them)"
    name, fn = run.hooks.step
    reasons[name] = why_not(fn.__self__)
    return [n for n, why in reasons.items() if why is None], {n: why for n, why in reasons.items() if why is not None}


def install(run: Run) -> None:
    """``compile=step``: capture the run's step when every plugin inside it is capturable, else
    keep ``compile=true``'s path; either way the record says which (``run.compile_report``)."""
    assert run.hooks is not None and run.schedule is not None
    captured, fallback = plan(run)
    run.compile_report = {"mode": "step", "captured": captured if not fallback else [], "fallback": fallback,
                          "steps_captured": 0, "steps_uncaptured": 0}
    if fallback:
        return
    run.step_capture = Capture(run)
    name, fn = run.hooks.step
    run.hooks = replace(run.hooks, step=(name, CapturedSolver(fn).step))


@dataclass
class _Tables:
    sigmas: list[torch.Tensor]  # each σ of the grid, its own 0-d tensor
    times: list[torch.Tensor | None]  # the model time of each σ (Model.time_input)


class Capture:
    """One run's captured step: its plugins, its σ tables, and the compiled function (shared by
    every run of the process: :func:`_compiled`)."""

    def __init__(self, run: Run):
        assert run.hooks is not None and run.schedule is not None
        self.run, self.model = run, run.model
        self.model_name = run.hooks.predict[0]
        self.guidance = tuple((name, fn.__self__) for name, fn, _ in run.hooks.guidance)
        self.solver_name, solver = run.hooks.step
        self.solver = solver.__self__
        self.pair = run.uncond_pass and run.model.is_conditional
        self.mode = resolve_mode(run.settings.compile_mode, run.device)
        self.cuda_graphs = uses_cuda_graphs(self.mode, run.device) and BACKEND == "inductor"
        sig = run.schedule.sigmas
        # float32 (float64 for float64 runs): a 0-d float64 CPU tensor in float32 arithmetic is a
        # "wrapped scalar" to dynamo, which guards on its value with .item() at every call
        dtype = torch.float64 if run.dtype == torch.float64 else torch.float32
        finite = [s if math.isfinite(s) else 0.0 for s in sig]
        table = torch.tensor(finite, dtype=dtype, device=run.device)
        self.tables = _Tables([row.clone() for row in table.unbind()],
                              [run.model.time_input(s, run.schedule.timestep(s)) if math.isfinite(s) else None for s in sig])
        key = (type(run.model), tuple(type(p) for _, p in self.guidance), type(self.solver))
        self.fn = _compiled(self.mode, key)
        self.broken: str | None = None  # why this run stopped capturing (a failed compile)

    def takes(self, state: SamplerState, sigma: float) -> bool:
        """Whether the graph can take this step (decided on the host, from the grid's floats): σ is
        the grid's (no churn), finite, and the previous step was taken on the grid."""
        sig, i = state.schedule.sigmas, state.index
        if sigma != sig[i] or not math.isfinite(sigma):
            return False
        past = state.history
        return not past or (past[-1].sigma == sig[i - 1] and past[-1].sigma_next == sig[i])

    def run_step(self, state: SamplerState, both: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        i, tab = state.index, self.tables
        past = state.history
        prev = None
        if past:
            p = past[-1]
            prev = StepRecord(p.index, tab.sigmas[i - 1], tab.sigmas[i], p.x, p.denoised, p.direction, p.x_next)
        facts = Facts(to_zero=state.schedule.sigmas[i + 1] == 0, is_first=i == 0, prev=prev)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.fn(self, state.batch, state.x, tab.sigmas[i], tab.sigmas[i + 1], tab.times[i], tab.times[i + 1],
                      both, facts)
        x_next, denoised, first_bad, meta = out
        if self.cuda_graphs:  # the next replay overwrites the graph's outputs
            x_next, denoised = x_next.clone(), denoised.clone()
            first_bad = None if first_bad is None else first_bad.clone()
        return x_next, denoised, (first_bad, meta)


@dataclass(frozen=True)
class Facts:
    """What the host knows about a step and a capturable plugin may branch on."""

    to_zero: bool  # the step ends at σ = 0
    is_first: bool  # step 0
    prev: StepRecord | None  # the previous step, its σ values from the table (None: no history)


class GraphState:
    """What capturable plugins see inside the captured step: :class:`SamplerState`'s fields, with
    ``sigma``/``sigma_next`` 0-d device tensors and no per-step integers."""

    def __init__(self, run: Run, batch: Any, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 facts: Facts):
        self.run, self.batch, self.schedule = run, batch, run.schedule
        self.x, self.sigma, self.sigma_next = x, sigma, sigma_next
        self._facts = facts
        self.pred: Prediction | None = None
        self.guided: Prediction | None = None
        self.denoise: Any = None

    # host facts, read lazily: dynamo guards on a fact only where a plugin reads it, so a solver
    # that never asks has one graph for every step
    @property
    def history(self) -> list[StepRecord]:
        prev = self._facts.prev
        return [] if prev is None else [prev]

    @property
    def to_zero(self) -> bool:
        return self._facts.to_zero

    @property
    def is_first(self) -> bool:
        return self._facts.is_first

    @property
    def index(self) -> int:
        raise CaptureError("state.index inside a captured step (compile=step): it changes every step; "
                           "use state.to_zero, state.is_first, state.history, or drop capturable")

    @property
    def is_last(self) -> bool:
        raise CaptureError("state.is_last inside a captured step (compile=step): use state.to_zero")

    @property
    def stash(self) -> Any:
        return self.batch.stash

    @property
    def denoised(self) -> torch.Tensor:
        assert self.pred is not None
        return self.pred.denoised

    def noise(self, *args: Any) -> torch.Tensor:
        raise CaptureError("noise inside a captured step (compile=step): stochastic solvers are not capturable")


def _body(cap: Capture, batch: Any, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
          t: torch.Tensor | None, t_next: torch.Tensor | None, both: dict[str, torch.Tensor],
          facts: Facts):
    """The step, traced: the evaluation(s) with guidance, the solver; the NaN checks as flags.
    Returns x_next, the guided denoised of the first evaluation, the index of the first failing
    check per sample (-1: none; None without checks) and what the host counts: (checks, NFE)."""
    state = GraphState(cap.run, batch, x, sigma, sigma_next, facts)
    checks: list[tuple[str, str, bool]] = []  # (hook, plugin, evaluated at σ_next)
    flags: list[torch.Tensor] = []
    count = [0]
    watch = cap.run.finite_checks

    def check(value: torch.Tensor, hook: str, name: str, at_next: bool) -> None:
        if watch:
            checks.append((hook, name, at_next))
            flags.append(~torch.isfinite(value).flatten(1).all(1))

    def denoise(xe: torch.Tensor, s: Any) -> Prediction:
        if xe is state.x and s is sigma and state.pred is not None:
            return state.pred
        if s is not sigma and s is not sigma_next:
            raise CaptureError("an evaluation off the grid inside a captured step (compile=step)")
        count[0] += 1
        at_next = s is sigma_next
        xs = torch.cat([xe, xe]) if cap.pair else xe
        d = cap.model.denoise_tensor(xs, s, t_next if at_next else t, both)
        if cap.pair:
            du, dc = d.chunk(2)
            pred = Prediction(x=xe, sigma=s, denoised=dc, cond_denoised=dc, uncond_denoised=du)
        else:
            pred = Prediction(x=xe, sigma=s, denoised=d)
        check(pred.denoised, "predict", cap.model_name, at_next)
        for name, plugin in cap.guidance:
            pred = plugin.guidance(state=state, pred=pred)
            check(pred.denoised, "guidance", name, at_next)
        return pred

    state.denoise = denoise
    pred = state.guided = denoise(x, sigma)
    state.pred, state.x = pred, pred.x
    x_next = cap.solver.step(state=state, denoise=denoise)
    first_bad = None
    if flags:
        bad = torch.stack(flags)
        first_bad = torch.where(bad.any(0), bad.int().argmax(0), -1)
    return x_next, pred.denoised, first_bad, (tuple(checks), count[0])


#: The compiled step functions of this process, by (mode, backend, plugin classes).
STEPS: Memo[Any] = Memo("compiled steps", 64)


def _compiled(mode: str, plugins: tuple) -> Any:
    """The compiled step function for (mode, backend, the model, guidance and solver classes),
    shared by the runs of a process. torch.compile keeps its graphs on the function's code object,
    so each combination gets a copy of :func:`_body`'s code of its own: its few variants never
    crowd another combination's out of dynamo's recompile limit."""
    def build() -> Any:
        code = _body.__code__.replace(co_name=f"_body_{len(STEPS.data)}")
        fn = types.FunctionType(code, _body.__globals__, code.co_name)
        kwargs: dict[str, Any] = {"dynamic": False, "fullgraph": True, "backend": BACKEND}
        if BACKEND == "inductor":
            kwargs["mode"] = mode
        return torch.compile(fn, **kwargs)

    return STEPS.get((mode, BACKEND, plugins), build)


class CapturedSolver:
    """Stands in for the solver's ``step`` hook: the step's result when the graph took the step,
    else the solver itself. Anything else (``step_from_infinity``) is the solver's."""

    def __init__(self, step: Any):
        self._step = step

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step.__self__, name)

    def step(self, state: SamplerState, denoise: Denoiser) -> torch.Tensor:
        taken = getattr(denoise, "taken", None)
        if taken is not None:
            denoise.taken = None  # type: ignore[attr-defined]
            return taken
        return self._step(state=state, denoise=denoise)


def _failure(e: Exception) -> str:
    """One line on why a compile failed: dynamo's own debug line (the exception a plugin raised
    while traced) or its first line, and the innermost place in the traced code outside this module."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    debug = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Developer debug context:")), None)
    where = [line for line in lines if line.startswith('File "') and __file__ not in line]
    text = f"{type(e).__name__}: {debug or (lines[0] if lines else '')}" + (f" ({where[-1]})" if where else "")
    return text[:500]


class GraphDenoiser(Denoiser):
    """The engine's ``denoise`` under ``compile=step``: the step's first evaluation runs the whole
    captured step (its x_next waits in ``taken`` for :class:`CapturedSolver`); any other
    evaluation, and every evaluation of a step the graph cannot take, is :class:`Denoiser`'s."""

    def __init__(self, run: Run, batch: Any):
        super().__init__(run, batch)
        self.capture: Capture = run.step_capture
        self.taken = None

    def evaluate(self, x, sigma, guidance=None):
        st, cap, report = self.state, self.capture, self.run.compile_report
        assert st is not None and report is not None
        first = guidance is None and st.pred is None and x is st.x
        if first and cap.broken is None and cap.takes(st, sigma):
            try:
                return self._captured(st)
            except Exception as e:  # a promise a plugin could not keep: the rest of the run goes uncaptured
                cap.broken = f"capture failed at step {st.index}: {_failure(e)}"
                report["fallback"]["step"], report["captured"] = cap.broken, []
                warnings.warn(f"compile=step: {cap.broken}; the run continues with the network compiled alone")
        if first:
            report["steps_uncaptured"] += 1
        return super().evaluate(x, sigma, guidance)

    def _captured(self, st: SamplerState) -> Prediction:
        cap, batch = self.capture, self.batch
        cond = batch.cond
        both = {} if cond is None else cond.tensors if not cap.pair else \
            batch.stash.get(cap.model, _Stacked).tensors([cond.uncond, cond.tensors])
        x_next, denoised, (first_bad, (checks, nfe)) = cap.run_step(st, both)
        batch.nfe += nfe
        batch.unet_calls += nfe
        batch.network_inputs += nfe * (2 if cap.pair else 1)
        watch = self.watch
        if watch is not None and checks:
            base, sig = len(watch.points), st.schedule.sigmas
            watch.points.extend((st.index, sig[st.index + 1] if at_next else st.sigma, hook, name)
                                for hook, name, at_next in checks)
            watch.first = torch.where((watch.first < 0) & (first_bad >= 0), first_bad + base, watch.first)
        self.run.compile_report["steps_captured"] += 1  # type: ignore[index]
        self.taken = x_next
        return Prediction(x=st.x, sigma=st.sigma, denoised=denoised)
