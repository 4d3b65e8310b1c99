"""UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework", Algorithms 1–2, the
data-prediction form; diffusers' UniPCMultistepScheduler with ``predict_x0=True``).

In λ = −log σ with h = λ' − λ: the predictor UniP-p is x' = (σ'/σ)·x − expm1(−h)·D − B(h)·Σ ρᵖ_k·D₁ₖ,
D₁ₖ = (D_k − D)/r_k (r_k: the λ-offsets of earlier evaluations over h), B(h) = −h (``bh1``) or
expm1(−h) (``bh2``); ρᵖ solves the order conditions (ρ = 1/2 for p = 2). The corrector UniC-p
re-does the previous step with the model output at its result (no extra evaluation) and raises
its order by one. ``order`` is p; with the corrector on the method has order p + 1.
The corrector is skipped on steps where churn raised σ. Warm-up min(i + 1, p); ``lower_order_final`` (diffusers' default) caps step i at N − i.
A step to σ = 0 returns D. NFE 1 per step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from framework.plugin import BH, ConfigError, SamplerState, StepRecord, hookimpl, lam


@dataclass
class _Memory:
    last_x: torch.Tensor | None = None  # the (corrected) x the previous predictor started from
    last_order: int = 0


def _coefficients(h: float, order: int, variant: str) -> tuple[float, float, np.ndarray]:
    """(expm1(−h), B(h), b): b_i = i!·φ_{i+1}(h)/B(h) for i = 1..order (the right-hand side of the
    order conditions, with hφ_k evaluated recursively as in the paper)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    b, fact = [], 1
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return h_phi_1, b_h, np.array(b)


def _differences(d0: torch.Tensor, l0: float, h: float, older: list[StepRecord]) -> tuple[list[float], list[torch.Tensor]]:
    """r_k = (λ_k − λ₀)/h and D₁ₖ = (D_k − D₀)/r_k for the earlier evaluations ``older``."""
    rks, d1s = [], []
    for rec in older:
        r = (lam(rec.sigma) - l0) / h
        rks.append(r)
        d1s.append((rec.direction - d0) / r)
    return rks, d1s


@dataclass
class UniPC:
    order: int = 2
    variant: BH = BH.bh2
    corrector: bool = True
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 4:
            raise ConfigError(f"solver.order must be in 1..4, got {self.order}")

    def _correct(self, state: SamplerState, mem: _Memory) -> torch.Tensor:
        """UniC: the previous step again, now using the model output at its (predicted) end."""
        hist = state.history
        prev = hist[-1]
        l0 = lam(prev.sigma)
        h = lam(state.sigma) - l0
        p = mem.last_order
        rks, d1s = _differences(prev.direction, l0, h, [hist[-1 - k] for k in range(1, p)])
        h_phi_1, b_h, b = _coefficients(h, p, self.variant)
        if p == 1:
            rhos = np.array([0.5])
        else:
            rmat = np.array([[r ** (i - 1) for r in rks + [1.0]] for i in range(1, p + 1)])
            rhos = np.linalg.solve(rmat, b)
        x = (state.sigma / prev.sigma) * mem.last_x - h_phi_1 * prev.direction
        res = (state.pred.denoised - prev.direction) * float(rhos[-1])
        for rho, d1 in zip(rhos[:-1], d1s):
            res = res + float(rho) * d1
        return x - b_h * res

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        mem = state.stash.get(self, _Memory)
        x = pred.x
        # the corrector re-does the previous step up to this step's σ; after churn (σ raised and noise
        # added before this step) that would discard the churn noise, so it is skipped there
        unchurned = bool(state.history) and state.sigma == state.history[-1].sigma_next
        if self.corrector and mem.last_x is not None and unchurned:
            x = self._correct(state, mem)
        if state.sigma_next == 0:
            return pred.denoised
        p = min(self.order, len(state.history) + 1)
        if self.lower_order_final:
            p = min(p, state.schedule.steps - state.index)
        l0 = lam(state.sigma)
        h = lam(state.sigma_next) - l0
        rks, d1s = _differences(pred.denoised, l0, h, [state.history[-k] for k in range(1, p)])
        h_phi_1, b_h, b = _coefficients(h, p, self.variant)
        x_next = (state.sigma_next / state.sigma) * x - h_phi_1 * pred.denoised
        if p >= 2:
            if p == 2:
                rhos = np.array([0.5])
            else:
                rmat = np.array([[r ** (i - 1) for r in rks + [1.0]] for i in range(1, p + 1)])
                rhos = np.linalg.solve(rmat[:-1, :-1], b[:-1])
            res = sum(float(rho) * d1 for rho, d1 in zip(rhos, d1s))
            x_next = x_next - b_h * res
        mem.last_x, mem.last_order = x, p
        return x_next
