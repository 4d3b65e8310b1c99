"""``rmse_to_reference``: the error of the final latents to the exact (or high-accuracy reference)
probability-flow ODE solution from the same x_T, for models that know it (``model=gaussian``,
``model=mixture``: ``Model.exact_solution``). A built-in plugin: every run has it."""
from __future__ import annotations

from framework.core.markers import hookimpl


class ExactError:
    @hookimpl
    def run_end(self, run, result):
        sigmas = result.schedule.sigmas
        exact = run.model.exact_solution(result.x_T, sigmas[0], sigmas[-1])
        if exact is not None:
            run.metrics["rmse_to_reference"] = float((result.latents - exact).double().pow(2).mean().sqrt())
