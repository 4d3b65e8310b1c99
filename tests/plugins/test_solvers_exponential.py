"""The tableau solver (plugins/solver/tableau.py, presets in framework/maths/tableaux.py) and the RES
multistep family (plugins/solver/res_multistep.py): measured order of every preset, parity with
the published algorithms written out independently here, NFE, and the one-line errors of bad
tableaux. The conformance kit (NFE honesty, determinism, batch invariance) runs on every
conf/solver entry in tests/plugins/test_solvers.py, which merges CLASSIFIED and STOCHASTIC.
Measured numbers are recorded in docs/solvers.md ("Tableau solver")."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from framework import testing
from framework.core.errors import ConfigError
from framework.entry.api import run
from framework.maths.tableaux import TABLEAUX, build, preset

CLASSIFIED = {
    "tableau": "order of every preset and parity: tests/plugins/test_solvers_exponential.py",
    "res_2s": "tableau preset res_2s: tests/plugins/test_solvers_exponential.py",
    "res_3s": "tableau preset res_3s: tests/plugins/test_solvers_exponential.py",
    "res_5s": "tableau preset res_5s: tests/plugins/test_solvers_exponential.py",
    "res_multistep": "order 2 and parity with the k-diffusion loop: tests/plugins/test_solvers_exponential.py",
    "res_multistep_cfg_pp": "parity with the ComfyUI update on CFG data: tests/plugins/test_solvers_exponential.py",
}
STOCHASTIC = {"res_multistep_ancestral": [], "res_multistep_ancestral_cfg_pp": []}

# The exponential grid ending at σ_min without the final step to 0: the fixed-size first-order step
# σ_min → 0 (error ≈ σ_min²/2 ≈ 2e-6) would floor the high-order methods' errors (tests/plugins/test_solvers.py).
EXP = ["schedule=exponential", "schedule.final_zero=false"]

# Theory: the classical order of each tableau (framework/maths/tableaux.py states it per preset too).
# Exponential RK methods in λ have the classical order of their h → 0 limit (their coefficients
# satisfy the classical conditions as z → 0); the non-linearity D is smooth, so stiff order does not
# enter. One exception, measured and stated: ETD3RK on the Gaussian, whose ODE in λ is linear in x,
# shows order 4 (3.98 at 64→128, 3.99 at 128→256; likely because its weights are the exponential
# Simpson rule, nodes 0, 1/2, 1, a fourth-order quadrature — not proven); on the mixture it is 3 (2.92).
THEORY = {
    "euler": 1, "heun": 2, "ralston": 2, "kutta3": 3, "bogacki_shampine": 3, "rk4": 4,
    "ddim": 1, "dpmpp_2s": 2, "res_2s": 2, "res_3s": 3, "res_5s": 4, "etdrk2": 2, "etdrk3": 3, "etdrk4": 4, "lawson": 4,
}
EXPECTED = {("etdrk3", "gaussian"): 4}
# HO's five-stage method on the mixture is still pre-asymptotic at 64→128 (1.74 / 3.67 / 3.84 over
# 32→64→128→256, measured), so it is measured over 128→256.
STEPS = {("res_5s", "mixture"): (128, 256)}
FAST_MIXTURE = {"heun", "res_2s", "res_3s"}


def test_theory_table_covers_every_preset_and_agrees_with_it():
    assert sorted(THEORY) == sorted(TABLEAUX)
    assert {n: p.order for n, p in TABLEAUX.items()} == THEORY


@pytest.mark.parametrize("name", list(THEORY))
def test_preset_order_gaussian(name):
    expected = EXPECTED.get((name, "gaussian"), THEORY[name])
    testing.assert_order(["solver=tableau", f"solver.preset={name}"] + EXP, expected, model="gaussian")


@pytest.mark.parametrize("name", [n if n in FAST_MIXTURE else pytest.param(n, marks=pytest.mark.slow) for n in THEORY])
def test_preset_order_mixture(name):
    testing.assert_order(["solver=tableau", f"solver.preset={name}"] + EXP, THEORY[name], model="mixture",
                         steps=STEPS.get((name, "mixture"), (64, 128)))


@pytest.mark.parametrize("name,order,grid", [("rk4", 4, EXP), ("res_5s", 4, EXP),
                                             ("res_2s", 2, ["schedule=flow_match"])])
def test_order_on_the_gaussians_flow_twin(name, order, grid):
    """The same exact paths served through a flow model's arithmetic (v-prediction in t); flow_match starts
    at σ = ∞ (the engine's limit step). Measured: rk4 4.01, res_5s 3.95 (E), res_2s 2.03 (flow_match). On
    flow_match the fourth-order methods measure 2 (rk4 2.01): the Euler step from its last σ ≈ 1/N to 0."""
    from framework.models.analytic import Gaussian
    from framework.models.base import wrap_model

    testing.assert_order(["solver=tableau", f"solver.preset={name}"] + grid, order,
                         model=wrap_model(Gaussian(parametrization="flow")))


@pytest.mark.parametrize("model", ["gaussian", pytest.param("mixture", marks=pytest.mark.slow)])
def test_res_multistep_order(model):
    """Second order (the karras grid, first and last steps Euler, as dpmpp_2m)."""
    testing.assert_order(["solver=res_multistep"], 2, model=model)


# ---------------------------------------------------------------------------------------------
# Parity: the published algorithms, written out here from their papers' formulas
# ---------------------------------------------------------------------------------------------
MIX = ["dtype=float64", "steps=8", "num_samples=3", "batch_size=3"]


def _phi1(z):
    return math.expm1(z) / z


def _phi2(z):
    return (_phi1(z) - 1) / z


def _phi3(z):
    return (_phi2(z) - 0.5) / z


def _rk_sigma(a, b, c):
    """A classical explicit RK step in σ on dx/dσ = (x − D)/σ."""
    def step(D, x, s, s1):
        dt, ks = s1 - s, []
        for i in range(len(b)):
            si = s + c[i] * dt
            xi = x + dt * sum(a[i][j] * ks[j] for j in range(i)) if i else x
            ks.append((xi - D(xi, si)) / si)
        return x + dt * sum(bi * k for bi, k in zip(b, ks))
    return step


REF_SIGMA = {
    "heun": _rk_sigma([[], [1]], [0.5, 0.5], [0, 1]),
    "ralston": _rk_sigma([[], [2 / 3]], [0.25, 0.75], [0, 2 / 3]),
    "kutta3": _rk_sigma([[], [0.5], [-1, 2]], [1 / 6, 2 / 3, 1 / 6], [0, 0.5, 1]),
    "bogacki_shampine": _rk_sigma([[], [0.5], [0, 0.75]], [2 / 9, 1 / 3, 4 / 9], [0, 0.5, 0.75]),
    "rk4": _rk_sigma([[], [0.5], [0, 0.5], [0, 0, 1]], [1 / 6, 1 / 3, 1 / 3, 1 / 6], [0, 0.5, 0.5, 1]),
}


def _etd2rk(D, x, s, s1):
    """Cox & Matthews (2002) ETD2RK for u' = cu + F with c = −1, F = D, in λ (h = log σ/σ')."""
    h, c = math.log(s / s1), -1.0
    a = x * math.exp(c * h) + D(x, s) * math.expm1(c * h) / c
    return a + (D(a, s1) - D(x, s)) * (math.expm1(c * h) - h * c) / (h * c * c)


def _etd3rk(D, x, s, s1):
    """Cox & Matthews (2002) ETD3RK."""
    h, c = math.log(s / s1), -1.0
    e, e2, sm = math.exp(c * h), math.exp(c * h / 2), s * math.exp(-h / 2)
    fu = D(x, s)
    a = x * e2 + (e2 - 1) * fu / c
    fa = D(a, sm)
    b = x * e + (e - 1) * (2 * fa - fu) / c
    fb = D(b, s1)
    hc = h * c
    return x * e + (fu * (-4 - hc + e * (4 - 3 * hc + hc**2)) + 4 * fa * (2 + hc + e * (-2 + hc))
                    + fb * (-4 - 3 * hc - hc**2 + e * (4 - hc))) / (h**2 * c**3)


def _etdrk4(D, x, s, s1):
    """Cox & Matthews (2002) ETDRK4."""
    h, c = math.log(s / s1), -1.0
    e, e2, sm = math.exp(c * h), math.exp(c * h / 2), s * math.exp(-h / 2)
    fu = D(x, s)
    a = x * e2 + (e2 - 1) * fu / c
    fa = D(a, sm)
    b = x * e2 + (e2 - 1) * fa / c
    fb = D(b, sm)
    cc = a * e2 + (e2 - 1) * (2 * fb - fu) / c
    fc = D(cc, s1)
    hc = h * c
    return x * e + (fu * (-4 - hc + e * (4 - 3 * hc + hc**2)) + 2 * (fa + fb) * (2 + hc + e * (-2 + hc))
                    + fc * (-4 - 3 * hc - hc**2 + e * (4 - hc))) / (h**2 * c**3)


def _lawson4(D, x, s, s1):
    """Lawson (1967): the classical RK4 on v(τ) = e^τ·x(λ + τ), v' = e^τ·D(e^(−τ)v, σe^(−τ))."""
    h = math.log(s / s1)

    def f(tau, v):
        return math.exp(tau) * D(math.exp(-tau) * v, s * math.exp(-tau))
    k1 = f(0, x)
    k2 = f(h / 2, x + h / 2 * k1)
    k3 = f(h / 2, x + h / 2 * k2)
    k4 = f(h, x + h * k3)
    return math.exp(-h) * (x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4))


