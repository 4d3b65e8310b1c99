"""The one harness of the studies in experiments/: how a study is called, how its config is
composed, how it writes its record, figures and images.

A study is a package ``experiments/<name>/``: ``config.yaml`` holds its keys (``fast`` among
them), any other config beside it is picked with ``--config-name <other>``, and ``__main__.py``
reads::

    HERE = Path(__file__).resolve().parent

    def main(argv: list[str] | None = None) -> dict:
        ex = Experiment.compose(HERE, argv)
        ...                                     # samplerlab runs, figures, tables
        return ex.record(path, results, files)

    if __name__ == "__main__":
        entry(main)

so ``python -m experiments.<name> key=value …`` (Hydra's override syntax; ``fast=true`` for a smoke
run) and ``main(["key=value", …])`` in a test are the same call. A study that samples through
samplerlab may take ``passthrough=True``: an override of a key it does not have (``model=sd15``,
``solver=heun``, ``cfg_scale=3``) then goes to every samplerlab run it makes, after the study's own
``run`` list, so the user's choice wins; other studies reject unknown keys. A study's run folder is
its ``runs`` key (``${now:…}`` in it is resolved once, at composition). Randomness comes from
explicit ``torch.Generator`` objects, never from the global seed.
"""
from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from framework.core.files import atomic_write_bytes, atomic_write_json
from framework.plugin import ConfigError, SamplerlabError, grid, png_bytes, to_pil


# --- entry and configuration --------------------------------------------------------------------

@dataclass
class Experiment:
    """One invocation of a study: its composed config and what it passes on to samplerlab runs."""

    name: str  # the package: experiments.<name>
    cfg: DictConfig
    passed: list[str] = field(default_factory=list)  # overrides for every samplerlab run (passthrough studies)
    config_name: str = "config"
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def compose(cls, folder: Path, argv: Sequence[str] | None, passthrough: bool = False,
                config_name: str = "config") -> Experiment:
        """``folder/<config_name>.yaml`` with the overrides of ``argv`` applied (``--config-name X``
        in ``argv`` picks ``X.yaml``); with ``fast=true`` the study's ``fast_run`` list narrows its
        own keys too."""
        if isinstance(argv, str):
            raise TypeError("argv must be a list of overrides, e.g. ['fast=true']")
        config_name, overrides = _config_name(list(argv or []), config_name)
        hydra_keys = [o for o in overrides if o.lstrip("+~").startswith("hydra.")]
        if hydra_keys:
            raise ConfigError(f"{hydra_keys[0]}: studies take no hydra.* keys; the run folder is runs=<folder>")
        if not (folder / f"{config_name}.yaml").is_file():
            options = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
            raise ConfigError(f"{folder.name}: no config '{config_name}': choose from {options}")
        own_keys = set(OmegaConf.load(folder / f"{config_name}.yaml").keys()) - {"defaults"}
        own, passed = _split_overrides(overrides, own_keys) if passthrough else (overrides, [])
        cfg = _compose(folder, config_name, own)
        if cfg.get("fast") and cfg.get("fast_run"):
            fast_own, _ = _split_overrides(list(cfg.fast_run), own_keys)
            if fast_own:
                cfg = _compose(folder, config_name, fast_own + own)
        OmegaConf.resolve(cfg)  # ${now:…} once, so the record names the folder the study used
        return cls(folder.name, cfg, passed, config_name)

    def run_overrides(self) -> list[str]:
        """samplerlab overrides of one of the study's runs: its ``run`` list, then the samplerlab
        part of ``fast_run`` when ``fast=true``, then the user's pass-through overrides."""
        base = list(self.cfg.get("run", []))
        if self.cfg.get("fast"):
            base += _split_overrides(list(self.cfg.get("fast_run", [])), set(self.cfg.keys()))[1]
        return base + self.passed

    def record(self, path: Path, results: dict[str, Any], files: Iterable[str] = ()) -> dict[str, Any]:
        """Write the study's record to ``path`` (JSON, atomically) and return it: the study, its
        config and pass-through overrides, the measured results, the files it wrote, its wall time
        and the versions (with the git commit)."""
        schema_version, versions = _schema_and_versions()
        record = {
            "schema_version": schema_version,
            "experiment": self.name,
            "config_name": self.config_name,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "overrides": list(self.passed),
            "results": results,
            "files": sorted(set(files)),
            "seconds": round(time.perf_counter() - self.started, 2),
            "versions": versions,
        }
        atomic_write_json(Path(path), record)
        return record


def entry(main: Callable[[list[str]], Any]) -> None:
    """``python -m experiments.<name>``: run ``main(sys.argv[1:])``; a configuration error prints
    one line and exits with code 2.

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


def _config_name(argv: list[str], name: str) -> tuple[str, list[str]]:
    """(the config picked by ``--config-name X`` / ``-cn X``, else ``name``; the overrides)."""
    rest, args = [], iter(argv)
    for arg in args:
        if arg in ("--config-name", "-cn"):
            name = next(args, "")
        elif arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not name:
        raise ConfigError("--config-name needs the name of a config beside the study's config.yaml")
    return name, rest


def _compose(folder: Path, config_name: str, overrides: list[str]) -> DictConfig:
    """Hydra's composition of ``folder/<config_name>.yaml``; Hydra's global state is restored after."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf.errors import OmegaConfBaseException

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(folder.resolve()), version_base="1.3", job_name=folder.name):
            return compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"{folder.name}: {str(e).strip().splitlines()[0]}") from e
    finally:
        restore_gh_from_backup(backup)


