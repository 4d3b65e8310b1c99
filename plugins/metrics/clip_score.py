"""CLIP score (Hessel et al. 2021; torchmetrics CLIPScore): 100·max(cos(image, prompt), 0) averaged
over samples, under the bundled CLIP (default, offline) or any transformers CLIP given as a local
folder or hub id in ``model`` (loaded offline unless ``allow_download``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torchmetrics.multimodal.clip_score import CLIPScore as TMCLIPScore

from framework.plugin import ConfigError, ModelNotFoundError, background, bundled, drain, hookimpl, host_copy


def _pooled(cls: type) -> type:
    """A CLIPModel subclass whose feature methods return tensors (transformers 5 returns outputs)."""

    class Pooled(cls):  # type: ignore[misc, valid-type]
        def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = super().get_image_features(*args, **kwargs)
            return out if torch.is_tensor(out) else out.pooler_output

        def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = super().get_text_features(*args, **kwargs)
            return out if torch.is_tensor(out) else out.pooler_output

    return Pooled


def load_scorer(model: str | None, allow_download: bool = False) -> TMCLIPScore:
    from transformers import CLIPModel, CLIPProcessor

    if model is None:
        model = str(bundled.CLIP_DIR)
    try:
        clip = _pooled(CLIPModel).from_pretrained(model, local_files_only=not allow_download).eval()
        processor = CLIPProcessor.from_pretrained(model, local_files_only=not allow_download)
    except OSError as e:
        raise ModelNotFoundError(
            f"CLIP '{model}' is not available offline: download it once (`hf download {model}`), give a local "
            "folder in metrics.clip_score.model, or set metrics.clip_score.allow_download=true"
        ) from e
    return TMCLIPScore(model_name_or_path=lambda: (clip, processor))


@dataclass
class CLIPScore:
    input_files: ClassVar[tuple[str, ...]] = ("model",)  # a local CLIP folder, read by content into the run key
    model: str | None = None
    allow_download: bool = False

    def scorer(self, run) -> TMCLIPScore:
        """This run's streaming metric (in the run's stash)."""
        return run.stash.get(self, lambda: load_scorer(self.model, self.allow_download))

    @hookimpl
    def configure(self, run):
        if not (run.model.has_decoder and run.model.is_conditional):
            raise ConfigError("clip_score compares images with their prompts: use a text-to-image model")
        self.scorer(run)

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        # 8-bit pixels made on the run's device and copied without waiting; the processor and the
        # CLIP forward run on the run's background worker while the next batch samples
        pixels = host_copy((images.float().clamp(0, 1) * 255).round().to(torch.uint8))
        background(run).submit(lambda: self.scorer(run).update(pixels.get(), list(batch.cond.prompts)))

    @hookimpl
    def run_end(self, run, result):
        drain(run)
        run.metrics["clip_score"] = float(self.scorer(run).compute())
