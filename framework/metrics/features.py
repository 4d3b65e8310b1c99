"""Image feature extractors for FID/KID, chosen by name in the metric's config:

- ``clip`` — the bundled CLIP's image tower (default; offline, 64-d);
- ``inception`` — InceptionV3 pool features (2048-d, the papers' FID) through torchmetrics and
  torch-fidelity: an optional extra that needs torch-fidelity, a torchvision that imports beside
  the installed torch, and the weights file on disk (never downloaded at run time);
- ``package.module.Class`` — any ``torch.nn.Module`` built without arguments that maps float
  images in [0, 1] ([N, 3, H, W]) to features [N, d] and has an int attribute ``num_features``.

Every extractor has a ``weights_hash``, so cached reference statistics are keyed by the exact
weights they were computed with.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch
from torch import nn

from framework.core.errors import ConfigError, ModelNotFoundError
from framework.core.memo import Memo

#: Extractors loaded in this process, by (name, Inception weights): the metrics of a run (FID and
#: KID) and the runs of a sweep share one (it is never trained; its device is the last run's).
EXTRACTORS: Memo[nn.Module] = Memo("feature extractors", 4)

#: torch-fidelity's InceptionV3 weights (the TF FID graph ported to PyTorch), where torch hub keeps them.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"


def inception_weights_path(path: str | None = None) -> Path:
    """Where the Inception weights are expected: ``path``, else torch hub's checkpoints folder."""
    return Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


class InceptionFeatures(nn.Module):
    """InceptionV3 2048-d pool features (torchmetrics' NoTrainInceptionV3) on float [0, 1] images."""

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        install = "pip install torch-fidelity and a torchvision built for your torch (e.g. from the same index)"
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ConfigError(f"features=inception needs torch-fidelity: {install}, or use features=clip")
        try:
            importlib.import_module("torchvision")
        except Exception as e:  # a torchvision built for another torch fails at import with odd errors
            raise ConfigError(
                f"features=inception needs a working torchvision (import failed: {type(e).__name__}: {e}): {install}"
            ) from e
        path = inception_weights_path(weights)
        if not path.is_file():
            raise ModelNotFoundError(
                f"Inception weights not found at {path}: download {INCEPTION_URL} there once "
                "(or give metrics.<fid|kid>.inception_weights), or use features=clip"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(path))
        self.num_features = 2048
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images if images.dtype == torch.uint8 else (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(pixels).reshape(images.shape[0], -1).double()


def load_features(name: str, inception_weights: str | None = None) -> nn.Module:
    """The feature extractor called ``name`` (``clip``, ``inception`` or an import path), in eval
    mode; loaded once per process (:data:`EXTRACTORS`)."""
    return EXTRACTORS.get((name, inception_weights), lambda: _load_features(name, inception_weights))


def _load_features(name: str, inception_weights: str | None = None) -> nn.Module:
    if name == "clip":
        from framework.metrics.clip_features import BundledCLIPFeatures

        module: nn.Module = BundledCLIPFeatures()
    elif name == "inception":
        module = InceptionFeatures(inception_weights)
    elif "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"features '{name}' cannot be imported ({e}): give clip, inception or package.module.Class") from e
        module = cls()
        if not isinstance(module, nn.Module) or not isinstance(getattr(module, "num_features", None), int):
            raise ConfigError(f"features '{name}' must build a torch.nn.Module with an int attribute num_features")
    else:
        raise ConfigError(f"unknown features '{name}': use clip, inception, or an import path package.module.Class")
    return module.eval()


def weights_hash(module: nn.Module) -> str:
    """A short hash of a module's class and every tensor of its state dict (names, shapes, values)."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
