"""Sampler names mean what users get under them (issue 28; the name table of docs/solvers.md).

Each ComfyUI / k-diffusion sampler name in the table is pinned by a reference written here from its
published definition (the update equations, the coefficients and the final-step convention, read
from the papers and from ComfyUI's ``comfy/k_diffusion/sampling.py``, diff-sampler's ``solvers.py``
and ``solver_utils.py``), never by calling a plugin: whole runs in float64 on the analytic models
(``gaussian``, ``mixture``, and a conditional mixture with classifier-free guidance), karras and
exponential grids, same x_T. Stochastic samplers replay the noise our run drew. The figure of each
row (printed with ``-s``) is the relative max difference max|ours − reference| / max|reference|.

Final-step conventions (the step onto σ = 0), as each reference states them:
euler, heun, dpm_2, deis (tab), dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_sde: Euler (lands on D);
dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, ipndm, ipndm_v, gradient_estimation: return D; lms: the full
multistep step; ddpm: the posterior mean at σ' = 0 (x̂₀).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from scipy import integrate

from framework import testing
from framework.core.noise import SampleNoise
from framework.models.analytic import Gaussian, Mixture

TOL = 1e-5
STEPS = 10

Denoise = Callable[[torch.Tensor, float], torch.Tensor]
Noise = Iterator[torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Reference samplers: (D, x, σ grid, noise) → x, one short function per published algorithm
# ---------------------------------------------------------------------------------------------
def ancestral(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step: (σ_down, σ_up)."""
    if not eta or s_next == 0:
        return s_next, 0.0
    up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return math.sqrt(s_next**2 - up**2), up


def euler(D: Denoise, x, s, noise=None):
    """Karras et al. 2022, Alg. 1 without the correction."""
    for i in range(len(s) - 1):
        x = euler_step(D, x, D(x, s[i]), s[i], s[i + 1])
    return x


def heun(D: Denoise, x, s, noise=None):
    """Karras et al. 2022, Alg. 1: Euler on the step to 0."""
    for i in range(len(s) - 1):
        d = (x - D(x, s[i])) / s[i]
        x_e = x + (s[i + 1] - s[i]) * d
        if s[i + 1] == 0:
            x = x_e
            continue
        x = x + (s[i + 1] - s[i]) * (d + (x_e - D(x_e, s[i + 1])) / s[i + 1]) / 2
    return x


def dpm_2_step(D: Denoise, x, den, s: float, target: float):
    """k-diffusion's DPM-Solver-2 from s to target: the derivative at the log-σ midpoint."""
    d = (x - den) / s
    if target == 0:
        return x - s * d
    mid = math.exp((math.log(s) + math.log(target)) / 2)
    x_mid = x + (mid - s) * d
    return x + (target - s) * (x_mid - D(x_mid, mid)) / mid


def dpm_2(D: Denoise, x, s, noise=None):
    for i in range(len(s) - 1):
        x = dpm_2_step(D, x, D(x, s[i]), s[i], s[i + 1])
    return x


def ancestral_sampler(step: Callable) -> Callable:
    """k-diffusion's ancestral samplers: a deterministic ``step(D, x, D(x, σ), σ, σ_down)`` (D itself
    when σ_down = 0), then noise of std σ_up while σ' > 0."""
    def sample(D: Denoise, x, s, noise: Noise, eta: float = 1.0):
        for i in range(len(s) - 1):
            den = D(x, s[i])
            down, up = ancestral(s[i], s[i + 1], eta)
            x = den if down == 0 else step(D, x, den, s[i], down)
            if up > 0:
                x = x + next(noise) * up
        return x

    return sample


def euler_step(D: Denoise, x, den, s: float, target: float):
    return x + (target - s) * (x - den) / s


def dpmpp_2s_step(D: Denoise, x, den, s: float, target: float):
    """Lu et al. 2022b, Alg. 1 with r = 1/2: DPM-Solver++(1) to the λ-midpoint, then along its D."""
    mid = math.sqrt(s * target)
    x_2 = (mid / s) * x + (1 - mid / s) * den
    return (target / s) * x + (1 - target / s) * D(x_2, mid)


