"""Evaluation throughput (issue 26, item 3): images/s of FID/KID/CLIP-score generation against the
pure-network throughput, measured side by side in one process.

    python benchmarks/eval_throughput.py                           # bundled model, CPU or GPU
    python benchmarks/eval_throughput.py --model sd15 --batch 64    # SD-1.5-sized UNet + VAE (GPU)
    python benchmarks/eval_throughput.py --smoke                    # seconds: checks the script

**Engine**: ``execute`` of a composed run — DPM-Solver++(2M), CFG 5, ``metrics=[fid,kid,clip_score]``,
every PNG and batch file written to a run folder, NaN guard on. Its host work (PNG encoding, batch
files, feature extraction, metric updates) runs on the run's background worker while the next batch
samples (framework/core/background.py). Two times are reported: the generation loop (the record's
``seconds``: first batch to the last file and metric update) and the whole ``execute`` call
(plugins built, reference features read from their cache, grid, record).

**Pure network**: the same number of UNet calls (the engine's ``unet_calls`` per batch: one batched
CFG pair per evaluation, at twice the batch) and one VAE decode per batch, at the same batch size,
called back to back on the same pipeline object without the engine (no solver arithmetic, no
metrics, no files): the floor the engine is measured against.

``ratio_generation`` = engine images/s (loop) / pure images/s; ``ratio_wall`` uses the whole call.
Also printed: the seconds of host work the run's background worker did, and how long the main
thread waited for it (queue full, final drain): the part of the host work that did not overlap.
Repetitions are interleaved (engine, pure, engine, …) and medians compared. The load average is
printed before and after (on a shared CPU it is part of the figure). ``--out`` receives
``eval_throughput.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = "[a red circle,a blue square,a green triangle,a yellow circle]"


def sd15_pipeline(device: Any, dtype: Any, small: bool) -> Any:
    """SD 1.5's UNet and VAE architectures with random weights (no download), the 2-layer random CLIP
    text encoder of benchmarks/gpu_engine.py; ``small`` shrinks the widths (CPU smoke)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from framework.models.tiny import build_tiny_pipeline

    width = (32, 64, 64, 64) if small else (320, 640, 1280, 1280)
    vae_width = (16, 32, 32, 32) if small else (128, 256, 512, 512)
    text_width = 64 if small else 768
    tiny = build_tiny_pipeline(seed=0)
    tok = tiny.tokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8 if small else 64, in_channels=4, out_channels=4, layers_per_block=1 if small else 2,
        block_out_channels=width, cross_attention_dim=text_width, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1 if small else 2,
                        block_out_channels=vae_width, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16 if small else 32,
                        sample_size=64 if small else 512)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=2,
        num_attention_heads=4 if small else 12, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=tiny.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)


def build_adapter(args: argparse.Namespace, device: Any, dtype: Any) -> Any:
    if args.model == "bundled":
        from framework.models.bundled import Bundled

        return Bundled()
    from framework.models.diffusers_sd import StableDiffusion

    return StableDiffusion(pipeline=sd15_pipeline(device, dtype, small=args.smoke))


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pure_network(adapter: Any, batches: int, batch: int, calls: int, device: Any, dtype: Any) -> None:
    """``calls`` batched CFG UNet calls (2 × ``batch`` rows) and one VAE decode per batch, back to back."""
    import torch

    pipe = adapter.pipe
    ids = pipe.tokenizer([""] * batch + ["a red circle"] * batch, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids.to(device))[0].to(dtype)
        ts = torch.linspace(999, 0, calls, device=device)
        for _ in range(batches):
            x = torch.randn(batch, *adapter.latent_shape, device=device, dtype=dtype)
            for t in ts:
                out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=emb, return_dict=False)[0]
                x = out[:batch]  # a data dependency, as the solver has
            pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)
    sync(device)


def watch_workers() -> list[tuple[float, float]]:
    """(busy_s, waited_s) of every run's background worker as it closes (an empty list where the
    code under test has none: an older checkout)."""
    seen: list[tuple[float, float]] = []
    try:
        from framework.core.background import Background
    except ImportError:
        return seen
    close = Background.close

    def closing(self: Any) -> None:
        close(self)
        if self.jobs_run:
            seen.append((self.busy_s, self.waited_s))

    Background.close = closing  # type: ignore[method-assign]
    return seen