def _res_2s(D, x, s, s1, c2=0.5):
    """RES second order (Zhang et al. 2023; Hochbruck & Ostermann's conditions b1 + b2 = φ1, b2·c2 = φ2)."""
    h = math.log(s / s1)
    s2 = s * math.exp(-c2 * h)
    d1 = D(x, s)
    d2 = D(math.exp(-c2 * h) * x + h * c2 * _phi1(-c2 * h) * d1, s2)
    b2 = _phi2(-h) / c2
    return math.exp(-h) * x + h * ((_phi1(-h) - b2) * d1 + b2 * d2)


def _res_3s(D, x, s, s1, c2=0.5, c3=1.0):
    """RES4LYF's res_3s: γ = (3c3³ − 2c3)/(c2(2 − 3c2)), a32 = γc2φ_{2,2} + (c3²/c2)φ_{2,3},
    a31 = c3φ_{1,3} − a32, b3 = φ2/(γc2 + c3), b2 = γb3, b1 = φ1 − b2 − b3."""
    h = math.log(s / s1)
    g = (3 * c3**3 - 2 * c3) / (c2 * (2 - 3 * c2))
    d1 = D(x, s)
    d2 = D(math.exp(-c2 * h) * x + h * c2 * _phi1(-c2 * h) * d1, s * math.exp(-c2 * h))
    a32 = g * c2 * _phi2(-c2 * h) + c3**2 / c2 * _phi2(-c3 * h)
    a31 = c3 * _phi1(-c3 * h) - a32
    d3 = D(math.exp(-c3 * h) * x + h * (a31 * d1 + a32 * d2), s * math.exp(-c3 * h))
    b3 = _phi2(-h) / (g * c2 + c3)
    b2 = g * b3
    return math.exp(-h) * x + h * ((_phi1(-h) - b2 - b3) * d1 + b2 * d2 + b3 * d3)


