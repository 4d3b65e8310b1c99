"""RES multistep (Zhang, Tao & Chen 2023, "Improved order analysis and design of exponential integrator
for diffusion models sampling", the second-order multistep exponential integrator; ComfyUI's
``res_multistep`` family in k-diffusion's ``sampling.py``). With λ = −log σ, the step σ → σ_down
(σ_down = σ' unless ``eta`` > 0), h = λ(σ_down) − λ(σ) and the node of the previous evaluation
c₂ = (λ(σ_prev) − λ(σ_prev,down))/h (= −h_prev/h when η = 0):

    x' = e^(−h)·x + h·(b₁·D + b₂·D_prev),   b₂ = φ₂(−h)/c₂,   b₁ = φ₁(−h) − b₂,

i.e. DPM-Solver++(2M) with its φ₂-weighted ("heun") second-order term. The first step and the step to
σ = 0 are Euler steps (landing on D there). ``eta`` > 0 (``res_multistep_ancestral``) steps to
σ_down and adds noise of std s_noise·σ_up (``framework.maths.sigmas.ancestral_split``) from the
engine's per-sample generators. ``cfg_pp`` (CFG++, Chung et al. 2024; ``*_cfg_pp``) steps to the
guided D but takes the rest from the unconditional D_u: the Euler step is x' = D + σ_down·(x − D_u)/σ,
the multistep one x' = e^(−h)·(x + D − D_u) + h·(b₁·D_u + b₂·D_u,prev); like ``euler_cfg_pp`` it
requests the unconditional pass itself and needs a CFG combiner (on an unconditional model D_u = D).
NFE 1 per step; order 2 (η = 0)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import Ancestral, SamplerState, hookimpl, lam, phis
from plugins.solver.euler_cfg_pp import CFGPP


@dataclass
class _Prev:
    denoised: torch.Tensor | None = None  # D (or D_u with cfg_pp) of the previous step
    sigma: float = 0.0  # where it was evaluated
    sigma_down: float = 0.0  # where that step's deterministic part landed


@dataclass
class ResMultistep(Ancestral):
    eta: float = 0.0
    s_noise: float = 1.0
    cfg_pp: bool = False

    @hookimpl
    def configure(self, run) -> None:
        if self.cfg_pp:
            CFGPP.configure(self, run)

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred, sigma = state.pred, state.sigma
        down, up = self.split(state)
        pp = self.cfg_pp and pred.uncond_denoised is not None  # an unconditional model has no D_u: plain steps
        uncond = pred.uncond_denoised if pp else pred.denoised
        prev = state.stash.get(self, _Prev)
        first = prev.denoised is None or down == 0
        c2 = 0.0 if first else (lam(prev.sigma) - lam(prev.sigma_down)) / (lam(down) - lam(sigma))
        if c2 == 0.0:  # Euler: the first step, the step to σ = 0
            x = pred.denoised + (down / sigma) * (pred.x - uncond) if pp else pred.x + (down - sigma) * pred.derivative
        else:
            h = lam(down) - lam(sigma)
            phi1, phi2 = phis(h, 2)
            b2 = phi2 / c2
            base = pred.x + (pred.denoised - uncond) if pp else pred.x
            x = math.exp(-h) * base + h * ((phi1 - b2) * uncond + b2 * prev.denoised)
        prev.denoised, prev.sigma, prev.sigma_down = uncond, sigma, down
        return self.renoise(state, x, up)