euler_ancestral = ancestral_sampler(euler_step)
dpm_2_ancestral = ancestral_sampler(dpm_2_step)
dpmpp_2s_ancestral = ancestral_sampler(dpmpp_2s_step)


def lms(D: Denoise, x, s, noise=None, order: int = 4, epsrel: float = 1e-4):
    """k-diffusion's sample_lms: coefficients ∫ ℓ_j(τ) dτ by scipy quad with its epsrel (1e-4)."""
    ds = []
    for i in range(len(s) - 1):
        ds.append((x - D(x, s[i])) / s[i])
        k = min(i + 1, order)

        def basis(tau, j):
            return math.prod((tau - s[i - m]) / (s[i - j] - s[i - m]) for m in range(k) if m != j)

        coeffs = [integrate.quad(basis, s[i], s[i + 1], args=(j,), epsrel=epsrel)[0] for j in range(k)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds[-k:])))
    return x


def dpmpp_2m(D: Denoise, x, s, noise=None):
    """Lu et al. 2022b, Alg. 2 (k-diffusion form): D̃ = (1 + 1/2r)·D − (1/2r)·D_prev, first order
    on the first step and on the step to 0 (which returns D)."""
    old = None
    for i in range(len(s) - 1):
        den = D(x, s[i])
        if s[i + 1] == 0:
            x = den
        else:
            h = math.log(s[i] / s[i + 1])
            d = den
            if old is not None:
                r = math.log(s[i - 1] / s[i]) / h
                d = (1 + 1 / (2 * r)) * den - old / (2 * r)
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
        old = den
    return x


def dpmpp_sde_eta0(D: Denoise, x, s, noise=None, r: float = 0.5):
    """k-diffusion's sample_dpmpp_sde at η = 0: DPM-Solver++(2S) with the intermediate point at the
    λ-fraction r and D̃ = (1 − 1/2r)·D + (1/2r)·D_s; Euler on the step to 0."""
    for i in range(len(s) - 1):
        den = D(x, s[i])
        if s[i + 1] == 0:
            x = den
            continue
        mid = s[i] ** (1 - r) * s[i + 1] ** r
        x_2 = (mid / s[i]) * x + (1 - mid / s[i]) * den
        d = (1 - 1 / (2 * r)) * den + D(x_2, mid) / (2 * r)
        x = (s[i + 1] / s[i]) * x + (1 - s[i + 1] / s[i]) * d
    return x


def dpmpp_2m_sde(D: Denoise, x, s, noise: Noise, eta: float = 1.0, solver_type: str = "midpoint"):
    """k-diffusion's sample_dpmpp_2m_sde (ComfyUI's dpmpp_2m_sde / _heun)."""
    old, h_last = None, None
    for i in range(len(s) - 1):
        den = D(x, s[i])
        if s[i + 1] == 0:
            x = den
        else:
            h = math.log(s[i] / s[i + 1])
            eh = eta * h
            a = -math.expm1(-h - eh)
            x = (s[i + 1] / s[i]) * math.exp(-eh) * x + a * den
            if old is not None:
                w = 0.5 * a if solver_type == "midpoint" else a / (-h - eh) + 1
                x = x + w * (h / h_last) * (den - old)
            if eta:
                x = x + next(noise) * s[i + 1] * math.sqrt(-math.expm1(-2 * eh))
            h_last = h
        old = den
    return x


def dpmpp_3m_sde(D: Denoise, x, s, noise: Noise, eta: float = 1.0):
    """k-diffusion's sample_dpmpp_3m_sde (ComfyUI's dpmpp_3m_sde): no lower-order final steps."""
    d1, d2, h1, h2 = None, None, None, None
    for i in range(len(s) - 1):
        den = D(x, s[i])
        h = None
        if s[i + 1] == 0:
            x = den
        else:
            h = math.log(s[i] / s[i + 1])
            he = h * (eta + 1)
            x = math.exp(-he) * x - math.expm1(-he) * den
            phi2 = math.expm1(-he) / he + 1
            if h2 is not None:
                r0, r1 = h1 / h, h2 / h
                e0, e1 = (den - d1) / r0, (d1 - d2) / r1
                x = x + phi2 * (e0 + (e0 - e1) * r0 / (r0 + r1)) - (phi2 / he - 0.5) * (e0 - e1) / (r0 + r1)
            elif h1 is not None:
                x = x + phi2 * (den - d1) / (h1 / h)
            if eta:
                x = x + next(noise) * s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta))
        d1, d2, h1, h2 = den, d1, h, h1
    return x