def _ho5(D, x, s, s1):
    """Hochbruck & Ostermann (2005), the five-stage method of stiff order 4 (c = 0, ½, ½, 1, ½)."""
    h = math.log(s / s1)
    z, e2, sm = -h, math.exp(-h / 2), s * math.exp(-h / 2)
    p1, p2, p3 = _phi1(z), _phi2(z), _phi3(z)
    q1, q2, q3 = _phi1(z / 2), _phi2(z / 2), _phi3(z / 2)  # φ_{k,i} for c_i = ½
    d1 = D(x, s)
    d2 = D(e2 * x + h * (q1 / 2) * d1, sm)
    d3 = D(e2 * x + h * ((q1 / 2 - q2) * d1 + q2 * d2), sm)
    d4 = D(math.exp(-h) * x + h * ((p1 - 2 * p2) * d1 + p2 * d2 + p2 * d3), s1)
    a52 = q2 / 2 - p3 + p2 / 4 - q3 / 2
    a54 = q2 / 4 - a52
    a51 = q1 / 2 - 2 * a52 - a54
    d5 = D(e2 * x + h * (a51 * d1 + a52 * d2 + a52 * d3 + a54 * d4), sm)
    return math.exp(-h) * x + h * ((p1 - 3 * p2 + 4 * p3) * d1 + (-p2 + 4 * p3) * d4 + (4 * p2 - 8 * p3) * d5)


REF_LAMBDA = {"etdrk2": _etd2rk, "etdrk3": _etd3rk, "etdrk4": _etdrk4, "lawson": _lawson4, "res_2s": _res_2s,
              "res_3s": _res_3s, "res_5s": _ho5}


