"""A second network as a guide: the weak model of true autoguidance (Karras et al. 2024).

:func:`load_guide` loads another diffusers network (a UNet or transformer folder, or a pipeline
folder holding one) for a model adapter and returns a :class:`Guide`: D of the *other* network
computed by the main adapter's own code — its input scaling, σ ↔ timestep map, prediction
arithmetic (ε, v, flow velocity) and the prompt conditioning the main model encoded — so the two
denoisers differ in their weights only. The guide must be of the same family: the same network
class, the same latent channels and conditioning widths (the config keys in :data:`MUST_MATCH`),
and — where its folder says (a pipeline's scheduler) — the same prediction type and training
schedule; anything else is refused with one line.

Cost: each guide evaluation is one more network call with one input per sample, on another
network. It is counted in ``batch.unet_calls`` and ``batch.network_inputs`` (so ``nfe_pairs``
treats it like the unconditional half of a CFG pair, as Karras et al. count autoguidance) and
separately in :meth:`Guide.inputs` (the record's ``guide_inputs``), since a guide network is
usually smaller and cheaper than the main one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from framework.core.errors import ConfigError
from framework.core.memo import Memo

#: Config keys of the network that a guide must share with the main network (where the main has them):
#: latent channels, conditioning widths, patching and extra conditioning.
MUST_MATCH = ("in_channels", "out_channels", "cross_attention_dim", "joint_attention_dim", "pooled_projection_dim",
              "encoder_hid_dim", "addition_embed_type", "projection_class_embeddings_input_dim", "patch_size",
              "guidance_embeds", "time_cond_proj_dim", "class_embed_type")

#: Guide networks loaded in this process (a sweep loads each once), by folder (and its files' sizes and
#: modification times, so a rewritten guide is read again) and dtype.
NETWORKS: Memo[Any] = Memo("loaded guide networks", 2)


def bundled_guide_dir() -> Path:
    """The guide shipped for the bundled model (framework/bundled/weights/guide/unet)."""
    from framework.bundled import WEIGHTS_DIR

    return WEIGHTS_DIR / "guide" / "unet"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"guide: cannot read {path} ({type(e).__name__}): give a diffusers folder saved by save_pretrained") from None


def _network_folder(source: Path, network_class: str) -> tuple[Path, Path | None]:
    """The network's folder in ``source`` and the scheduler folder that states its parametrisation
    (None when nothing does: a bare network folder is taken to share the main model's)."""
    if (source / "model_index.json").is_file():  # a pipeline folder
        index = _read_json(source / "model_index.json")
        names = [n for n in ("unet", "transformer") if n in index and (source / n / "config.json").is_file()]
        if not names:
            raise ConfigError(f"guide '{source}': the pipeline folder has no unet/ or transformer/ network folder; "
                              f"point guide at a folder holding a {network_class}")
        scheduler = source / "scheduler"
        return source / names[0], scheduler if (scheduler / "scheduler_config.json").is_file() else None
    if (source / "config.json").is_file():  # a network folder (its pipeline's scheduler next to it, if any)
        scheduler = source.parent / "scheduler"
        inside = (source.parent / "model_index.json").is_file() and (scheduler / "scheduler_config.json").is_file()
        return source, scheduler if inside else None
    raise ConfigError(f"guide '{source}' is not a diffusers network or pipeline folder (no config.json, no model_index.json): "
                      f"give a {network_class} folder saved by save_pretrained, or a pipeline folder")


def _check_scheduler(model: Any, scheduler_dir: Path, source: Path) -> None:
    """Same prediction type and (for discrete VP models) the same training schedule as the model."""
    config = _read_json(scheduler_dir / "scheduler_config.json")
    mine = str(getattr(model, "prediction_type", "epsilon"))
    theirs = config.get("prediction_type") or "epsilon" if "beta_schedule" in config else "flow"  # no betas: flow matching
    if theirs != mine:
        raise ConfigError(f"guide '{source}' predicts {theirs}, the model {mine}: a guide must share the model's "
                          "parametrisation (prediction_type); give a guide trained the same way")
    train_sigmas = getattr(model, "train_sigmas", None)
    if train_sigmas is not None and "beta_schedule" in config:
        from diffusers import DDPMScheduler

        from framework.maths.sigmas import train_sigmas_from_alphas_cumprod

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        theirs_sigmas = train_sigmas_from_alphas_cumprod(
            DDPMScheduler(**{k: config[k] for k in keys if k in config}).alphas_cumprod)
        if theirs_sigmas.shape != train_sigmas.shape or not torch.allclose(theirs_sigmas, train_sigmas, rtol=1e-4):
            raise ConfigError(f"guide '{source}' was trained on another noise schedule than the model "
                              f"({config.get('beta_schedule')}, {config.get('num_train_timesteps')} steps): give a guide "
                              "trained on the model's schedule")


def _load_network(cls: type, folder: Path, dtype: torch.dtype) -> Any:
    from framework.models.diffusers_sd import quiet_loading

    try:
        with quiet_loading():
            return cls.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"guide: cannot load the {cls.__name__} in '{folder}' ({msg[:160]}): "
                          "give a folder saved by save_pretrained with its weights") from None


