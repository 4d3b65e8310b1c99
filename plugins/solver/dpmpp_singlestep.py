"""Singlestep DPM-Solver / DPM-Solver++ of orders 1–3 (Lu et al. 2022, "DPM-Solver", §3.3 and
Algorithms 1–2; Lu et al. 2022b, "DPM-Solver++", §4), as diffusers' DPMSolverSinglestepScheduler
runs them on a grid: the grid is cut into groups of 1, 2 or 3 intervals (the scheduler's order
list, below); each group is one singlestep update of that order from the group's first point
x_s, whose intermediate evaluations are the grid points inside the group. Step j of a group
(j = 1, 2, 3) updates from x_s to σ_{i+1} with the j evaluations made so far in the group, so
every engine step costs one evaluation (NFE 1 per step) and lands on the grid.

With h = λ_t − λ_s (λ = −log σ), r_k = (λ_{s_k} − λ_s)/h and the model outputs m (D for
``dpmsolver++``/``sde-dpmsolver++``, ε = (x − D)/σ for ``dpmsolver``):

- order 1: x_t = (σ_t/σ_s)·x_s − expm1(−h)·m₀ (DPM-Solver++; DDIM);
- order 2 (``midpoint``): x_t = (σ_t/σ_s)·x_s − expm1(−h)·(D₀ + D₁/2), D₁ = (m₁ − m₀)/r₁;
  ``heun``: + (expm1(−h)/h + 1)·D₁ in place of the D₁/2 term;
- order 3 (``midpoint``: the second intermediate only, DPM-Solver-3's r₂ form): + (expm1(−h)/h + 1)·(m₂ − m₀)/r₂;
  ``heun``: the first and second divided differences D₁, D₂ with the φ₂ and φ₃ weights;
- ``dpmsolver`` (ε form): x_t = x_s − σ_t·expm1(h)·ε₀ − … with φ-weights in e^h;
- ``sde-dpmsolver++``: (σ_t/σ_s)e^(−h)·x_s, the φ's of 2h, and σ_t·√(−expm1(−2h))·s_noise·z (fresh noise each
  step). Its third-order ``heun`` D₂ weight is ((1 − e^(−2h) − 2h)/(2h)² + 1/2), which vanishes as h → 0;
  diffusers 0.42 has − 1/2 there (the same term as in its multistep scheduler; docs/solvers.md).

Order list (diffusers' ``get_order_list`` for N steps): order 3 → 1,2,3,1,2,3,…; order 2 → 1,2,1,2,…
with ``lower_order_final`` ending on lower orders (forced, as diffusers does, when N is not a multiple
of the order or the grid ends at σ = 0), and the step onto σ = 0 is order 1 (it returns D). A group
never reaches back past the run's first step (img2img, a step from σ = ∞). ``algorithm_type`` takes
diffusers' spellings (``dpmsolver++``, ``dpmsolver``, ``sde-dpmsolver++``), checked here."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, SamplerState, SolverType, hookimpl, lam

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")


def order_list(order: int, steps: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """diffusers' DPMSolverSinglestepScheduler order list (``set_timesteps`` + ``get_order_list``)."""
    lower = lower_order_final or steps % order != 0 or final_zero
    if order == 3:
        if not lower:
            orders = [1, 2, 3] * (steps // 3)
        elif steps % 3 == 0:
            orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1]
        else:
            orders = [1, 2, 3] * (steps // 3) + [1, 2][: steps % 3]
    elif order == 2:
        if not lower:
            orders = [1, 2] * (steps // 2)
        elif steps % 2 == 0:
            orders = [1, 2] * (steps // 2 - 1) + [1, 1]
        else:
            orders = [1, 2] * (steps // 2) + [1]
    else:
        orders = [1] * steps
    if final_zero:
        orders[-1] = 1
    return orders


@dataclass
class _Group:
    x: torch.Tensor | None = None  # the group's first point x_s


@dataclass
class DPMPPSinglestep:
    order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: SolverType = SolverType.midpoint
    lower_order_final: bool = False
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.order not in (1, 2, 3):
            raise ConfigError(f"solver.order must be 1, 2 or 3, got {self.order}")
        if self.algorithm_type not in ALGORITHMS:
            raise ConfigError(f"solver.algorithm_type must be one of {', '.join(ALGORITHMS)}, got '{self.algorithm_type}'")

    def _output(self, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
        return (x - denoised) / sigma if self.algorithm_type == "dpmsolver" else denoised

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        sig = state.schedule.sigmas
        orders = order_list(self.order, state.schedule.steps, self.lower_order_final, sig[-1] == 0)
        past = state.history
        k = min(orders[state.index], len(past) + 1)
        group = state.stash.get(self, _Group)
        if k == 1:
            group.x = pred.x
        if state.sigma_next == 0:
            return pred.denoised
        # the group's evaluations, oldest first: (σ, model output)
        nodes = [(r.sigma, self._output(r.x, r.sigma, r.denoised)) for r in past[len(past) - (k - 1):]] if k > 1 else []
        nodes.append((state.sigma, self._output(pred.x, state.sigma, pred.denoised)))
        return self._update(state, group.x, nodes)

    def _update(self, state: SamplerState, x_s: torch.Tensor, nodes: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
        s, t = nodes[0][0], state.sigma_next
        h = lam(t) - lam(s)
        m0 = nodes[0][1]
        k = len(nodes)
        heun = self.solver_type == "heun"
        if k >= 2:
            r1 = (lam(nodes[1][0]) - lam(s)) / h
            d1_first = (nodes[1][1] - m0) / r1
        if k == 3:
            r2 = (lam(nodes[2][0]) - lam(s)) / h
            d1_last = (nodes[2][1] - m0) / r2
            d1 = (r2 * d1_first - r1 * d1_last) / (r2 - r1)
            d2 = 2 * (d1_last - d1_first) / (r2 - r1)
        if self.algorithm_type == "dpmsolver":
            e1 = t * math.expm1(h)  # σ_t·(e^h − 1)
            x = x_s - e1 * m0
            if k == 2:
                x = x - (0.5 * e1 if not heun else t * (math.expm1(h) / h - 1)) * d1_first
            elif k == 3 and not heun:
                x = x - t * (math.expm1(h) / h - 1) * d1_last
            elif k == 3:
                x = x - t * (math.expm1(h) / h - 1) * d1 - t * ((math.expm1(h) - h) / h**2 - 0.5) * d2
            return x
        sde = self.algorithm_type == "sde-dpmsolver++"
        g = 2 * h if sde else h  # the φ's argument
        phi1 = -math.expm1(-g)
        c2 = math.expm1(-g) / g + 1
        c3 = -((math.expm1(-g) + g) / g**2 - 0.5)
        x = (t / s) * (math.exp(-h) if sde else 1.0) * x_s + phi1 * m0
        if k == 2:
            x = x + (0.5 * phi1 if not heun else c2) * d1_first
        elif k == 3 and not heun:
            x = x + c2 * d1_last
        elif k == 3:
            x = x + c2 * d1 + c3 * d2
        if sde:
            x = x + state.noise(state.sigma, state.sigma_next) * (t * math.sqrt(-math.expm1(-2 * h)) * self.s_noise)
        return x