def _reference_run(step, res) -> torch.Tensor:
    """The whole run with ``step`` on the mixture from the run's own x_T and grid; the step to σ = 0
    lands on D (Euler/DDIM)."""
    model = testing.load_model("mixture").denoiser

    def D(x, s):
        return model(x, torch.full((x.shape[0],), s, dtype=x.dtype))
    x, sig = res.x_T.clone(), res.schedule.sigmas
    for s, s1 in zip(sig[:-1], sig[1:]):
        x = D(x, s) if s1 == 0 else step(D, x, s, s1)
    return x


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


@pytest.mark.parametrize("name", list(REF_SIGMA) + list(REF_LAMBDA))
def test_preset_matches_the_published_algorithm(name):
    """Whole runs on the mixture (8 karras steps, float64): every preset agrees with its method written
    out from the paper here (no tableau machinery) to ≤ 1e-12 relative (measured: ≤ 4e-15)."""
    res = run(["model=mixture", "solver=tableau", f"solver.preset={name}"] + MIX)
    ref = _reference_run({**REF_SIGMA, **REF_LAMBDA}[name], res)
    assert _max_rel(res.latents, ref) <= 1e-12


@pytest.mark.parametrize("name,solver", [("heun", ["solver=heun"]), ("euler", ["solver=euler"]),
                                          ("ddim", ["solver=ddim"]),
                                          ("dpmpp_2s", ["solver=dpmpp_2s_ancestral", "solver.eta=0"])])
def test_presets_are_the_existing_solvers(name, solver):
    """heun and euler in σ are the existing plugins bit for bit; the one-stage exponential method (b = [φ₁])
    is DDIM and dpmpp_2s is DPM-Solver++(2S) to ≤ 1e-12 (measured: 0 and ≤ 2e-15)."""
    ours = run(["model=mixture", "solver=tableau", f"solver.preset={name}"] + MIX).latents
    theirs = run(["model=mixture"] + solver + MIX).latents
    if name in ("heun", "euler"):
        assert torch.equal(ours, theirs)
    assert _max_rel(ours, theirs) <= 1e-12


def test_etdrk2_is_res_2s_with_c2_one():
    """The second-order Hochbruck–Ostermann family b2 = φ₂/c2 at c2 = 1 is ETD2RK (Cox–Matthews's form above)."""
    res = run(["model=mixture", "solver=tableau", "solver.preset=etdrk2"] + MIX)
    ref = _reference_run(functools.partial(_res_2s, c2=1.0), res)
    assert _max_rel(res.latents, ref) <= 1e-12


def test_rk4_on_the_gaussian_meets_the_exact_solution():
    """RK4 on the Gaussian (exact solution x(σ) = x_T·√(1 + σ²)/√(1 + σ_T²)): error 7.8e-6 at 64
    steps and 4.9e-7 at 128 on the exponential grid (measured), vs 0.048 for Euler."""
    res = testing.sample(["solver=tableau", "solver.preset=rk4"] + EXP, model="gaussian", steps=64)
    assert res.record["metrics"]["rmse_to_reference"] < 1e-5