def ddpm(D: Denoise, x, s, noise: Noise):
    """ComfyUI's DDPMSampler_step in the VP frame: μ = (x_vp − (1 − α)/√(1 − ᾱ)·ε)/√α, plus the
    posterior std (fixed small) × noise while σ' > 0 (Ho et al. 2020, Alg. 2)."""
    for i in range(len(s) - 1):
        eps = (x - D(x, s[i])) / s[i]
        ac, ac_prev = 1 / (s[i] ** 2 + 1), 1 / (s[i + 1] ** 2 + 1)
        alpha = ac / ac_prev
        mu = (x / math.sqrt(1 + s[i] ** 2) - (1 - alpha) * eps / math.sqrt(1 - ac)) / math.sqrt(alpha)
        if s[i + 1] > 0:
            mu = mu + math.sqrt((1 - alpha) * (1 - ac_prev) / (1 - ac)) * next(noise)
            mu = mu * math.sqrt(1 + s[i + 1] ** 2)
        x = mu
    return x


def ipndm(D: Denoise, x, s, noise=None, max_order: int = 4, final: str = "denoise"):
    """diff-sampler's ipndm_sampler (ComfyUI's ipndm): equal-step AB_k, k = min(i + 1, 4); on the
    step to 0 ComfyUI returns D (``final="denoise"``), samplerlab's default keeps the AB step."""
    ab = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    ds: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        den = D(x, s[i])
        ds.insert(0, (x - den) / s[i])
        k = min(max_order, i + 1)
        if s[i + 1] == 0 and final == "denoise":
            x = den
        else:
            x = x + (s[i + 1] - s[i]) * sum(c * d for c, d in zip(ab[k], ds))
    return x


def ipndm_v_weights(h: list[float]) -> list[float]:
    """diff-sampler's ipndm_v_sampler coefficients as published (h_n, h_n_1, … = steps, newest
    first): the 'coeff1…coeff4' of its variable-step formulas, transcribed term by term."""
    hn = h[0]
    if len(h) == 1:
        return [1.0]
    h1 = h[1]
    c12 = [(2 + hn / h1) / 2, -(hn / h1) / 2]
    if len(h) == 2:
        return c12
    h2 = h[2]
    t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
    if len(h) == 3:
        return [c12[0] + t1, c12[1] - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = h[3]
    t2 = ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) \
        * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    g = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [c12[0] + t1 + t2,
            c12[1] - (1 + h1 / h2) * t1 - (1 + h1 / h2 + g) * t2,
            t1 * h1 / h2 + (h1 / h2 + g * (1 + h2 / h3)) * t2,
            -t2 * g * h1 / h2]


def ipndm_v(D: Denoise, x, s, noise=None, max_order: int = 4):
    """diff-sampler's ipndm_v_sampler (ComfyUI's ipndm_v): returns D on the step to 0."""
    ds: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        den = D(x, s[i])
        ds.insert(0, (x - den) / s[i])
        k = min(max_order, i + 1)
        if s[i + 1] == 0:
            x = den
        else:
            h = [s[i + 1] - s[i]] + [s[i - j] - s[i - j - 1] for j in range(k - 1)]
            x = x + h[0] * sum(c * d for c, d in zip(ipndm_v_weights(h), ds))
    return x


def vp_betas(sigma_min: float = 0.002, sigma_max: float = 80.0, eps: float = 1e-3) -> tuple[float, float]:
    """(β_d, β_min) of the linear-β VP-SDE with σ(eps) = σ_min, σ(1) = σ_max (diff-sampler's edm2t)."""
    lo, hi = math.log(sigma_min**2 + 1), math.log(sigma_max**2 + 1)
    beta_d = 2 * (lo / eps - hi) / (eps - 1)
    return beta_d, hi - 0.5 * beta_d


