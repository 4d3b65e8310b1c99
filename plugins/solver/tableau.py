"""Any explicit Runge–Kutta method from its Butcher tableau (``framework/maths/tableaux.py``): in σ
on dx/dσ = (x − D)/σ (classical RK: Heun, Ralston, RK4, Bogacki–Shampine, …), or in λ = −log σ as
an exponential Runge–Kutta method in data-prediction form (Hochbruck & Ostermann 2010, "Exponential
integrators", Acta Numerica; the RES family of Zhang et al. 2023, ETDRK of Cox & Matthews 2002,
Lawson 1967): with h = λ' − λ and z = −h,

    x_i = (σ_i/σ)·x + h·Σ_j a_ij(z)·D_j,   σ_i = σ·e^(−c_i·h),   x' = (σ'/σ)·x + h·Σ_i b_i(z)·D_i.

``preset`` names a tableau of ``framework.maths.tableaux.TABLEAUX`` (heun, ralston, rk4,
bogacki_shampine, res_2s, res_3s, res_5s, etdrk2/3/4, lawson, …); or give your own ``a``, ``b``
(``c``: the row sums when omitted) and ``space`` with ``preset: null``. The step to σ = 0 is the
Euler/DDIM step (lands on D; no evaluation at σ = 0), as for the other single-step solvers. NFE per
step: the stages that feed the result (s for an s-stage method; 1 on the last step)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from framework.plugin import Choice, ConfigError, SamplerState, Tableau, build_tableau, hookimpl, lam, tableau_preset

Space = Choice("Space", [("sigma", "sigma"), ("lambda", "lambda")])


def _combine(terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor | None:
    """Σ w·t over the non-zero weights (None when there are none)."""
    out = None
    for w, t in terms:
        if w != 0.0:
            out = w * t if out is None else out + w * t
    return out


@dataclass
class TableauSolver:
    preset: Optional[str] = None
    space: Optional[Space] = None
    c: Optional[list[Any]] = None
    a: Optional[list[list[Any]]] = None
    b: Optional[list[Any]] = None
    tableau: Tableau = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        own = [k for k in ("space", "c", "a", "b") if getattr(self, k) is not None]
        if self.preset is not None and own:
            raise ConfigError(f"solver.preset={self.preset} and your own {', '.join(own)}: give one of them (a "
                              "tableau of your own needs solver.preset=null)")
        if self.preset is not None:
            self.tableau = tableau_preset(str(self.preset))
        elif self.b is None:
            raise ConfigError("a tableau solver needs solver.preset=<name> (e.g. rk4, res_2s) or a tableau of your "
                              "own: space, a, b (and c)")
        else:
            self.tableau = build_tableau(str(self.space or "sigma"), self.a, self.b, self.c)

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred, tab = state.pred, self.tableau
        sigma, sigma_next = state.sigma, state.sigma_next
        if sigma_next == 0:  # the Euler/DDIM step: lands on D
            return pred.x + (sigma_next - sigma) * pred.derivative if tab.space == "sigma" else pred.denoised
        if tab.space == "sigma":
            dt = sigma_next - sigma
            a, b = tab.weights()
            ks: list[Any] = [pred.derivative]
            for i in range(1, tab.stages):
                if not tab.used[i]:
                    ks.append(None)
                    continue
                s_i = sigma_next if tab.c[i] == 1 else sigma + tab.c[i] * dt
                inc = _combine(list(zip(a[i], ks)))
                x_i = pred.x if inc is None else pred.x + dt * inc
                ks.append(denoise(x_i, s_i).derivative)
            return pred.x + dt * _combine(list(zip(b, ks)))
        h = lam(sigma_next) - lam(sigma)
        a, b = tab.weights(-h)
        ds: list[Any] = [pred.denoised]
        for i in range(1, tab.stages):
            if not tab.used[i]:
                ds.append(None)
                continue
            c = tab.c[i]
            s_i = sigma_next if c == 1 else sigma if c == 0 else sigma * math.exp(-c * h)
            inc = _combine(list(zip(a[i], ds)))
            x_i = (s_i / sigma) * pred.x if inc is None else (s_i / sigma) * pred.x + h * inc
            ds.append(denoise(x_i, s_i).denoised)
        inc = _combine(list(zip(b, ds)))
        x = (sigma_next / sigma) * pred.x
        return x if inc is None else x + h * inc
