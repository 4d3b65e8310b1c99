"""``compile=true``: torch.compile of a model adapter's network, built once per process.

The network (the UNet of a diffusers pipeline, or a denoiser module) is compiled with
``dynamic=False``: one graph per input shape. Everything that changes from step to step reaches it
as a tensor (the timestep is a 0-d device tensor), so a run compiles once, not once per step.
Python floats (σ, the c_in/c_out scalings) stay outside the compiled region, in the adapter.

Modes: ``compile_mode=null`` picks ``reduce-overhead`` (CUDA graphs) on CUDA and ``default`` on the
CPU. Under CUDA graphs the outputs of a call live in memory that the next replay overwrites, so
every call starts a new graph generation and its output is cloned before it is handed back: the
solvers may keep what they get (history, multi-stage evaluations) for as long as they like.

The compiled module is cached per process in :data:`NETWORKS` (an explicit :class:`Memo`) under
(module object, dtype, mode, device, memory format, backend): the runs of a sweep in one process
(Hydra's basic launcher, ``testing.sample``) share it, and torch.compile's own guards decide whether
a new shape needs another graph. :func:`stats` counts builds and reuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from framework.core.graphstep import resolve_mode, uses_cuda_graphs
from framework.core.memo import Memo

__all__ = ["BACKEND", "CompiledNetwork", "NETWORKS", "compile_network", "resolve_mode", "set_channels_last", "stats",
           "uses_cuda_graphs"]

#: torch.compile backend. ``inductor`` is the real thing; tests of the plumbing (tracing, guards,
#: caching) set ``aot_eager``, which traces the same graphs without generating code (seconds
#: instead of minutes on a CPU).
BACKEND = "inductor"


@dataclass
class CompiledNetwork:
    """A compiled module, called like the module; outputs never alias CUDA-graph memory."""

    module: torch.nn.Module  # the eager module (kept alive: its id is part of the cache key)
    compiled: Callable[..., Any]
    mode: str
    cuda_graphs: bool
    calls: int = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if not self.cuda_graphs:
            return self.compiled(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return _clone(self.compiled(*args, **kwargs))


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    return out


#: The compiled networks of this process, by (module, dtype, mode, device, memory format, backend):
#: the runs of a sweep in one process share them. ``NETWORKS.clear()`` (or ``core.memo.clear()``)
#: forgets them.
NETWORKS: Memo[CompiledNetwork] = Memo("compiled networks", 64)
_STATS = {"built": 0, "reused": 0}


def stats() -> dict[str, int]:
    """How many compiled modules this process built, and how often one was reused by a later run."""
    return dict(_STATS)


def compile_network(module: torch.nn.Module, mode: str, device: torch.device, dtype: torch.dtype) -> CompiledNetwork:
    """The process-wide compiled version of ``module`` (built on first use, then reused)."""
    key = (id(module), dtype, mode, device, _is_channels_last(module), BACKEND)
    hit = NETWORKS.data.get(key)
    if hit is not None and hit.module is module:
        _STATS["reused"] += 1
        return hit
    NETWORKS.data.pop(key, None)  # a dead module's id was reused
    return NETWORKS.get(key, lambda: _compile(module, mode, device))


def _compile(module: torch.nn.Module, mode: str, device: torch.device) -> CompiledNetwork:
    kwargs: dict[str, Any] = {"dynamic": False, "backend": BACKEND}
    if BACKEND == "inductor":
        kwargs["mode"] = mode
    _STATS["built"] += 1
    return CompiledNetwork(module, torch.compile(module, **kwargs), mode, uses_cuda_graphs(mode, device) and BACKEND == "inductor")


def set_channels_last(module: torch.nn.Module, on: bool) -> None:
    """Put the 4-D weights of ``module`` in channels-last (NHWC) layout, or back to contiguous.

    Convolutions follow their weights' layout, so activations become channels-last too; the
    module is changed in place (a pipeline shared by the runs of a sweep is set by each run)."""
    if _is_channels_last(module) != on:
        module.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def _is_channels_last(module: torch.nn.Module) -> bool:
    for p in module.parameters():
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False