def vp_t(sigma: float, beta_d: float, beta_min: float) -> float:
    return (math.sqrt(beta_min**2 + 2 * beta_d * math.log(sigma**2 + 1)) - beta_min) / beta_d


def deis_tab_coefficients(nodes: list[float], sigma_next: float) -> list[float]:
    """DEIS tAB (Zhang & Chen 2023): C_j = ∫_{t_i}^{t_{i+1}} (dσ/dτ)·ℓ_j(τ) dτ over the VP times
    t_{i−j} = t(σ_{i−j}) of ``nodes`` (newest first), with σ(τ) = √(exp(β_d τ²/2 + β_min τ) − 1),
    so dσ/dτ = (β_d τ + β_min)(1 + σ²)/(2σ) — by adaptive quadrature in τ (ComfyUI sums 10,000
    points: test_deis_tab_against_comfyui_quadrature)."""
    beta_d, beta_min = vp_betas()
    ts = [vp_t(v, beta_d, beta_min) for v in nodes]

    def kernel(tau, j):
        e = math.exp(beta_d * tau * tau / 2 + beta_min * tau)
        dsig = (beta_d * tau + beta_min) * e / (2 * math.sqrt(e - 1))
        return dsig * math.prod((tau - ts[m]) / (ts[j] - ts[m]) for m in range(len(ts)) if m != j)

    t_next = vp_t(sigma_next, beta_d, beta_min)
    return [integrate.quad(kernel, ts[0], t_next, args=(j,), epsabs=0, epsrel=1e-13, limit=200)[0]
            for j in range(len(ts))]


def deis_tab(D: Denoise, x, s, noise=None, max_order: int = 3, coefficients=deis_tab_coefficients):
    """ComfyUI's sample_deis with deis_mode='tab' (from diff-sampler): the step to σ = 0 is Euler."""
    ds: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        ds.insert(0, (x - D(x, s[i])) / s[i])
        k = 1 if s[i + 1] == 0 else min(max_order, i + 1)
        if k == 1:
            x = x + (s[i + 1] - s[i]) * ds[0]
        else:
            x = x + sum(c * d for c, d in zip(coefficients([s[i - j] for j in range(k)], s[i + 1]), ds))
    return x


def deis_logrho(D: Denoise, x, s, noise=None, order: int = 3):
    """diffusers' DEISMultistepScheduler (ρAB-DEIS, ``solver_type="logrho"``) in σ-space: ε
    interpolated by a polynomial in log ρ (ρ = σ), integrated over ρ; lower_order_final on grids of
    < 15 steps (last step first order, the one before at most second); first order onto σ = 0."""
    n = len(s) - 1
    ds: list[torch.Tensor] = []
    for i in range(n):
        ds.insert(0, (x - D(x, s[i])) / s[i])
        k = min(order, i + 1)
        if s[i + 1] == 0 or (n < 15 and i == n - 1):
            k = 1
        elif n < 15 and i == n - 2:
            k = min(k, 2)
        logs = [math.log(s[i - j]) for j in range(k)]

        def basis(rho, j):
            return math.prod((math.log(rho) - logs[m]) / (logs[j] - logs[m]) for m in range(k) if m != j)

        coeffs = [integrate.quad(basis, s[i], s[i + 1], args=(j,), epsabs=0, epsrel=1e-13)[0] for j in range(k)]
        x = x + sum(c * d for c, d in zip(coeffs, ds))
    return x


def gradient_estimation(D: Denoise, x, s, noise=None, gamma: float = 2.0):
    """ComfyUI's sample_gradient_estimation (Permenter & Yuan 2024, Alg. 2): Euler along
    d + (γ − 1)(d − d_prev) from the second step on; the step to σ = 0 returns D uncorrected."""
    old = None
    for i in range(len(s) - 1):
        den = D(x, s[i])
        d = (x - den) / s[i]
        if s[i + 1] == 0:
            x = den
        else:
            x = x + (s[i + 1] - s[i]) * d
            if old is not None:
                x = x + (gamma - 1) * (d - old) * (s[i + 1] - s[i])
        old = d
    return x


