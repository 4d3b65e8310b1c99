"""Heun++ 2 (ComfyUI's ``heunpp2``, from sd-webui-samplers-scheduler): an Euler predictor chain
along the grid whose derivatives are averaged with weights that grow with σ/σ₀. On a step
σ_i → σ_{i+1} with d_i = (x − D(x, σ_i))/σ_i:

- x₂ = x + (σ_{i+1} − σ_i)·d_i, d₂ = its derivative at σ_{i+1};
- when σ_{i+2} exists and is not the grid's last σ: x₃ = x₂ + (σ_{i+2} − σ_{i+1})·d₂, d₃ = its
  derivative at σ_{i+2}, and x' = x + (σ_{i+1} − σ_i)·(w₁d_i + w₂d₂ + w₃d₃) with w₂ = σ_{i+1}/(3σ₀),
  w₃ = σ_{i+2}/(3σ₀), w₁ = 1 − w₂ − w₃ (3 NFE);
- on the next-to-last step: x' = x + (σ_{i+1} − σ_i)·(w₁d_i + w₂d₂), w₂ = σ_{i+1}/(2σ₀), w₁ = 1 − w₂
  (2 NFE);
- the step onto the grid's last σ is Euler (1 NFE).

σ₀ is the grid's first σ. The weights sum to 1 but are not Heun's ½/½, so the method is consistent
and first order (measured ≈ 1 in tests/plugins/test_solvers_consistency.py); its look-ahead
evaluation at σ_{i+2} is spent on the current step only. ComfyUI's churn options are
``callback=[churn]`` here."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import SamplerState, hookimpl


@dataclass
class HeunPP2:
    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        sig = state.schedule.sigmas
        i, last, first = state.index, sig[-1], sig[0]
        d = pred.derivative
        dt = state.sigma_next - state.sigma
        x2 = pred.x + dt * d
        if state.sigma_next == last:
            return x2
        d2 = denoise(x2, state.sigma_next).derivative
        if sig[i + 2] == last:
            w2 = state.sigma_next / (2 * first)
            return pred.x + dt * ((1 - w2) * d + w2 * d2)
        x3 = x2 + (sig[i + 2] - state.sigma_next) * d2
        d3 = denoise(x3, sig[i + 2]).derivative
        w2, w3 = state.sigma_next / (3 * first), sig[i + 2] / (3 * first)
        return pred.x + dt * ((1 - w2 - w3) * d + w2 * d2 + w3 * d3)