def _kdiff_res_multistep(D, x, sigmas, eta):
    """ComfyUI's res_multistep loop (k-diffusion sampling.py), written from its equations; noise-free."""
    old_d = old_down = None
    for i in range(len(sigmas) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        d = D(x, s)
        up = min(s1, eta * math.sqrt(s1**2 * (s**2 - s1**2) / s**2)) if eta else 0.0
        down = math.sqrt(s1**2 - up**2)
        if down == 0 or old_d is None:
            x = x + (x - d) / s * (down - s)
        else:
            t, t_old, t_next, t_prev = -math.log(s), -math.log(old_down), -math.log(down), -math.log(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            b1, b2 = _phi1(-h) - _phi2(-h) / c2, _phi2(-h) / c2
            x = math.exp(-h) * x + h * (b1 * d + b2 * old_d)
        old_d, old_down = d, down
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_res_multistep_matches_the_kdiffusion_loop(eta):
    """η = 0 and η = 1 with s_noise = 0 (the ancestral σ_down and the c₂ of its history, without the
    noise): ≤ 1e-12 relative to the loop above (measured ≤ 3e-15)."""
    res = run(["model=mixture", "solver=res_multistep", f"solver.eta={eta}", "solver.s_noise=0.0"] + MIX)
    model = testing.load_model("mixture").denoiser
    ref = _kdiff_res_multistep(lambda x, s: model(x, torch.full((x.shape[0],), s, dtype=x.dtype)),
                               res.x_T.clone(), res.schedule.sigmas, eta)
    assert _max_rel(res.latents, ref) <= 1e-12


def test_res_multistep_is_dpmpp_2m_with_the_phi2_term():
    """b₂ = φ₂/c₂ with c₂ = −h_prev/h is DPM-Solver++(2M)'s k-diffusion 'heun' form (≤ 1e-12)."""
    a = run(["model=mixture", "solver=res_multistep"] + MIX).latents
    b = run(["model=mixture", "solver=dpmpp_2m_sde", "solver.eta=0", "solver.solver_type=heun"] + MIX).latents
    assert _max_rel(a, b) <= 1e-12


def test_ancestral_variants_at_eta_zero_are_the_ode_and_cfg_pp_is_plain_without_cfg():
    base = ["model=mixture"] + MIX
    plain = run(base + ["solver=res_multistep"]).latents
    assert torch.equal(run(base + ["solver=res_multistep_ancestral", "solver.eta=0"]).latents, plain)
    assert torch.equal(run(base + ["solver=res_multistep_cfg_pp"]).latents, plain)  # no CFG: D_u = D
    noisy = run(base + ["solver=res_multistep_ancestral"]).latents
    assert not torch.allclose(noisy, plain, atol=1e-3)
    assert torch.equal(run(base + ["solver=res_multistep_ancestral_cfg_pp"]).latents, noisy)


@pytest.mark.parametrize("solver,eta", [("res_multistep_cfg_pp", 0.0), ("res_multistep_ancestral_cfg_pp", 1.0)])
def test_cfg_pp_update_on_cfg_data(solver, eta, tiny_overrides, monkeypatch):
    """On the tiny SD model with CFG (λ = 0.6), every step's output is ComfyUI's CFG++ update applied to
    that step's recorded x, D and D_u (float32: ≤ 1e-5 relative; ancestral with s_noise = 0). The
    solver requested the unconditional pass itself: one batched network call per step."""
    from plugins.solver.res_multistep import ResMultistep

    steps: list[tuple] = []
    inner = ResMultistep.step

    @functools.wraps(inner)
    def recording(self, state, denoise):
        out = inner(self, state, denoise)
        p = state.pred
        steps.append((p.x.clone(), state.sigma, state.sigma_next, p.denoised.clone(), p.uncond_denoised, out.clone()))
        return out

    monkeypatch.setattr(ResMultistep, "step", recording)
    res = run(tiny_overrides + [f"solver={solver}", "solver.s_noise=0.0", "schedule=karras", "steps=6",
                                "cfg_scale=0.6", "prompts=[a red circle,a blue square]", "num_samples=2",
                                "batch_size=2"])
    assert res.record["metrics"]["unet_calls"] == 6 and all(s[4] is not None for s in steps)
    old_u = old_down = None
    for i, (x, s, s1, d, u, out) in enumerate(steps):
        up = min(s1, eta * math.sqrt(s1**2 * (s**2 - s1**2) / s**2)) if eta else 0.0
        down = math.sqrt(s1**2 - up**2)
        if down == 0 or old_u is None:
            ref = d + (x - u) / s * down
        else:
            h = math.log(s / down)
            c2 = (math.log(old_down) - math.log(steps[i - 1][1])) / h
            b1, b2 = _phi1(-h) - _phi2(-h) / c2, _phi2(-h) / c2
            ref = math.exp(-h) * (x + d - u) + h * (b1 * u + b2 * old_u)
        assert _max_rel(out, ref) <= 1e-5, f"step {i}"
        if i + 1 < len(steps):
            assert torch.equal(steps[i + 1][0], out)
        old_u, old_down = u, down
    assert torch.equal(res.latents, steps[-1][5])
    plain = run(tiny_overrides + ["solver=res_multistep", "schedule=karras", "steps=6", "cfg_scale=0.6",
                                  "prompts=[a red circle,a blue square]", "num_samples=2", "batch_size=2"]).latents
    assert _max_rel(res.latents, plain) > 1e-3


def test_cfg_pp_needs_a_cfg_combiner(tiny_overrides):
    with pytest.raises(ConfigError, match=r"^solver=res_multistep_cfg_pp steps to the CFG-guided estimate: add a CFG "
                                          r"combiner") as e:
        run(tiny_overrides + ["solver=res_multistep_cfg_pp", "guidance=[]", "steps=2"])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# NFE, tableaux of one's own, bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,per_step", [("rk4", 4), ("bogacki_shampine", 3), ("res_5s", 5), ("res_2s", 2),
                                            ("ddim", 1)])