class Guide:
    """D of another network through a model adapter's arithmetic (see the module docstring)."""

    def __init__(self, model: Any, network: Any, source: str):
        self.model, self.network, self.source = model, network, source

    def parameters(self) -> int:
        """The guide network's parameter count."""
        return sum(p.numel() for p in self.network.parameters())

    def denoise(self, state: Any, x: torch.Tensor, sigma: float, prompt: str = "cond") -> torch.Tensor:
        """The guide's D(x, σ) with the batch's prompt conditioning (``cond``) or the negative
        prompt's (``uncond``: needs ``run.request_uncond()``): one call, one input per sample,
        counted in ``unet_calls``, ``network_inputs`` and the guide's own count."""
        cond = state.batch.cond
        tensors = {} if cond is None else cond.uncond if prompt == "uncond" else cond.tensors
        if tensors is None:
            raise ConfigError("a guide evaluation on the negative prompt needs run.request_uncond() in configure")
        batch = state.batch
        batch.unet_calls += 1
        batch.network_inputs += 1
        counts = batch.stash.get(self, lambda: [0], "guide_inputs")
        counts[0] += 1
        return _swapped(self.model, self.network).denoise_batch(x, sigma, state.schedule.timestep(sigma), tensors)

    def inputs(self, batch: Any) -> int:
        """Guide inputs per sample evaluated in ``batch`` so far (0 for a batch read back)."""
        return batch.stash.get(self, lambda: [0], "guide_inputs")[0]


def _swapped(model: Any, network: Any) -> Any:
    """The model adapter with another network: a shallow copy (an instance of the adapter's own
    class, so its methods and ``super()`` calls run unchanged) whose ``unet`` — diffusers adapters'
    name for the denoising network, UNet or transformer — is the guide's, never compiled. Made per
    call, so it shares what the adapter holds now (the run's timestep table, encoders, scaling)."""
    view = object.__new__(type(model))
    view.__dict__.update(model.__dict__)
    view.__dict__.update(unet=network, _compiled=None)
    return view


def load_guide(model: Any, guide: str | Path) -> Guide:
    """A :class:`Guide` for ``model`` from ``guide``: ``"bundled"`` (the weak model shipped for the
    bundled model) or a local folder — a diffusers UNet/transformer folder or a pipeline folder of
    the model's family. Loaded offline, on the model's device and dtype; incompatible or missing
    guides are refused with one line (:class:`ConfigError`)."""
    network = getattr(model, "unet", None)
    if not isinstance(network, torch.nn.Module) or not hasattr(network, "config"):
        raise ConfigError(f"model {type(model).__name__} has no diffusers network to pair a guide with: autoguidance_model "
                          "needs a network model (bundled, sd15, sdxl, sd3, flux, tiny_*)")
    cls = type(network)
    if getattr(model, "refiner", None) is not None:
        raise ConfigError("autoguidance_model with an SDXL refiner: the guide would stand in for the base UNet only; "
                          "remove model.refiner (or guide without autoguidance_model)")
    if str(guide) == "bundled":
        source = bundled_guide_dir()
        if not (source / "config.json").is_file():
            raise ConfigError(f"the bundled guide is missing from {source}: reinstall samplerlab, or rebuild it with "
                              "`python -m experiments.bundled_model.guide install=true`")
    else:
        source = Path(str(guide)).expanduser()
        if not source.is_dir():
            raise ConfigError(f"guide '{guide}': no such folder; give guide=bundled or a local diffusers "
                              f"{cls.__name__} (or pipeline) folder")
    folder, scheduler = _network_folder(source, cls.__name__)
    config = _read_json(folder / "config.json")
    if config.get("_class_name") != cls.__name__:
        raise ConfigError(f"guide '{source}' is a {config.get('_class_name')}, the model's network a {cls.__name__}: "
                          "a guide must be the same kind of network (same family)")
    for key in MUST_MATCH:
        if key in network.config and config.get(key) != network.config[key]:
            raise ConfigError(f"guide '{source}' does not fit model {type(model).__name__}: its {key} is "
                              f"{config.get(key)}, the model's {network.config[key]}; give a guide of the same family "
                              "(same latent channels and conditioning width)")
    if scheduler is not None:
        _check_scheduler(model, scheduler, source)
    dtype, device = network.dtype, network.device
    listing = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file())
    net = NETWORKS.get((str(folder.resolve()), listing, cls.__name__, str(dtype)), lambda: _load_network(cls, folder, dtype))
    if net.device != device:  # (a .to(dtype) would only warn: the memo key holds the dtype)
        net.to(device)
    net.eval().requires_grad_(False)
    return Guide(model, net, str(guide))
