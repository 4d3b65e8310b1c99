"""Shared helpers of the training stages: device, seeding, data, resumable time-budgeted loops."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from framework.bundled.world import ScenePlan, plan_scenes


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; any other value is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def stage_seed(seed: int, stage: str, step: int) -> int:
    """A deterministic seed for (run seed, stage, step): resumed runs redraw the same batches."""
    code = sum((i + 1) * ord(c) for i, c in enumerate(stage))
    return (seed * 1_000_003 + code * 10_007 + step) % (2**62)


def batch_of_scenes(cfg: DictConfig, stage: str, step: int, n: int, **world: float) -> ScenePlan:
    """The training batch of a stage at a step (fresh scenes, seeded by run seed/stage/step), as a
    plan: drawn by the step on its device (``.draw(device)``)."""
    return plan_scenes(n, stage_seed(cfg.seed, stage, step), **world)


class _StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``step`` is the training batch of that step."""

    def __init__(self, make: Callable[[int], object], steps: range):
        self.make, self.steps = make, steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> object:
        return self.make(self.steps[i])


def step_batches(make: Callable[[int], object], start: int, steps: int, workers: int):
    """Yield ``make(step)`` for ``step`` in ``[start, steps)``; with ``workers`` > 0 they are drawn
    by that many worker processes ahead of the training step (the batch of a step is the same
    either way: it depends only on the step). On a GPU the scenes, not the model, set the pace."""
    if workers <= 0:
        return (make(s) for s in range(start, steps))
    data = _StepBatches(make, range(start, steps))
    return iter(torch.utils.data.DataLoader(data, batch_size=None, shuffle=False,
                                            num_workers=workers, prefetch_factor=4))


def _plan_chunk(args: tuple) -> ScenePlan:
    n, seed, world = args
    return plan_scenes(n, seed, **world)


def plan_scenes_parallel(n: int, seed: int, workers: int, chunk: int = 4096,
                         **world: float) -> list[ScenePlan]:
    """Plans of ``n`` scenes in chunks of ``chunk`` (chunk k seeded by ``seed + k``), made on
    ``workers`` processes; the scenes depend on (n, seed, chunk), not on the number of workers."""
    jobs = [(min(chunk, n - i), seed + k, world) for k, i in enumerate(range(0, n, chunk))]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            return pool.map(_plan_chunk, jobs)
    return [_plan_chunk(j) for j in jobs]


def data_workers(cfg: DictConfig, device: torch.device) -> int:
    """Worker processes drawing scenes: ``cfg.workers``, or with ``auto`` none on a CPU (the cores
    train) and up to 6 beside a GPU."""
    if cfg.workers != "auto":
        return int(cfg.workers)
    return min(6, max(0, (os.cpu_count() or 1) - 2)) if device.type == "cuda" else 0


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean PSNR (dB) of images in [-1, 1] (peak-to-peak 2), per image then averaged."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()


def atomic_save(obj: object, path: Path) -> None:
    """torch.save into a temporary file, then rename (a killed run never leaves half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_loop(
    name: str,
    out_dir: Path,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    step_fn: Callable[..., dict[str, float]],
    steps: int,
    max_minutes: float,
    ckpt_every: int = 200,
    eval_fn: Callable[[int], dict[str, float]] | None = None,
    eval_every: int = 0,
    make_batch: Callable[[int], object] | None = None,
    workers: int = 0,
) -> int:
    """Run ``step_fn(step)`` (``step_fn(step, make_batch(step))`` when ``make_batch`` is given,
    the batches drawn by ``workers`` processes) from the last checkpoint up to ``steps`` or
    ``max_minutes`` of wall time, whichever comes first; checkpoints (modules, optimizer, step)
    go to ``out_dir/<name>.ckpt`` and per-step logs to ``out_dir/<name>_log.jsonl``. Returns the
    step reached; rerunning the stage resumes from it."""
    ckpt = out_dir / f"{name}.ckpt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]

    def save(step: int) -> None:
        atomic_save({"modules": {k: m.state_dict() for k, m in modules.items()},
                     "optimizer": optimizer.state_dict(), "step": step}, ckpt)

    log = (out_dir / f"{name}_log.jsonl").open("a")
    t0, step = time.time(), start
    bar = tqdm(total=steps, initial=start, desc=name, mininterval=5, dynamic_ncols=True)
    batches = step_batches(make_batch, start, steps, workers) if make_batch else None
    while step < steps:
        logs = step_fn(step, next(batches)) if batches is not None else step_fn(step)
        step += 1
        bar.update(1)
        if eval_fn is not None and eval_every and (step % eval_every == 0 or step == steps):
            logs.update(eval_fn(step))
        if step % 20 == 0 or "eval" in "".join(logs):
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
        logs.update(step=step, time=time.time() - t0)
        log.write(json.dumps(logs) + "\n")
        out_of_time = time.time() - t0 > max_minutes * 60
        if step % ckpt_every == 0 or step == steps or out_of_time:
            save(step)
            log.flush()
        if out_of_time:
            break
    bar.close()
    log.close()
    if step == start and not ckpt.exists():
        save(step)
    return step


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
