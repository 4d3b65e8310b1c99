"""Image features of the bundled CLIP (its projected, L2-normalised image embedding) for FID/KID on the bundled
world: a torch module in torchmetrics' custom-feature form (``num_features``; uint8 [0, 255] or
float [0, 1] images in, [N, d] features out)."""
from __future__ import annotations

import torch
from torch import nn


class BundledCLIPFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from framework.bundled import load_clip

        model, _ = load_clip()
        self.vision, self.projection = model.vision_model, model.visual_projection
        self.size = int(model.config.vision_config.image_size)
        self.num_features = int(self.projection.out_features)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        pooled = self.vision(pixel_values=x * 2 - 1).pooler_output
        return nn.functional.normalize(self.projection(pooled), dim=-1).double()