def comfyui_tab_coefficients(dtype: torch.dtype) -> Callable[[list[float], float], list[float]]:
    """ComfyUI's way of computing the same C_j (its k_diffusion/deis.py, after diff-sampler's
    solver_utils.py): β's and VP times in the sigmas' dtype (float32 in ComfyUI), then N = 10,000
    equally spaced τ including both ends, each weighted (t_next − t)/N."""
    def coefficients(nodes: list[float], sigma_next: float) -> list[float]:
        lo, hi = torch.tensor(0.002**2 + 1, dtype=dtype).log(), torch.tensor(80.0**2 + 1, dtype=dtype).log()
        beta_d = 2 * (lo / 1e-3 - hi) / (1e-3 - 1)
        beta_min = hi - 0.5 * beta_d
        sig = torch.tensor(nodes + [sigma_next], dtype=dtype)
        t = ((beta_min**2 + 2 * beta_d * (sig**2 + 1).log()).sqrt() - beta_min) / beta_d
        n = 10_000
        taus = torch.linspace(float(t[0]), float(t[-1]), n, dtype=dtype)
        alpha = torch.exp(-0.5 * taus**2 * beta_d - taus * beta_min)
        kernel = 0.5 * (beta_d * taus + beta_min) / torch.sqrt(alpha * (1 - alpha))
        out = []
        for j in range(len(nodes)):
            basis = torch.ones_like(taus)
            for m in range(len(nodes)):
                if m != j:
                    basis = basis * (taus - t[m]) / (t[j] - t[m])
            out.append(float((kernel * basis).sum() * (t[-1] - t[0]) / n))
        return out

    return coefficients


# ---------------------------------------------------------------------------------------------
# Models: the analytic two, and a conditional mixture guided by CFG
# ---------------------------------------------------------------------------------------------
class ConditionalMixture(Mixture):
    """The mixture shifted by its prompt: D(x, σ | c) = D_mixture(x − c, σ) + c, c = len(prompt)/4
    along every axis (0 for the empty negative prompt), so CFG's D_u + s·(D_c − D_u) is nonlinear."""

    is_conditional = True
    exact_solution = None  # no reference solution: the run is compared with the reference sampler

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"c": torch.tensor([[len(p) / 4] for p in prompts], dtype=torch.float64)}

    def __call__(self, x, sigma, c=None):
        c = torch.zeros(x.shape[0], 1, dtype=x.dtype) if c is None else c.to(x.dtype)
        return Mixture.__call__(self, x - c, sigma) + c


PROMPTS, CFG_SCALE = ["a red circle", "a blue square"], 3.0
CFG_MODEL = ConditionalMixture()
MODELS = {"gaussian": Gaussian(), "mixture": Mixture(), "mixture_cfg": CFG_MODEL}


def reference_denoiser(model: str) -> Denoise:
    inner = MODELS[model]

    def D(x: torch.Tensor, sigma: float) -> torch.Tensor:
        s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
        if model != "mixture_cfg":
            return inner(x, s)
        cond = inner(x, s, CFG_MODEL.encode_prompts(PROMPTS)["c"])
        uncond = inner(x, s, CFG_MODEL.encode_prompts([""] * x.shape[0])["c"])
        return uncond + CFG_SCALE * (cond - uncond)

    return D


GRIDS = {"karras": [], "exponential": ["schedule=exponential"]}


def record_draws(monkeypatch) -> list[torch.Tensor]:
    """Every unit-noise draw of the runs that follow (SampleNoise.draw), in order: x_T's, then the
    steps', for replaying them in a reference."""
    draws: list[torch.Tensor] = []
    original = SampleNoise.draw

    def recording(self):
        out = original(self)
        draws.append(out.clone())
        return out

    monkeypatch.setattr(SampleNoise, "draw", recording)
    return draws