def _split_overrides(overrides: list[str], own_keys: set[str]) -> tuple[list[str], list[str]]:
    """(overrides of the study's own keys, the others)."""
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


# --- framework internals the studies use (kept here, in one place, to follow the framework) -----

def _schema_and_versions() -> tuple[int, dict[str, Any]]:
    """The record schema version of samplerlab's runs, and the versions (with the git commit)."""
    from framework.runs.records import SCHEMA_VERSION, versions

    return SCHEMA_VERSION, versions()


def resolve_training(cfg: DictConfig, stages: tuple[str, ...], out_dirs: tuple[str, str]) -> DictConfig:
    """A training experiment's config made concrete: ``fast_profile`` merged in when ``fast``, the
    default output folder (``out_dirs``: normal, fast) and unknown stages refused."""
    if cfg.fast:
        cfg = OmegaConf.merge(cfg, cfg.fast_profile)
    if cfg.out_dir is None:
        cfg.out_dir = out_dirs[1] if cfg.fast else out_dirs[0]
    unknown = set(cfg.stages) - set(stages)
    if unknown:
        raise ConfigError(f"unknown stages {sorted(unknown)}; choose from {', '.join(stages)}")
    return cfg


def stage_results(record_path: Path, device: torch.device, key: str, seconds: float) -> dict[str, Any]:
    """The ``results`` of a training record after one more run of stage ``key``: re-read from
    ``record_path`` (stages may run in parallel processes sharing the folder), its seconds and run
    count added, the device noted."""
    import json
    import platform

    results = json.loads(record_path.read_text())["results"] if record_path.exists() else {"stages": {}}
    results.update(device=str(device), machine=platform.machine())
    done = results["stages"].setdefault(key, {"seconds": 0.0, "runs": 0})
    done["seconds"] += seconds
    done["runs"] += 1
    done["device"] = str(device)
    return results


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda[:N]``; a clear error otherwise."""
    from framework.core.engine import resolve_device as resolve

    return resolve(name)


def schedule_plugins() -> list[str]:
    """The names of every schedule plugin (built in or installed)."""
    from framework.core.registry import available

    return list(available("schedule"))


def instantiate(node: DictConfig, label: str) -> Any:
    """The plugin (or model) a config node describes (``label`` names it in errors)."""
    from framework.core.registry import instantiate as make

    return make(node, label)


@dataclass
class LoadedRun:
    """A composed samplerlab config, its group choices, its step count and its model, set up."""

    cfg: DictConfig
    choices: dict[str, str]
    steps: int
    model: Any


def load_run(overrides: list[str]) -> LoadedRun:
    """The samplerlab config of ``overrides`` and its model adapter on the run's device/dtype."""
    from framework.core.settings import read_settings
    from framework.entry.compose import compose
    from framework.models.base import wrap_model

    cfg, choices = compose(overrides)
    settings = read_settings(cfg)
    model = wrap_model(instantiate(cfg.model, f"model={choices.get('model', 'custom')}"))
    model.setup(resolve_device(settings.device), getattr(torch, str(settings.dtype)))
    return LoadedRun(cfg, choices, settings.steps, model)


def load_model(overrides: list[str]) -> Any:
    """The model adapter of the samplerlab config of ``overrides``, set up on its device/dtype."""
    return load_run(overrides).model


def require_vae(model: Any, study: str) -> None:
    if not hasattr(model, "encode_images"):
        raise ConfigError(f"{study} needs an image model with a VAE (model=bundled, model=sd15 …), not {type(model).__name__}")


# --- images ---------------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each pair of images of two batches [B, C, H, W] **in [0, 1]** (peak 1, values
    clamped to [0, 1]): 10·log10(1 / MSE). For images in [−1, 1] pass ``(x + 1) / 2``: the same
    figure as 10·log10(4 / MSE) on the [−1, 1] values."""
    mse = (a.float().clamp(0, 1) - b.float().clamp(0, 1)).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1 / mse)


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
    from framework.plugin import world

    scenes = world.sample_scenes(n, seed)
    return resize(scenes.images / 2 + 0.5, size), list(scenes.captions)


def save_png(img: torch.Tensor, path: Path, files: list[str] | None = None) -> None:
    """One image [3, H, W] in [0, 1] as PNG, atomically; its name goes to ``files``."""
    atomic_write_bytes(path, png_bytes(img))
    _written(path, files)


def save_grid(images: torch.Tensor, path: Path, nrow: int, scale: int = 1, pad: int = 2,
              files: list[str] | None = None) -> None:
    """Images [B, 3, H, W] in [0, 1], ``nrow`` per row (``pad`` white pixels apart), upscaled
    ``scale``× (nearest neighbour), as one PNG written atomically."""
    from PIL import Image

    img = to_pil(grid(images, nrow=nrow, pad=pad))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    save_pil(img, path, files)


def save_pil(img, path: Path, files: list[str] | None = None) -> None:
    """A PIL image as PNG, written atomically; its name goes to ``files``."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    _written(path, files)


def save_text(text: str, path: Path, files: list[str] | None = None) -> None:
    """A table or note, written atomically."""
    atomic_write_bytes(path, text.encode())
    _written(path, files)


def _written(path: Path, files: list[str] | None) -> None:
    if files is not None:
        files.append(Path(path).name)


# --- figures --------------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
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


def save_figure(fig, path: Path, files: list[str] | None = None, dpi: int = 110) -> None:
    """A matplotlib figure as PNG, written atomically, then closed; its name goes to ``files``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    _written(path, files)
