"""The UniC corrector of UniPC (Zhao et al. 2023, Algorithm 2, data prediction, B(h) variants bh1/bh2)
as a momentum entry: at each step after the first, it corrects the step's starting point x_t from
the previous start x_s, the previous evaluations and the new evaluation D_t — which it does not
recompute (the solver then steps from the corrected point with D_t, as UniPC does). UniC-p raises
the order of the predictor before it by one. Put it after a predictor, e.g.
``momentum=[multistep,unipc_corrector]`` on solver=ddim; it reads the raw (pre-momentum) D_t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from framework.plugin import BH, ConfigError, MomentumPlugin, hookimpl, lam


@dataclass
class UniPCCorrector(MomentumPlugin):
    order: int = 2
    variant: BH = BH.bh2

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 3:
            raise ConfigError(f"unipc_corrector.order must be in 1..3, got {self.order}")

    @hookimpl
    def momentum(self, state, pred):
        hist = state.history
        if not hist:
            return pred
        p = min(self.order, len(hist))
        s0 = hist[-1]
        h = lam(pred.sigma) - lam(s0.sigma)
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = hh if self.variant == "bh1" else h_phi_1
        # the linear system of UniC: R ρ = b with R_ij = r_j^(i−1), rks of the older points and 1
        rks = [(lam(r.sigma) - lam(s0.sigma)) / h for r in hist[-p:-1][::-1]] + [1.0]
        b, h_phi_k, fact = [], h_phi_1 / hh - 1, 1
        for i in range(1, p + 1):
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        if p == 1:
            rhos = [0.5]
        else:
            r_mat = torch.tensor([[rk ** (i - 1) for rk in rks] for i in range(1, p + 1)], dtype=torch.float64)
            rhos = torch.linalg.solve(r_mat, torch.tensor(b, dtype=torch.float64)).tolist()
        m0 = s0.denoised
        corr = sum(rho * (r.denoised - m0) / rk for rho, r, rk in zip(rhos[:-1], hist[-p:-1][::-1], rks[:-1]))
        d1_t = state.guided.denoised - m0
        x_c = (pred.sigma / s0.sigma) * s0.x - h_phi_1 * m0 - b_h * (corr + rhos[-1] * d1_t)
        return replace(pred, x=x_c)
