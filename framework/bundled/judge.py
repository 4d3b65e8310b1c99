"""The judge: a small supervised CNN classifier of the world's exact labels.

It classifies the main (first) shape of a scene: its colour (``world.COLOURS``), its shape
(``world.SHAPES``) and whether it carries the held-out concept (striped). Trained on single-shape
scenes with exact labels (``experiments/bundled_model``), it is the independent measure of
prompt-following for generated images: the CLIP is not its own judge.

Stored as ``config.json`` + ``model.safetensors`` (``framework/bundled/weights/judge``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from framework.bundled.world import COLOURS, SHAPES


@dataclass
class JudgeConfig:
    """Architecture and class names of a judge."""

    channels: tuple[int, ...] = (24, 48, 96, 128)
    heads: dict[str, list[str]] = field(default_factory=lambda: {
        "colour": list(COLOURS), "shape": list(SHAPES), "striped": ["no", "yes"]})


class Judge(nn.Module):
    """CNN: a stride-2 stem (64→32 px), then conv + stride-2 conv blocks down to 4 px, global
    average pooling, one linear head per label."""

    def __init__(self, config: JudgeConfig | None = None) -> None:
        super().__init__()
        self.config = config or JudgeConfig()
        ch = self.config.channels
        layers: list[nn.Module] = [nn.Conv2d(3, ch[0], 4, stride=2, padding=1), nn.SiLU()]
        c_in = ch[0]
        for c in ch[1:]:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict(
            {name: nn.Linear(c_in, len(classes)) for name, classes in self.config.heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for images [n, 3, H, W] in [-1, 1] (resized to 64×64 if needed)."""
        if images.shape[-2:] != (64, 64):
            images = nn.functional.interpolate(images, size=(64, 64), mode="bilinear",
                                               antialias=True, align_corners=False)
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class indices per head (long tensors [n]) for images in [-1, 1]."""
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        out = {k: v.argmax(-1) for k, v in self(images.to(p.device, p.dtype)).items()}
        self.train(was_training)
        return out

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (fp16 storage) into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()}
        save_file(state, path / "model.safetensors")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Judge:
        """Load a judge saved by :meth:`save_pretrained` (weights cast to float32, eval mode)."""
        path = Path(path)
        raw = json.loads((path / "config.json").read_text())
        judge = cls(JudgeConfig(channels=tuple(raw["channels"]), heads=raw["heads"]))
        state = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
        judge.load_state_dict(state)
        return judge.eval()
