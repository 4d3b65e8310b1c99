"""The bundled default model: a small text-to-image latent diffusion model shipped in the package.

``weights/pipeline`` is an ordinary diffusers StableDiffusionPipeline folder (safetensors), loaded
through the same ``from_pretrained`` path as a real checkpoint; ``weights/clip`` is the small CLIP
(its text tower is the pipeline's text encoder) used for CLIP score and FID/KID features;
``weights/judge`` is the label classifier used to measure prompt-following. The data world is
``framework.bundled.world``; the training code is ``experiments/bundled_model``; see MODEL_CARD.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPTokenizer

    from framework.bundled.judge import Judge

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR: Path = WEIGHTS_DIR / "pipeline"
CLIP_DIR: Path = WEIGHTS_DIR / "clip"
JUDGE_DIR: Path = WEIGHTS_DIR / "judge"


def _require(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"bundled weights missing at {path}; rebuild them with "
            "`python -m experiments.bundled_model install=true` (see framework/bundled/MODEL_CARD.md)")
    return path


def load_clip(path: Path | None = None) -> tuple[CLIPModel, CLIPTokenizer]:
    """The bundled CLIP (float32, eval mode) and its tokenizer, offline."""
    from transformers import CLIPModel, CLIPTokenizer

    path = _require(path or CLIP_DIR)
    model = CLIPModel.from_pretrained(path, local_files_only=True, dtype="float32").eval()
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def load_judge(path: Path | None = None) -> Judge:
    """The bundled judge (float32, eval mode)."""
    from framework.bundled.judge import Judge

    return Judge.from_pretrained(_require(path or JUDGE_DIR))


__all__ = ["WEIGHTS_DIR", "PIPELINE_DIR", "CLIP_DIR", "JUDGE_DIR", "load_clip", "load_judge"]
