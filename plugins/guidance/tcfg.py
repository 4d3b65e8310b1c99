"""TCFG, tangential damping CFG (Kwon et al. 2025, "TCFG: Tangential Damping Classifier-free
Guidance", arXiv 2503.18137): the unconditional prediction keeps only its component along the
first right singular vector of the pair.

Per sample, stack P = [p_c; p_u] (2 × n, the predictions flattened), P = U·S·Vᵀ (SVD); the
unconditional prediction is projected on v₁, the leading right singular vector:
p_u' = (p_u·v₁)·v₁ (its tangential part, the one along v₂, is damped to zero); then
p = p_u' + w·(p_c − p_u') with w the top-level ``cfg_scale`` (diffusers' TangentialClassifierFreeGuidance).
The leading right singular vector is computed from the 2 × 2 Gram matrix P·Pᵀ in float64 (v₁ =
Pᵀ·e₁/‖Pᵀ·e₁‖, e₁ its leading eigenvector): the same vector as the SVD's, up to a sign that the
projection does not see.

Space: ``native`` by default (the model's output, where diffusers applies it), ``denoised`` as an
option; the projection makes them differ. ``start``/``stop``: the guidance window as fractions of
the run. Use instead of ``cfg``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import NativeGuidance


@dataclass
class TCFG(NativeGuidance):
    def combine(self, state, cond, uncond):
        pair = torch.stack([cond.flatten(1), uncond.flatten(1)], dim=1).double()  # [B, 2, n]
        _, vectors = torch.linalg.eigh(pair @ pair.transpose(1, 2))  # ascending eigenvalues
        v1 = (pair.transpose(1, 2) @ vectors[:, :, -1:]).squeeze(-1)  # [B, n] ∝ the leading right singular vector
        v1 = v1 / v1.norm(dim=1, keepdim=True).clamp_min(1e-300)
        u = uncond.flatten(1).double()
        projected = ((u * v1).sum(1, keepdim=True) * v1).reshape(uncond.shape).to(uncond.dtype)
        return projected + state.run.settings.cfg_scale * (cond - projected)
