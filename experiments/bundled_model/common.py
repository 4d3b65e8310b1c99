"""Shared helpers of the training stages: seeding, data, checkpoints, resumable time-budgeted loops.

No global seeding: a model is initialised under :func:`initialised_with` (the global generator
seeded inside ``torch.random.fork_rng``, restored after), and every random draw of a training
step comes from a generator seeded by (run seed, stage, step) — so a resumed run redraws the same.
Checkpoints and caches are safetensors (every tensor) plus JSON (everything else): no pickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from framework.bundled.world import ScenePlan, plan_scenes
from framework.core.files import atomic_write_bytes, atomic_write_json


def seed_from_shipped(out: Path, parts: tuple[str, ...] | list[str] = ("tokenizer", "vae", "clip"),
                      vae_from: str | Path | None = None) -> None:
    """Copy shipped parts into the training folder ``out`` (the layout the stages read), each unless
    already there: ``tokenizer`` and ``vae`` from the pipeline, ``clip`` (its text tower is the
    pipeline's text encoder), ``judge``; then the VAE folder ``vae_from`` as ``out/vae`` (replacing
    one there), when given. A rebuild that keeps them trains the rest on exactly that latent space
    or text conditioning, and is scored by the same judge and CLIP features."""
    import shutil

    from framework.bundled import CLIP_DIR, PIPELINE_DIR, WEIGHTS_DIR

    sources = {"tokenizer": PIPELINE_DIR / "tokenizer", "vae": PIPELINE_DIR / "vae", "clip": CLIP_DIR,
               "judge": WEIGHTS_DIR / "judge"}
    unknown = set(parts) - set(sources)
    if unknown:
        raise ValueError(f"seed parts {sorted(unknown)}: choose from {', '.join(sources)}")
    out.mkdir(parents=True, exist_ok=True)
    for name in parts:
        if not (out / name).is_dir():
            shutil.copytree(sources[name], out / name)
    if vae_from:
        if not (Path(vae_from) / "config.json").is_file():
            raise FileNotFoundError(f"vae_from={vae_from}: not a diffusers AutoencoderKL folder (no config.json)")
        shutil.rmtree(out / "vae", ignore_errors=True)
        shutil.copytree(vae_from, out / "vae")


def stage_seed(seed: int, stage: str, step: int) -> int:
    """A deterministic seed for (run seed, stage, step): resumed runs redraw the same batches."""
    code = sum((i + 1) * ord(c) for i, c in enumerate(stage))
    return (seed * 1_000_003 + code * 10_007 + step) % (2**62)


def step_generator(cfg: DictConfig, stage: str, step: int, device: torch.device) -> torch.Generator:
    """The generator of a stage's random draws at a step, on ``device``, seeded by (run seed, stage, step)."""
    return torch.Generator(device).manual_seed(stage_seed(cfg.seed, stage, step))


@contextlib.contextmanager
def initialised_with(seed: int) -> Iterator[None]:
    """Build a model (on the CPU) inside this block: its initial weights depend on ``seed`` alone,
    and the global generator is left as it was (``fork_rng`` restores it)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


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


def save_state(path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any], tag: str) -> None:
    """``path`` (JSON: ``info`` and the name of the tensors file) and ``<stem>-<tag>.safetensors``
    beside it (the tensors, copied to the CPU). The tensors go first and the JSON last, each
    atomically, so a run killed in between leaves the previous pair whole; the tensor files of
    earlier pairs are removed after."""
    from safetensors.torch import save

    file = path.with_name(f"{path.stem}-{tag}.safetensors")
    atomic_write_bytes(file, save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}))
    atomic_write_json(path, {**info, "tensors": file.name})
    for old in path.parent.glob(f"{path.stem}-*.safetensors"):
        if old != file:
            old.unlink(missing_ok=True)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, info) saved by :func:`save_state`, or None when there is none."""
    from safetensors.torch import load_file

    if not path.exists():
        return None
    info = json.loads(path.read_text())
    return load_file(path.with_name(info.pop("tensors"))), info


def save_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, step: int) -> None:
    """Modules' state dicts and the optimizer's per-parameter state (tensors) to safetensors; the
    step, the optimizer's parameter groups and any non-tensor state to JSON (:func:`save_state`)."""
    opt = optimizer.state_dict()
    tensors = {f"modules/{name}/{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    tensors.update({f"optimizer/{i}/{k}": v for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)})
    other = {str(i): {k: v for k, v in s.items() if not torch.is_tensor(v)} for i, s in opt["state"].items()}
    save_state(path, tensors, {"step": step, "param_groups": opt["param_groups"], "optimizer_state": other}, f"{step:07d}")


def load_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """Restore what :func:`save_checkpoint` wrote into ``modules`` and ``optimizer``; returns its
    step (0 and nothing restored when there is no checkpoint)."""
    loaded = load_state(path)
    if loaded is None:
        return 0
    tensors, info = loaded
    for name, module in modules.items():
        prefix = f"modules/{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict[int, dict[str, Any]] = {int(i): dict(s) for i, s in info["optimizer_state"].items()}
    for key, v in tensors.items():
        if key.startswith("optimizer/"):
            _, i, k = key.split("/", 2)
            state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return int(info["step"])


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
    go to ``out_dir/<name>.checkpoint.json`` and the safetensors file it names, per-step logs to
    ``out_dir/<name>_log.jsonl``. Returns the step reached; rerunning the stage resumes from it."""
    ckpt = out_dir / f"{name}.checkpoint.json"
    start = load_checkpoint(ckpt, modules, optimizer)

    def save(step: int) -> None:
        save_checkpoint(ckpt, modules, optimizer, step)

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


def step_with_ema(opt: torch.optim.Optimizer, model: nn.Module, ema: nn.Module, loss: torch.Tensor, step: int,
                  ema_decay: float) -> None:
    """One optimizer step (gradient norm clipped at 1), then the EMA copy moved towards the model
    with the warm-up decay min(ema_decay, (1 + step)/(10 + step))."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
