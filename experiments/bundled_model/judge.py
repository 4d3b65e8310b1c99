"""Stage ``judge``: the supervised label classifier, trained on single-shape scenes."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from experiments.bundled_model.common import (batch_of_scenes, count_parameters, data_workers,
                                              initialised_with, step_generator, train_loop)
from framework.bundled.judge import Judge, JudgeConfig
from framework.bundled.world import label_indices


def train_judge(cfg: DictConfig, out: Path, device: torch.device) -> Judge:
    """Train (or resume) the judge; saves it to ``out/judge``."""
    c = cfg.judge
    with initialised_with(cfg.seed):
        judge = Judge(JudgeConfig(channels=tuple(c.channels)))
    judge = judge.to(device).train()
    print(f"judge: {count_parameters(judge) / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(judge.parameters(), lr=c.lr, weight_decay=1e-4)

    def make_batch(step: int) -> tuple:
        scenes = batch_of_scenes(cfg, "judge", step, c.batch_size, concept_rate=0.5,
                                 two_shape_rate=0.0)
        return scenes, label_indices(scenes.labels)

    def step_fn(step: int, batch: tuple) -> dict[str, float]:
        scenes, targets = batch
        images = scenes.draw(device).images
        # the judge must survive generated images: mild noise/blur augmentation
        gen = step_generator(cfg, "judge_noise", step, device)
        noise = torch.randn(images.shape, generator=gen, device=device)
        images = images + noise * 0.05 * torch.rand(len(images), 1, 1, 1, generator=gen, device=device)
        logits = judge(images)
        loss = sum(torch.nn.functional.cross_entropy(logits[k], targets[k].to(device))
                   for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    train_loop("judge", out, {"model": judge}, opt, step_fn, c.steps, c.max_minutes,
               make_batch=make_batch, workers=data_workers(cfg, device))
    judge.eval().save_pretrained(out / "judge")
    return judge
