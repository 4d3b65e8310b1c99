"""Shared plumbing of the deep-dive experiments (autoencoder, schedule, loop, img2img, gallery).

Each experiment is a package with a ``config.yaml`` of its own keys (``fast``, ``out``, …) and a
``main(argv)`` that takes Hydra overrides. An override whose key is one of the experiment's keys
sets that key; every other override (``model=sd15``, ``model.path=…``, ``solver=heun``,
``cfg_scale=3``) is passed on to every samplerlab run the experiment makes, after the
experiment's own defaults, so the user's choice wins.
"""
from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from framework.core.errors import ConfigError, SamplerlabError

#: Where the committed deep-dive figures live.
DOCS_DIR = Path("docs/deep_dive")


def compose_experiment(folder: Path, argv: Sequence[str]) -> tuple[DictConfig, list[str]]:
    """The experiment's config (``folder/config.yaml`` with its own overrides applied) and the
    overrides left for samplerlab runs."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf.errors import OmegaConfBaseException

    from framework.entry.compose import release

    if isinstance(argv, str):
        raise TypeError("argv must be a list of overrides, e.g. ['fast=true']")
    own_keys = set(OmegaConf.load(folder / "config.yaml").keys())
    own, passed = split_overrides(list(argv), own_keys)

    def load(overrides: list[str]) -> DictConfig:
        backup = get_gh_backup()
        release()
        try:
            with initialize_config_dir(str(folder.resolve()), version_base="1.3", job_name=folder.name):
                return compose("config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(f"{folder.name}: {str(e).strip().splitlines()[0]}") from e
        finally:
            restore_gh_from_backup(backup)

    cfg = load(own)
    if cfg.get("fast") and cfg.get("fast_run"):  # the fast preset may narrow the experiment's own keys too
        fast_own, _ = split_overrides(list(cfg.fast_run), own_keys)
        if fast_own:
            cfg = load(fast_own + own)
    return cfg, passed


def split_overrides(overrides: list[str], own_keys: set[str]) -> tuple[list[str], list[str]]:
    """(overrides of the experiment's own keys, the others)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"invalid override: {str(e).strip().splitlines()[0]}") from e
    own, passed = [], []
    for text, ov in zip(overrides, parsed):
        head = ov.key_or_group.split(".")[0].split("/")[0]
        (own if head in own_keys else passed).append(text)
    return own, passed


def run_overrides(cfg: DictConfig, passed: list[str]) -> list[str]:
    """samplerlab overrides of one of the experiment's runs: its ``run`` list, then the samplerlab
    part of ``fast_run`` when ``fast=true``, then the user's pass-through overrides."""
    base = list(cfg.get("run", []))
    if cfg.fast:
        base += split_overrides(list(cfg.get("fast_run", [])), set(cfg.keys()))[1]
    return base + list(passed)


def load_model(overrides: list[str]) -> Any:
    """The model adapter of the composed samplerlab config, set up on the run's device/dtype."""
    from framework.entry.compose import compose
    from framework.core.engine import DTYPES, read_settings, resolve_device
    from framework.models.base import wrap_model
    from framework.core.registry import instantiate

    cfg, choices = compose(overrides)
    settings = read_settings(cfg)
    model = wrap_model(instantiate(cfg.model, f"model={choices.get('model', 'custom')}"))
    model.setup(resolve_device(settings.device), DTYPES[settings.dtype])
    return model


def require_vae(model: Any, experiment: str) -> None:
    if not hasattr(model, "encode_images"):
        raise ConfigError(f"{experiment} needs an image model with a VAE (model=bundled, model=sd15 …), not {type(model).__name__}")


def pixel_size(model: Any) -> tuple[int, int]:
    """(H, W) of the model's images: the latent size times the VAE's downsampling factor."""
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return model.latent_shape[1] * factor, model.latent_shape[2] * factor


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images [B, 3, h, w] in [0, 1] resized (bicubic, antialiased) to ``size`` = (H, W)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def sample_photo(size: tuple[int, int], name: str = "china.jpg") -> torch.Tensor:
    """A real photo that ships inside scikit-learn (427×640), centre-cropped to a square and
    resized to ``size``: [1, 3, H, W] in [0, 1]."""
    from sklearn.datasets import load_sample_image

    arr = torch.from_numpy(load_sample_image(name).copy()).permute(2, 0, 1).float() / 255
    h, w = arr.shape[1:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return resize(arr[None, :, top : top + s, left : left + s], size)


def world_scenes(n: int, seed: int, size: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    """``n`` scenes of the bundled model's world, [n, 3, H, W] in [0, 1], and their captions."""
    from framework.bundled.world import sample_scenes

    scenes = sample_scenes(n, seed)
    return resize(scenes.images / 2 + 0.5, size), list(scenes.captions)


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """PSNR in dB per image of two batches in [0, 1]."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(1 / mse)).tolist()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def show(ax, img: torch.Tensor, title: str | None = None, **kw) -> None:
    """Draw an image [3, H, W] in [0, 1] (or a 2-D map with ``cmap``) on a matplotlib axis."""
    arr = img.detach().float().cpu()
    if arr.dim() == 3:
        arr = arr.clamp(0, 1).permute(1, 2, 0)
    ax.imshow(arr.numpy(), interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def save_figure(fig, path: Path, files: list[str]) -> None:
    """Write a matplotlib figure as PNG atomically and close it; record its name in ``files``."""
    from framework.core.files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    files.append(path.name)


def save_png(img: torch.Tensor, path: Path, files: list[str]) -> None:
    from framework.runs.images import png_bytes
    from framework.core.files import atomic_write_bytes

    atomic_write_bytes(path, png_bytes(img))
    files.append(path.name)


def write_record(out: Path, name: str, cfg: DictConfig, passed: list[str], results: dict[str, Any],
                 files: list[str], seconds: float) -> dict[str, Any]:
    """``<out>/<name>.json``: the experiment's config, pass-through overrides, measured results,
    the files it wrote, its wall time and the versions (with the git commit)."""
    from framework.runs.records import SCHEMA_VERSION, atomic_write_json, versions

    record = {
        "schema_version": SCHEMA_VERSION,
        "experiment": name,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "overrides": list(passed),
        "results": results,
        "files": sorted(set(files)),
        "seconds": round(seconds, 2),
        "versions": versions(),
    }
    atomic_write_json(out / f"{name}.json", record)
    return record


def entry(main: Callable[[list[str]], Any]) -> None:
    """Run ``main(sys.argv[1:])``; a configuration error prints one line and exits with code 2.

    Torch runs on one CPU thread unless ``OMP_NUM_THREADS`` says otherwise: on a shared CPU, threads
    that outnumber the free cores spin-wait (measured here, 2 cores with a training job beside:
    a 20-step, 4-sample bundled-model run took 100 s with torch's default 2 threads, ~4 s with one).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        main(sys.argv[1:])
    except SamplerlabError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