def test_nfe_is_stages_per_step_and_one_on_the_last(name, per_step):
    """s stages per step, 1 on the step to σ = 0 (no evaluation there); Bogacki–Shampine's FSAL error
    stage is not part of its third-order solution and is not evaluated."""
    with testing.count_evaluations("gaussian") as counter:
        res = testing.sample(["solver=tableau", f"solver.preset={name}"], model=counter.model, steps=10)
    assert res.record["metrics"]["nfe"] == counter.calls == per_step * 9 + 1


GAUSS = ["model=gaussian", "dtype=float64", "steps=10", "num_samples=2", "batch_size=2", "solver=tableau"]


def test_a_tableau_of_ones_own_equals_the_preset():
    """Written in the config (fractions and φ-expressions as strings; c omitted: the row sums)."""
    own = run(GAUSS + ["solver.preset=null", "solver.space=sigma", "solver.a=[[],['2/3']]", "solver.b=['1/4','3/4']"])
    assert torch.equal(own.latents, run(GAUSS + ["solver.preset=ralston"]).latents)
    own = run(GAUSS + ["solver.preset=null", "solver.space=lambda", "solver.c=[0,'1/2']", "solver.a=[[],['phi1/2']]",
                       "solver.b=['phi1 - 2*phi2','2*phi2']"])
    assert torch.equal(own.latents, run(GAUSS + ["solver.preset=res_2s"]).latents)
    assert run(["model=gaussian", "dtype=float64", "steps=4", "solver=res_2s"]).record["plugins"]["step"] == ["res_2s"]


@pytest.mark.parametrize("overrides,message", [
    (["solver.preset=null", "solver.a=[[],[1,1]]", "solver.b=['1/2','1/2']"],
     r"^solver\.a\[1\]\[1\] = 1: the tableau is not explicit \(a_ij ≠ 0 for j ≥ i\); stage 2 may use only"),
    (["solver.preset=null", "solver.c=[0,'1/2']", "solver.a=[[],[1]]", "solver.b=['1/2','1/2']"],
     r"^row 2 of solver\.a sums to 1, not its node c_2 = 0\.5: rows of a Runge–Kutta tableau sum to their node"),
    (["solver.preset=null", "solver.a=[[],[1]]", "solver.b=['1/2','1/3']"],
     r"^solver\.b sums to 0\.833333, not 1: the weights of a consistent method sum to 1$"),
    (["solver.preset=null", "solver.space=lambda", "solver.a=[[],['phi1']]", "solver.b=['phi1','phi2']"],
     r"^solver\.b sums to 1\.5, not 1 in the limit h → 0"),
    (["solver.preset=rk5"], r"^solver\.preset: unknown tableau 'rk5': did you mean rk4\? presets: euler, heun"),
    (["solver.preset=null", "solver.a=[[],['phi1']]", "solver.b=['1/2','1/2']"],
     r"^solver\.a\[1\]\[0\] = 'phi1' uses φ-functions: those need space: lambda$"),
    (["solver.preset=null", "solver.space=lambda", "solver.a=[[],['phi 1']]", "solver.b=['1/2','1/2']"],
     r"^solver\.a\[1\]\[0\] = 'phi 1' cannot be read: write a number"),
    (["solver.a=[[],[1]]", "solver.b=['1/2','1/2']"], r"^solver\.preset=rk4 and your own a, b: give one of them"),
    (["solver.preset=null", "solver.a=[[]]", "solver.b=['1/2','1/2']"], r"^solver\.a has 1 rows for 2 weights b"),
    (["solver.preset=null", "solver.a=[[],[2]]", "solver.b=['1/2','1/2']"], r"σ-space nodes must lie in \[0, 1\]"),
])
def test_bad_tableaux_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        run(GAUSS + overrides)
    assert "\n" not in str(e.value)


def test_bad_tableau_exits_2_through_the_cli(capsys):
    from framework.entry.cli import main

    assert main(["model=gaussian", "steps=2", "solver=tableau", "solver.preset=null", "solver.a=[[],[1,1]]",
                 "solver.b=[0.5,0.5]", "logger=[]"]) == 2
    assert "not explicit" in capsys.readouterr().err


def test_stages_that_feed_nothing_are_not_evaluated_and_presets_build():
    tab = build("sigma", [[], ["1/2"], [0, "3/4"], ["2/9", "1/3", "4/9"]], ["2/9", "1/3", "4/9", 0])  # BS3 with FSAL
    assert tab.used == (True, True, True, False)
    for name in TABLEAUX:
        a, b = preset(name).weights(-0.7)
        assert all(math.isfinite(v) for row in a for v in row) and all(math.isfinite(v) for v in b)
