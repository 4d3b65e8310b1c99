"""iPNDM-v, iPNDM (Zhang & Chen 2023) with variable-step coefficients as published in diff-sampler
(zju-pi/diff-sampler ``ipndm_v_sampler``; ComfyUI ``sample_ipndm_v``):

    x' = x + h₀·Σ_j c_j(h₀, …, h_{k−1})·d_{i−j},   k = min(i + 1, ``max_order``) ≤ 4,

h₀ = σ' − σ and h_j the previous steps (``framework.maths.multistep.ipndm_v_coefficients`` states
the c_j). k = 2 is the exact variable-step AB2; k = 3 is AB3 on equal steps and second-order
consistent otherwise; the published k = 4 weights are third order even on equal steps and do not
sum to 1 on unequal ones (measured orders in docs/solvers.md). The variable-step Adams–Bashforth
of full order, the derivative interpolated by a polynomial in σ, is ``solver=lms``. NFE 1 per step;
``final`` as in ``ipndm`` (ComfyUI: ``denoise``)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from framework.plugin import ipndm_v_coefficients
from plugins.solver.ipndm import IPNDM


@dataclass
class IPNDMV(IPNDM):
    def coefficients(self, sigmas: Sequence[float], sigma_next: float) -> Sequence[float]:
        steps = [sigma_next] + list(sigmas)
        return ipndm_v_coefficients([steps[j] - steps[j + 1] for j in range(len(sigmas))])
