"""Reference (real-image) features for FID/KID, computed once and cached on disk.

The cache key names the data and the features: the reference set (the bundled world's count and
seed, or a content hash of an image folder) and the extractor (its name and a hash of its weights).
Files live in ``<cache>/reference_features/<key>.safetensors`` (float64 features [N, d], written
atomically), where ``<cache>`` is the metric's ``cache_dir``, else ``$SAMPLERLAB_CACHE``, else
``~/.cache/samplerlab``. Delete the folder to recompute.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from framework.core.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def cache_dir(override: str | None = None) -> Path:
    """The samplerlab cache folder: ``override``, else ``$SAMPLERLAB_CACHE``, else ``~/.cache/samplerlab``."""
    return Path(override or os.environ.get("SAMPLERLAB_CACHE") or Path.home() / ".cache" / "samplerlab").expanduser()


@dataclass(frozen=True)
class ReferenceSet:
    """The real images: ``count`` fresh scenes of the bundled world from ``seed``, or every image
    file of ``folder`` (sorted by name, resized to the first one's size)."""

    count: int = 256
    seed: int = 1234
    folder: str | None = None

    def files(self) -> list[Path]:
        root = Path(self.folder or "")
        if not root.is_dir():
            raise ConfigError(f"reference folder {root} does not exist: give a folder of real images (png/jpg)")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise ConfigError(f"reference folder {root} holds {len(files)} image(s): FID/KID need at least 2")
        return files

    def key(self) -> str:
        """What the data is: world parameters, or a hash of the folder's file names and bytes."""
        if self.folder is None:
            return f"world-n{self.count}-seed{self.seed}"
        h = hashlib.sha256()
        root = Path(self.folder)
        for p in self.files():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
        return f"folder-{h.hexdigest()[:16]}"

    def batches(self, size: int = 64) -> Iterator[torch.Tensor]:
        """The images as float [B, 3, H, W] batches in [0, 1]."""
        if self.folder is None:
            from framework.bundled.world import sample_scenes

            yield from ((sample_scenes(self.count, seed=self.seed).images + 1) / 2).split(size)
            return
        import numpy as np
        from PIL import Image

        files, shape = self.files(), None
        for start in range(0, len(files), size):
            chunk = []
            for p in files[start:start + size]:
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    shape = shape or im.size
                    arr = np.asarray(im.resize(shape, Image.BICUBIC) if im.size != shape else im)
                chunk.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255)
            yield torch.stack(chunk)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def cache_path(reference: ReferenceSet, features_name: str, weights: str, root: Path) -> Path:
    return root / "reference_features" / f"{reference.key()}__{_safe(features_name)}-{weights}.safetensors"


def reference_features(
    extractor: nn.Module, features_name: str, reference: ReferenceSet, cache: str | None = None, use_cache: bool = True
) -> tuple[torch.Tensor, bool]:
    """The reference set's features [N, d] (float64) under ``extractor``, and whether they came from
    the cache. Computed and stored on a miss."""
    from safetensors.torch import load_file, save

    from framework.metrics.features import weights_hash
    from framework.core.files import atomic_write_bytes

    path = cache_path(reference, features_name, weights_hash(extractor), cache_dir(cache))
    if use_cache and path.is_file():
        return load_file(path)["features"], True
    with torch.no_grad():
        feats = torch.cat([extractor(batch).double().reshape(batch.shape[0], -1) for batch in reference.batches()])
    if use_cache:
        meta = {"reference": reference.key(), "features": features_name, "count": str(feats.shape[0])}
        atomic_write_bytes(path, save({"features": feats.contiguous()}, metadata=meta))
    return feats, False


def add_real_features(metric: object, features: torch.Tensor) -> None:
    """Feed precomputed real features into a torchmetrics FID or KID (the states its ``update``
    would fill from images)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    f = features.double()
    if isinstance(metric, FrechetInceptionDistance):
        metric.real_features_sum += f.sum(dim=0)
        metric.real_features_cov_sum += f.t().mm(f)
        metric.real_features_num_samples += f.shape[0]
    elif isinstance(metric, KernelInceptionDistance):
        metric.real_features.append(f)
    else:
        raise TypeError(f"cannot add real features to {type(metric).__name__}")
