"""The public plugin API: everything a plugin needs, from one import.

```python
from framework.plugin import ConfigError, SamplerState, hookimpl
```

- the hook marker ``hookimpl`` (the hooks and their semantics: :mod:`framework.core.hookspecs`,
  docs/hooks.md);
- the state types the hooks receive and return (``Schedule``, ``Conditioning``, ``Prediction``,
  ``SamplerState``, ``Batch``, ``StepRecord``, ``Run``, ``Result``);
- errors (``ConfigError`` for a configuration that cannot run, with a one-line fix);
- σ-space maths (λ = −log σ, ancestral split, multistep weights, schedule helpers);
- base classes of the plugin families (momentum, CFG combiners, loss guidance, text edits,
  ancestral solvers) and what metric and callback plugins share (distribution metrics, images,
  atomic files, the bundled world).

Built-in plugins import nothing else of the framework (import-linter checks it in CI).
"""
from framework import bundled
from framework.bundled import world
from framework.bases.ancestral import Ancestral
from framework.bases.embeddings import (
    EditPlugin, TextEmbeddings, apply_prompt_weights, load_embeddings, mix_outputs, mix_tokens, replace_token,
    scale_positions,
)
from framework.bases.guidance import JudgeFeatures, UncondGuidance, gram, load_image, perceptual_distance, pixel_size
from framework.bases.guidance import NativeGuidance, PredictionSpace, flat_dot, split_parallel
from framework.bases.loss_guidance import LossGuidance
from framework.bases.momentum import MomentumPlugin, past_derivative
from framework.bases.options import BH, ApplyTo, InitNoise, SolverType
from framework.core.finite import NonFinite, describe
from framework.core.run import Result, Run
from framework.core.errors import ConfigError, ModelNotFoundError, NumericalError, PluginError, SamplerlabError
from framework.core.files import atomic_write_bytes, atomic_write_json
from framework.core.markers import hookimpl
from framework.core.settings import Choice
from framework.core.state import Batch, Conditioning, Prediction, Schedule, StepRecord
from framework.core.step import SamplerState
from framework.maths.exponential import phi, phis
from framework.maths.flow import calculate_shift, flow_config, flow_match_sigmas
from framework.maths.multistep import (
    AB, VPTime, deis_tab_weights, euler_as_linear, fixed_adams_bashforth, ipndm_v_coefficients, linear_update, multistep_update,
    recent_derivatives,
)
from framework.maths.sde import er_sde_integrals, noise_factor, ou_extend, stochastic_adams_weights
from framework.maths.schedules import check_init_noise, finish
from framework.maths.sigmas import (
    INIT_NOISE_MODES, ancestral_split, geometric_mean, init_noise_scale, lagrange_integral_weights, lam,
    flow_sigma, flow_time, log_lagrange_integral_weights, loglinear_interp, multistep_order, sigma_at_time, sigma_range,
    sigma_to_t,
)
from framework.metrics.distribution import RealVsGenerated
from framework.models.flow import FlowModel
from framework.metrics.frechet import frechet_distance, moments
from framework.runs.images import grid, png_bytes, to_pil
from framework.runs.progress import Throttle

__all__ = [
    "AB", "VPTime", "deis_tab_weights", "euler_as_linear", "ipndm_v_coefficients", "linear_update", "multistep_update",
    "recent_derivatives",
    "Ancestral", "ApplyTo", "BH", "Batch", "Choice", "Conditioning", "ConfigError", "EditPlugin", "INIT_NOISE_MODES",
    "InitNoise", "JudgeFeatures", "LossGuidance", "ModelNotFoundError", "MomentumPlugin", "NonFinite",
    "NumericalError", "PluginError", "Prediction", "RealVsGenerated", "Result", "Run", "SamplerState",
    "SamplerlabError", "Schedule", "SolverType", "StepRecord", "TextEmbeddings", "Throttle", "UncondGuidance",
    "ancestral_split", "apply_prompt_weights", "atomic_write_bytes", "atomic_write_json", "bundled",
    "calculate_shift", "check_init_noise", "describe", "finish", "flow_config", "flow_match_sigmas", "flow_sigma",
    "flow_time", "FlowModel", "fixed_adams_bashforth", "frechet_distance", "geometric_mean",
    "gram", "grid", "hookimpl", "init_noise_scale", "lagrange_integral_weights", "lam", "load_embeddings",
    "load_image", "log_lagrange_integral_weights", "loglinear_interp", "mix_outputs", "mix_tokens", "moments",
    "multistep_order", "past_derivative", "phi", "phis", "perceptual_distance", "pixel_size", "png_bytes", "replace_token",
    "scale_positions", "sigma_at_time", "sigma_range", "sigma_to_t", "to_pil", "world",
]
__all__ += ["NativeGuidance", "PredictionSpace", "flat_dot", "split_parallel"]
from framework.bases.options import TextEncoders

__all__ += ["TextEncoders"]
from framework.bases.perturbation import PerturbationGuidance, check_window, default_layers, step_window
from framework.core.perturb import Perturbation, PerturbKind
from framework.maths.blur import gaussian_blur_2d, grid_of

__all__ += ["PerturbationGuidance", "Perturbation", "PerturbKind", "check_window", "default_layers", "step_window",
            "gaussian_blur_2d", "grid_of"]
from framework.maths.tableaux import TABLEAUX, Tableau
from framework.maths.tableaux import build as build_tableau
from framework.maths.tableaux import preset as tableau_preset

__all__ += ["TABLEAUX", "Tableau", "build_tableau", "tableau_preset"]
from framework.runs.schedule_file import model_fingerprint, read_schedule_file  # noqa: E402  (schedule=optimized's files)
__all__ += ["model_fingerprint", "read_schedule_file"]
__all__ += ["er_sde_integrals", "noise_factor", "ou_extend", "stochastic_adams_weights"]
from framework.bundled import marks  # noqa: E402  (stray marks and edge sharpness of bundled-world pictures)
__all__ += ["marks"]
from framework.models.guide import Guide, load_guide  # noqa: E402  (true autoguidance's guide network)
__all__ += ["Guide", "load_guide"]
from framework.core.background import background, drain, host_copy  # noqa: E402  (a run's background worker)
__all__ += ["background", "drain", "host_copy"]
from framework.maths import scalar  # noqa: E402  (σ maths on floats or captured 0-d tensors: compile=step)
__all__ += ["scalar"]
