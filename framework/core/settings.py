"""The run's top-level settings: a typed schema checked before anything heavy is imported.

The values come from ``conf/config.yaml`` (the only place that states their defaults) and the
user's overrides; this module only states their types and allowed values. It imports neither torch
nor any plugin, so the CLI rejects a bad value in milliseconds.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework.core.errors import ConfigError
from framework.core.memo import Memo


class Choice(str, Enum):
    """A typed option of a fixed set of strings: compares equal to its string and prints as it.
    OmegaConf checks a value against the member *names* (so names equal the spellings)."""

    def __str__(self) -> str:
        return str(self.value)


class Noise(Choice):
    independent = "independent"  # a fresh draw per stochastic step, from each sample's generator
    brownian = "brownian"  # Brownian-tree increments: SDE noise coherent across step counts


class DType(Choice):
    float32 = "float32"
    float64 = "float64"
    float16 = "float16"
    bfloat16 = "bfloat16"


#: torch.compile modes (``compile_mode``); null picks reduce-overhead on CUDA, default elsewhere.
CompileMode = Choice("CompileMode", [(m, m) for m in (
    "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")])


#: More steps than any sampler needs: a larger value is a typo (and its σ grid alone would fill memory).
MAX_STEPS = 10_000
#: The most samples one process generates: a run keeps every sample's latents and images in memory
#: (≈ 50 kB each for the bundled model, ≈ 3 MB for SD at 512²); split larger jobs with shard_count.
MAX_SAMPLES_PER_PROCESS = 1_000_000
#: Device names: auto, cpu, cuda, cuda:N, mps.
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _device_missing(device: str) -> str | None:
    """Why ``device`` cannot be used on this machine (None when it can). Imports torch, so it is
    asked only for cuda and mps: auto and cpu never need it."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"device={device} but no CUDA device is available: use device=cpu or device=auto"
    if device.startswith("cuda") and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        return f"device={device} but this machine has {torch.cuda.device_count()} CUDA device(s): use cuda:0 … or auto"
    if device == "mps" and not torch.backends.mps.is_available():
        return "device=mps but MPS (Apple GPU) is not available here: use device=cpu or device=auto"
    return None


@dataclass
class Settings:
    """The top-level keys of the config, typed (their defaults and comments: conf/config.yaml)."""

    steps: int = MISSING
    seed: int = MISSING
    num_samples: int = MISSING
    batch_size: int = MISSING
    prompts: list[str] = MISSING
    negative_prompt: str = MISSING
    cfg_scale: float = MISSING
    device: str = MISSING
    dtype: DType = MISSING
    output_dir: Optional[str] = MISSING
    save_images: bool = MISSING
    objective: Optional[str] = MISSING
    noise: Noise = MISSING
    name: Optional[str] = MISSING
    resume: bool = MISSING
    shard_index: int = MISSING
    shard_count: int = MISSING
    compile: Any = MISSING  # false, true (the network) or step (the whole step): checked in check()
    compile_mode: Optional[CompileMode] = MISSING  # type: ignore[valid-type]
    channels_last: bool = MISSING

    def check(self) -> None:
        """The checks a type cannot state (ranges, relations between keys)."""
        check_seed(self.seed)
        for key in ("steps", "num_samples", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be ≥ 1 (got {getattr(self, key)}): e.g. {key}=4")
        if self.steps > MAX_STEPS:
            raise ConfigError(f"steps={self.steps} is more than any sampler needs (at most {MAX_STEPS}): e.g. steps=50")
        if not math.isfinite(self.cfg_scale):
            raise ConfigError(f"cfg_scale must be a finite number, got {self.cfg_scale}: e.g. cfg_scale=5.0")
        if not isinstance(self.compile, bool) and self.compile != "step":
            raise ConfigError(f"compile must be false, true (the network) or step (the whole step), got {self.compile!r}")
        if not DEVICE.match(self.device):
            raise ConfigError(f"unknown device '{self.device}': use auto, cpu, cuda, cuda:N or mps")
        if not self.prompts:
            raise ConfigError("prompts is empty: give at least one, e.g. 'prompts=[a red circle]'")
        if not 1 <= self.shard_count <= self.num_samples:
            raise ConfigError(f"shard_count must be between 1 and num_samples={self.num_samples}, got {self.shard_count}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ConfigError(
                f"shard_index must be in 0..{self.shard_count - 1} (shard_count={self.shard_count}), got {self.shard_index}"
            )
        per_process = len(self.indices())
        if per_process > MAX_SAMPLES_PER_PROCESS:
            raise ConfigError(
                f"num_samples={self.num_samples} is too many for one process (at most {MAX_SAMPLES_PER_PROCESS:,}: a run "
                f"holds every sample's latents and images in memory): split it with shard_count="
                f"{-(-per_process * self.shard_count // MAX_SAMPLES_PER_PROCESS)} shard_index=0,1,…")
        if self.name is not None and (self.name.startswith(("/", "~"))
                                      or any(p in ("", ".", "..") for p in self.name.strip().split("/"))):
            raise ConfigError(f"name '{self.name}' must be a relative folder name below outputs/ (no '.', '..' or "
                              "empty parts), e.g. name=my_study")
        if self.device not in ("auto", "cpu"):
            why = _device_missing(self.device)
            if why:
                raise ConfigError(why)

    def indices(self) -> range:
        """The global sample indices this process generates: its contiguous block of the shards."""
        n, c, i = self.num_samples, self.shard_count, self.shard_index
        return range(n * i // c, n * (i + 1) // c)


def check_seed(seed: int) -> None:
    """Seeds are non-negative integers of any size (every bit counts); anything else is refused."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer (any size), got {seed!r}: e.g. seed=0")


KEYS = tuple(f.name for f in fields(Settings))
SCHEMAS: Memo[DictConfig] = Memo("structured-config schemas", 256)
SETTINGS: Memo[Settings] = Memo("checked settings", 256)


def schema(cls: type) -> DictConfig:
    """The structured-config schema of a dataclass (built once per class: OmegaConf.structured is slow)."""
    return SCHEMAS.get(cls, lambda: OmegaConf.structured(cls))


def read_settings(cfg: Any) -> Settings:
    """The checked top-level keys of a composed config. A missing key, a wrong type or a value
    outside its choices is a :class:`ConfigError` naming the key."""
    values = {k: cfg[k] for k in KEYS if k in cfg}
    plain = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in values.items()}
    settings = SETTINGS.get(repr(sorted(plain.items())), lambda: _check(plain))
    return Settings(**{f: (list(v) if isinstance(v, list) else v) for f, v in vars(settings).items()})


def _check(values: dict[str, Any]) -> Settings:
    missing = [k for k in KEYS if k not in values]
    if missing:
        raise ConfigError(f"the config lacks the top-level key(s) {', '.join(missing)}: compose it from conf/config.yaml")
    try:
        checked = OmegaConf.merge(schema(Settings), values)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        hint = f": it must be a list, e.g. '{key}=[a red circle,a blue square]'" if key == "prompts" else ""
        raise ConfigError(f"bad value for '{key}'{hint} ({str(e).splitlines()[0]})") from e
    settings = Settings(**OmegaConf.to_container(checked))  # type: ignore[arg-type]
    settings.check()
    return settings
