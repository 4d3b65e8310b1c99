"""``model=bundled``: the small text-to-image model shipped in the package (framework/bundled),
loaded through the same diffusers ``from_pretrained`` path as any checkpoint."""
from __future__ import annotations

from framework.core.errors import ModelNotFoundError
from framework.models.diffusers_sd import StableDiffusion


class Bundled(StableDiffusion):
    def __init__(self, height: int | None = None, width: int | None = None, vae_slice: int | None = None,
                 vae_tiling: bool = False):
        from framework.bundled import PIPELINE_DIR

        if not (PIPELINE_DIR / "model_index.json").exists():
            raise ModelNotFoundError(
                f"the bundled model's weights are missing from {PIPELINE_DIR}: reinstall samplerlab, or rebuild "
                "them with `python -m experiments.bundled_model` (see framework/bundled/MODEL_CARD.md)"
            )
        super().__init__(path=str(PIPELINE_DIR), height=height, width=width, vae_slice=vae_slice, vae_tiling=vae_tiling)