def ours_and_reference(overrides, reference, model: str, grid: str, monkeypatch, steps: int = STEPS,
                       **kw) -> tuple[float, float]:
    """(relative max difference, max |reference|) of a whole run against the reference sampler
    from the same x_T on the same σ grid, replaying the noise our run drew."""
    draws = record_draws(monkeypatch)
    extra = [f"prompts=[{','.join(PROMPTS)}]", f"cfg_scale={CFG_SCALE}"] if model == "mixture_cfg" else []
    target = CFG_MODEL if model == "mixture_cfg" else model
    res = testing.sample(list(overrides) + GRIDS[grid] + extra, model=target, steps=steps, num_samples=2)
    expected = reference(reference_denoiser(model), res.x_T.clone(), list(res.schedule.sigmas), iter(draws[1:]), **kw)
    scale = expected.abs().max().item()
    return (res.latents - expected).abs().max().item() / scale, scale


# ---------------------------------------------------------------------------------------------
# The names: ComfyUI / k-diffusion name → (samplerlab overrides, reference, its keyword arguments)
# ---------------------------------------------------------------------------------------------
NAMES: dict[str, tuple[list[str], Callable, dict]] = {
    "euler": (["solver=euler"], euler, {}),
    "euler_ancestral": (["solver=euler_ancestral"], euler_ancestral, {}),
    "heun": (["solver=heun"], heun, {}),
    "dpm_2": (["solver=dpm_2"], dpm_2, {}),
    "dpm_2_ancestral": (["solver=dpm_2_ancestral"], dpm_2_ancestral, {}),
    "lms": (["solver=lms"], lms, {}),
    "dpmpp_2s_ancestral": (["solver=dpmpp_2s_ancestral"], dpmpp_2s_ancestral, {}),
    "dpmpp_sde (eta 0)": (["solver=dpmpp_sde", "solver.eta=0"], dpmpp_sde_eta0, {}),
    "dpmpp_2m": (["solver=dpmpp_2m"], dpmpp_2m, {}),
    "dpmpp_2m_sde": (["solver=dpmpp_2m_sde"], dpmpp_2m_sde, {}),
    "dpmpp_2m_sde_heun": (["solver=dpmpp_2m_sde", "solver.solver_type=heun"], dpmpp_2m_sde, {"solver_type": "heun"}),
    "dpmpp_3m_sde": (["solver=dpmpp_3m_sde", "solver.lower_order_final=false"], dpmpp_3m_sde, {}),
    "ddpm": (["solver=ddpm"], ddpm, {}),
    "ipndm": (["solver=ipndm", "solver.final=denoise"], ipndm, {}),
    "ipndm_v": (["solver=ipndm_v", "solver.final=denoise"], ipndm_v, {}),
    # ComfyUI's numbers: its 10,000-point sum for the tAB coefficients, in float32 as ComfyUI computes them
    "deis": (["solver=deis_tab", "solver.quadrature=riemann"], deis_tab,
             {"coefficients": comfyui_tab_coefficients(torch.float32)}),
    "gradient_estimation": (["solver=euler", "momentum=[gradient_estimation]", "momentum.gradient_estimation.final=denoise"],
                            gradient_estimation, {}),
    # samplerlab's own conventions, pinned the same way
    "samplerlab ipndm (AB step to 0)": (["solver=ipndm"], ipndm, {"final": "multistep"}),
    "samplerlab ipndm_v max_order=3": (["solver=ipndm_v", "solver.max_order=3", "solver.final=denoise"], ipndm_v,
                                       {"max_order": 3}),
    "samplerlab deis_tab (exact tAB)": (["solver=deis_tab"], deis_tab, {}),
    "samplerlab deis_tab order=4": (["solver=deis_tab", "solver.order=4"], deis_tab, {"max_order": 4}),
    "diffusers deis (logrho, order 3)": (["solver=deis"], deis_logrho, {}),
    "diffusers deis (logrho, order 2)": (["solver=deis", "solver.order=2"], deis_logrho, {"order": 2}),
}


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", list(NAMES))
def test_name_reproduces_its_published_algorithm(name, model, grid, monkeypatch):
    overrides, reference, kw = NAMES[name]
    diff, scale = ours_and_reference(overrides, reference, model, grid, monkeypatch, **kw)
    print(f"name {name} | {model} | {grid}: relative max difference {diff:.2e} (|x| ≤ {scale:.3g})")
    assert diff <= TOL


