"""Typed options that several plugins share (:class:`~framework.core.settings.Choice` enums).

A plugin field typed with one of these (``init_noise: InitNoise = InitNoise.sigma``) is checked by
the plugin's config schema — a value outside the set is a config error naming the allowed ones —
while it still compares equal to its string (``self.init_noise == "vp"``) and the record keeps the
plain string. An option of one plugin only is a ``Choice`` in that plugin's module.
"""
from __future__ import annotations

from framework.core.settings import Choice


class InitNoise(Choice):
    """A schedule's initial noise scale: σ₀ (``sigma``, EDM/k-diffusion) or √(1 + σ₀²) (``vp``,
    diffusers' DDIM and 'leading' spacing: unit-variance noise in the VP frame)."""

    sigma = "sigma"
    vp = "vp"


class ApplyTo(Choice):
    """The prompts a text edit applies to: the prompts (``cond``), the negative prompts of the
    unconditional pass (``uncond``), or ``both``."""

    cond = "cond"
    uncond = "uncond"
    both = "both"


class TextEncoders(Choice):
    """The text encoders a text edit applies to on models with several kinds (SD3, Flux): every
    encoder it can edit (``all``), the CLIP encoders only (``clip``) or T5 only (``t5``)."""

    all = "all"
    clip = "clip"
    t5 = "t5"


class SolverType(Choice):
    """The second-order term of the DPM-Solver++ multistep family: diffusers' ``midpoint`` (D₁/2)
    or k-diffusion's ``heun`` (φ₂-weighted) form."""

    midpoint = "midpoint"
    heun = "heun"


class BH(Choice):
    """UniPC's B(h) (Zhao et al. 2023): −h (``bh1``) or expm1(−h) (``bh2``)."""

    bh1 = "bh1"
    bh2 = "bh2"
