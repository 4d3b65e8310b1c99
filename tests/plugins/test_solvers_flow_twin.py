"""Issue 22's solvers on the Gaussian's flow twin (the exact D served as a flow model's velocity and
turned back by the flow arithmetic, framework/models/flow.py): the measured order is each method's
theory, as in σ-space (float64, 64→128 steps). Measured (σ-space / flow twin, identical to 2 digits):
res_2s 2.00, res_3s 2.92, res_5s 3.95, rk4 4.01, bogacki_shampine 2.98, etdrk3 3.98 (linear ODE),
lawson 3.91, res_multistep 2.09, seeds_2 2.00, seeds_3 2.88, exp_heun_2_x0 1.99, er_sde (2 stages)
2.10, sa_solver (predictor 3) 3.03, dpmpp_singlestep (order 3) 2.92, heunpp2 1.00."""
from __future__ import annotations

import pytest

from framework import testing

EXP = ["schedule=exponential", "schedule.final_zero=false"]
CASES = {  # name: (overrides, theoretical order)
    "res_2s": (["solver=res_2s"] + EXP, 2),
    "res_3s": (["solver=res_3s"] + EXP, 3),
    "res_5s": (["solver=res_5s"] + EXP, 4),
    "rk4": (["solver=tableau"] + EXP, 4),
    "bogacki_shampine": (["solver=tableau", "solver.preset=bogacki_shampine"] + EXP, 3),
    "lawson": (["solver=tableau", "solver.preset=lawson"] + EXP, 4),
    "res_multistep": (["solver=res_multistep"], 2),
    "seeds_2": (["solver=seeds_2", "solver.eta=0"], 2),
    "seeds_3": (["solver=seeds_3", "solver.eta=0"] + EXP, 3),
    "exp_heun_2_x0": (["solver=exp_heun_2_x0"], 2),
    "er_sde_2": (["solver=er_sde", "solver.noise_scaler=ode", "solver.max_stage=2"], 2),
    "sa_solver_p3": (["solver=sa_solver", "solver.eta=0", "solver.predictor_order=3", "solver.corrector_order=0"], 3),
    "dpmpp_singlestep_3": (["solver=dpmpp_singlestep", "solver.order=3"], 3),
    "heunpp2": (["solver=heunpp2"], 1),
}
FAST = {"res_3s", "res_multistep", "seeds_2", "sa_solver_p3", "dpmpp_singlestep_3"}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_order_on_the_flow_twin(name):
    from framework.models.analytic import Gaussian
    from framework.models.base import wrap_model

    overrides, order = CASES[name]
    testing.assert_order(overrides, order, model=wrap_model(Gaussian(parametrization="flow")))