# Where samplerlab's default differs from the ComfyUI name, the difference is deliberate and
# measured (docs/solvers.md, "differs because"): mixture, karras, 10 steps.
DEFAULTS = {
    "ipndm": (["solver=ipndm"], ipndm, {}),  # keeps the AB step onto σ = 0
    "gradient_estimation": (["solver=euler", "momentum=[gradient_estimation]"], gradient_estimation, {}),
    "deis": (["solver=deis"], deis_tab, {}),  # diffusers' log-ρ DEIS
    "dpmpp_3m_sde": (["solver=dpmpp_3m_sde"], dpmpp_3m_sde, {}),  # diffusers' lower_order_final
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_samplerlab_defaults_differ_where_documented(name, monkeypatch):
    overrides, reference, kw = DEFAULTS[name]
    diff, _ = ours_and_reference(overrides, reference, "mixture", "karras", monkeypatch, **kw)
    print(f"default {name}: relative max difference to ComfyUI's {diff:.2e}")
    assert diff > 2 * TOL


def test_ipndm_v_published_weights():
    """The published variable-step weights: AB2 exactly; AB3 on equal steps; at max_order 4 the
    weights on equal steps are (57, −65, 43, −11)/24 — not AB4's (55, −59, 37, −9)/24, a third-order
    rule — and on unequal steps they do not sum to 1 (why ipndm_v's default has no asymptotic order
    on karras; docs/solvers.md)."""
    from framework.maths.multistep import AB, ipndm_v_coefficients

    for k in (1, 2, 3):
        assert ipndm_v_coefficients([-1.0] * k) == pytest.approx(AB[k], abs=1e-15)
    assert ipndm_v_coefficients([-1.0] * 4) == pytest.approx([57 / 24, -65 / 24, 43 / 24, -11 / 24], abs=1e-15)
    rng = np.random.default_rng(0)
    for _ in range(20):
        h = list(-rng.uniform(0.2, 2.0, size=4))
        for k in (1, 2, 3, 4):
            assert ipndm_v_coefficients(h[:k]) == pytest.approx(ipndm_v_weights(h[:k]), rel=1e-12)
        assert sum(ipndm_v_coefficients(h[:3])) == pytest.approx(1, abs=1e-12)
    assert abs(sum(ipndm_v_coefficients([-1.0, -1.5, -2.0, -3.0])) - 1) > 1e-3


def test_deis_tab_weights_are_the_tab_integral():
    """framework.maths' tAB weights (Gauss–Legendre in log σ) against the τ-integral by quad, on a
    karras grid's steps of every size."""
    from framework.maths.multistep import VPTime, deis_tab_weights

    assert VPTime().betas == pytest.approx(vp_betas(), rel=1e-14)
    s = [float(v) for v in testing.sample(["solver=euler"], steps=10).schedule.sigmas[:-1]]
    for i in range(3, len(s) - 1):
        for k in (2, 3, 4):
            nodes = [s[i - j] for j in range(k)]
            got = deis_tab_weights(nodes, s[i], s[i + 1], VPTime())
            assert got == pytest.approx(deis_tab_coefficients(nodes, s[i + 1]), rel=1e-10, abs=1e-12 * abs(s[i + 1] - s[i]))


@pytest.mark.parametrize("steps", [5, 10])
def test_deis_tab_exact_against_comfyui_quadrature(steps, monkeypatch):
    """How far ComfyUI's own numbers sit from the exact tAB integral (``quadrature: exact``): the
    reference with ComfyUI's 10,000-point float32 sum against our exact run (mixture, karras):
    measured 2.8e-4 at 5 steps, 1.2e-5 at 10 (docs/solvers.md; 3.3e-6 at 20)."""
    diff, _ = ours_and_reference(["solver=deis_tab"], deis_tab, "mixture", "karras", monkeypatch, steps,
                                 coefficients=comfyui_tab_coefficients(torch.float32))
    print(f"deis_tab exact vs ComfyUI's quadrature, {steps} steps: relative max difference {diff:.2e}")
    assert 1e-6 < diff < 1e-3
