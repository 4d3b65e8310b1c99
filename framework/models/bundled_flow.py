"""``model=bundled_flow``: the small rectified-flow transformer shipped in the package
(framework/bundled/weights/flow, MODEL_CARD_flow.md), a StableDiffusion3Pipeline folder without T5
loaded through the same path as a real SD3 checkpoint (``model=sd3`` with ``use_t5=false``)."""
from __future__ import annotations

from framework.core.errors import ModelNotFoundError
from framework.models.sd3 import StableDiffusion3


class BundledFlow(StableDiffusion3):
    def __init__(self, height: int | None = None, width: int | None = None, shift: float | None = None,
                 vae_slice: int | None = None, vae_tiling: bool = False):
        from framework.bundled import WEIGHTS_DIR

        folder = WEIGHTS_DIR / "flow"
        if not (folder / "model_index.json").exists():
            raise ModelNotFoundError(
                f"the bundled flow model's weights are missing from {folder}: reinstall samplerlab, or rebuild them "
                "with `python -m experiments.bundled_flow install=true` (see framework/bundled/MODEL_CARD_flow.md)"
            )
        super().__init__(path=str(folder), height=height, width=width, use_t5=False, shift=shift,
                         vae_slice=vae_slice, vae_tiling=vae_tiling)