def watch_main_thread_host_work() -> list[float]:
    """Seconds the main thread spends in a batch's host work after sampling — ``engine.end_batch``
    (metrics, progress) and ``RunFolder.save_batch`` (PNGs, batch file) when called on it — summed
    per run into the list's last entry (the same figure for code with and without the worker)."""
    import threading

    from framework.core import engine
    from framework.runs.folder import RunFolder

    spent = [0.0]

    def timed_on_main(fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[-1] += time.perf_counter() - t0
        return wrapper

    engine.end_batch = timed_on_main(engine.end_batch)
    RunFolder.save_batch = timed_on_main(RunFolder.save_batch)  # type: ignore[method-assign]
    return spent


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("bundled", "sd15"), default="bundled")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="float32 (bundled default) or float16/bfloat16 (sd15 default float16 on CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shared build machine: 1)")
    ap.add_argument("--out", default=None, help="folder for eval_throughput.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repetition: checks the script, not the speed")
    args = ap.parse_args(argv)
    if args.smoke:
        args.samples, args.batch, args.steps, args.reps = 4, 2, 2, 1

    import torch

    from framework.core.engine import resolve_device
    from framework.entry.compose import compose
    from framework.runs.execute import execute

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    workers = watch_workers()
    main_host = watch_main_thread_host_work()
    dtype_name = args.dtype or ("float16" if args.model == "sd15" and device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    adapter = build_adapter(args, device, dtype)
    reference = 8 if args.smoke else 256
    ov = ["model=tiny_random" if args.model == "sd15" else "model=bundled", "solver=dpmpp_2m",
          f"steps={args.steps}", f"num_samples={args.samples}", f"batch_size={args.batch}", "cfg_scale=5",
          f"prompts={PROMPTS}", f"device={device}", f"dtype={dtype_name}", "metrics=[fid,kid,clip_score]",
          f"metrics.fid.reference={reference}", f"metrics.kid.reference={reference}", "resume=false",
          "save_images=true"]
    cfg, choices = compose(ov)
    batches = -(-args.samples // args.batch)
    tmp = Path(tempfile.mkdtemp(prefix="eval_throughput_"))
    load_before = os.getloadavg()
    runs: list[int] = [0]

    def engine() -> tuple[float, float, dict[str, Any]]:
        runs[0] += 1
        sync(device)
        t0 = time.perf_counter()
        result = execute(cfg, choices, model=adapter, output_dir=tmp / f"run{runs[0]}")
        sync(device)
        return time.perf_counter() - t0, float(result.record["metrics"]["seconds"]), result.record["metrics"]

    wall0, loop0, metrics = engine()  # warm-up: loads, reference features into their cache
    calls = int(round(metrics["unet_calls"]))
    last = args.samples - (batches - 1) * args.batch

    def pure() -> float:
        sync(device)
        t0 = time.perf_counter()
        pure_network(adapter, batches - 1, args.batch, calls, device, dtype) if batches > 1 else None
        pure_network(adapter, 1, last, calls, device, dtype)
        return time.perf_counter() - t0

    pure()
    walls, loops, pures = [], [], []
    workers.clear()
    main_host.clear()
    for _ in range(args.reps):
        main_host.append(0.0)
        w, lp, metrics = engine()
        walls.append(w)
        loops.append(lp)
        pures.append(pure())
    wall, loop, floor = statistics.median(walls), statistics.median(loops), statistics.median(pures)
    res = {
        "model": args.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "dtype": dtype_name, "threads": torch.get_num_threads(), "samples": args.samples,
        "batch": args.batch, "steps": args.steps, "unet_calls_per_batch": calls, "reps": args.reps,
        "metrics": "fid,kid,clip_score", "smoke": args.smoke,
        "engine_wall_s": wall, "engine_loop_s": loop, "pure_s": floor,
        "engine_images_per_s": args.samples / loop, "engine_wall_images_per_s": args.samples / wall,
        "pure_images_per_s": args.samples / floor,
        "ratio_generation": floor / loop, "ratio_wall": floor / wall,
        "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in os.getloadavg()],
        "all_s": {"engine_wall": walls, "engine_loop": loops, "pure": pures},
        "main_thread_host_s": statistics.median(main_host),
        "worker_busy_s": statistics.median([b for b, _ in workers]) if workers else None,
        "main_waited_s": statistics.median([w for _, w in workers]) if workers else None,
        "fid": metrics.get("fid"), "kid": metrics.get("kid"), "clip_score": metrics.get("clip_score"),
    }
    for key in ("model", "device", "dtype", "samples", "batch", "steps", "unet_calls_per_batch", "load_before"):
        print(f"{key}: {res[key]}")
    print(f"engine_images_per_s: {res['engine_images_per_s']:.2f} (loop {loop:.3f} s; whole execute {wall:.3f} s = "
          f"{res['engine_wall_images_per_s']:.2f} images/s)")
    print(f"pure_images_per_s: {res['pure_images_per_s']:.2f} ({floor:.3f} s)")
    print(f"ratio_generation: {res['ratio_generation']:.3f}")
    print(f"ratio_wall: {res['ratio_wall']:.3f}")
    print(f"host work on the main thread after sampling (end_batch, save_batch): {res['main_thread_host_s']:.3f} s per run")
    if workers:
        print(f"host work on the background worker: {res['worker_busy_s']:.3f} s per run (PNGs, batch files, features, "
              f"metric updates); main thread waited for it {res['main_waited_s']:.3f} s")
    print(f"load_after: {res['load_after']}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "eval_throughput.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
