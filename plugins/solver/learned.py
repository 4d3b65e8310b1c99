"""A learned linear multistep sampler: each state is a fixed linear combination of the start noise
and every denoiser output so far,

    x_{j+1} = e_j·x_T + Σ_{k≤j} b_jk·D_k,   D_k = D(x_k, σ_k),

with coefficients fitted for *one* model, grid and CFG scale by ``samplerlab-optimize-schedule
method=learned`` (Adam on the final calibration error through the model, after S4S, Frankel et al.
2025, and the bespoke solvers of Shaul et al. 2024; docs/optimisation.md); a file fitted with
``guidance_terms=true`` adds Σ_{k≤j} g_jk·Δ_k, the guidance differences Δ_k = D_cond,k − D_uncond,k
(in effect a guidance weight per step and past output). Euler, DDIM and
DPM-Solver++(2M) on any grid are special cases; without a file the coefficients are Euler's, so the
tool's grid methods (GITS, OSS, LD3) give the starting grid. ``file`` defaults to the run's
``schedule.file``: ``solver=learned schedule=optimized schedule.file=F steps=K`` reads both the grid
and its coefficients from F. The run's grid must be the one the coefficients were fitted on (a clear
error otherwise). A flow model's file fitted with ``first_sigma`` starts its grid at that finite σ with
x_T = σ·ε (its ``init_noise``; the fit's target stays the solution from ε at t = 1), and e_j weighs that x_T.
NFE 1 per step; D_k is the direction after momentum, as Euler's."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from framework.plugin import ConfigError, euler_as_linear, hookimpl, linear_update, read_schedule_file


@dataclass
class _Memory:
    """One batch's x_T, coefficients (checked once, at its first step) and every D so far."""
    x_T: torch.Tensor | None = None
    e: list[float] = field(default_factory=list)
    b: list[list[float]] = field(default_factory=list)
    g: list[list[float]] = field(default_factory=list)  # the guidance differences' weights (none: [])
    ds: list[torch.Tensor] = field(default_factory=list)
    deltas: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Learned:
    file: str = ""
    input_files: ClassVar[tuple[str, ...]] = ("file",)  # read by content into the run key

    def __post_init__(self) -> None:
        self._by_steps: dict[int, tuple[tuple[float, ...], list[float], list[list[float]], list[list[float]]]] = {}
        if self.file:
            for g in read_schedule_file(self.file)["grids"].values():
                c = g.get("coefficients")
                if c is not None:
                    self._by_steps[int(g["steps"])] = (tuple(float(s) for s in g["sigmas"]), c["e"], c["b"], c.get("g", []))
            if not self._by_steps:
                raise ConfigError(f"solver=learned: {self.file} holds no coefficients: make it with "
                                  "samplerlab-optimize-schedule method=learned solver=learned")

    def coefficients(self, sigmas: tuple[float, ...]) -> tuple[list[float], list[list[float]], list[list[float]]]:
        """(e, b, g) for the run's grid; g = [] where the file weighs no guidance differences."""
        if not self.file:
            return (*euler_as_linear(sigmas), [])
        steps = len(sigmas) - 1
        if steps not in self._by_steps:
            have = ", ".join(map(str, sorted(self._by_steps)))
            raise ConfigError(f"solver=learned: {self.file} has coefficients for steps={have}, not steps={steps}")
        grid, e, b, g = self._by_steps[steps]
        if not all(math.isclose(a, c, rel_tol=1e-6) or (math.isinf(a) and math.isinf(c)) for a, c in zip(grid, sigmas)):
            raise ConfigError(f"solver=learned: the coefficients of {self.file} were fitted on its {steps}-step grid; "
                              f"run them on it: schedule=optimized schedule.file={self.file}")
        return e, b, g

    @hookimpl
    def step(self, state, denoise) -> torch.Tensor:
        mem = state.stash.get(self, _Memory)  # kept here: the engine's history leaves out a step from ∞
        if mem.x_T is None:
            mem.x_T = state.x
            mem.e, mem.b, mem.g = self.coefficients(state.schedule.sigmas)
        mem.ds.append(state.pred.denoised)
        j = len(mem.ds) - 1
        if mem.g:
            guided = state.guided
            if guided is None or guided.cond_denoised is None or guided.uncond_denoised is None:
                raise ConfigError(f"solver=learned: {self.file} weighs the guidance difference D_cond − D_uncond, which "
                                  "this run has not (no classifier-free guidance): run it with the CFG it was fitted at")
            mem.deltas.append(guided.cond_denoised - guided.uncond_denoised)
        return linear_update(mem.x_T, mem.ds, mem.e[j], mem.b[j], mem.deltas, mem.g[j] if mem.g else ())

    def step_from_infinity(self, state) -> torch.Tensor:  # x₁ = e₀·ε + b₀₀·D₀ (Euler's limit step without a file)
        return self.step(state, None)
