"""GPU benchmark of the engine (issue 10): one prepared script, every figure measured side by side.

    PYTHONPATH=<wheels>:. python benchmarks/gpu_engine.py --out $OUT        # a GPU, ≈ 6 min (4 compiles)
    python benchmarks/gpu_engine.py --smoke --out /tmp/gpu_engine_smoke        # CPU, tiny sizes, seconds

Sections (each in its own try/except: a failure prints its traceback and the rest still runs):

(a) Eager engine vs a hand-written diffusers loop (``framework.testing.diffusers_loop``: prompt
    encoding, batched CFG pass, ``scheduler.step``, VAE decode), same pipeline object, 20 steps of
    DPM-Solver++(2M) (``solver=dpmpp_2m schedule=uniform`` vs diffusers'
    ), CFG 7.5, batch 1 and 8, on an SD 1.5-sized UNet with random
    weights built from its config (no download) in fp16, 64×64 latents (512² images), a 2-layer
    random CLIP text encoder with 768-wide states (77 tokens) and the tiny VAE of
    ``framework.models.tiny`` (decode is on both sides; it is cheap). Engine without callbacks
    (like for like) and with the default NaN guard; per-step engine overhead in µs =
    (engine − hand)/steps; CUDA synchronisations per step (``torch.cuda.set_sync_debug_mode``,
    runs of 10 and 20 steps); the engine with ``channels_last=true``.
(c) Images/s of batched generation for FID on the bundled model (framework/bundled/weights): 256
    samples, 20 steps of DPM-Solver++(2M), CFG 5, batch 64 and 128, NaN guard on, with the hand
    loop at batch 128 for reference.
(b) ``compile=true`` (torch.compile mode reduce-overhead: CUDA graphs) at batch 1 with CFG: the
    compiled engine vs the diffusers eager loop and the eager engine (compile time reported apart);
    then heun (two evaluations per step), dpmpp_2m and unipc (history solvers) compiled vs eager,
    the difference of the final latents relative to their scale (fp16: stated tolerance 5e-2).
    ``compile=step`` (the whole step in one graph, issue 26) against the floor: N × the compiled,
    CUDA-graphed UNet call on the CFG pair, timed in the same interleaved rounds (target ≤ 1.05);
    its first run compiles three step variants (first, middle, last) and is reported apart.

Repetitions are interleaved (hand, engine, … per round) and medians are compared. ``--budget-s``
caps the wall time: a section that would not fit is skipped with a printed note, and repetitions
stop early when time runs short. ``$OUT/gpu_engine.json`` holds every figure, the device, torch and
diffusers versions, notes and errors; it is rewritten after each section.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

REQUIRED = ("torch", "numpy", "diffusers", "transformers", "hydra", "omegaconf", "antlr4", "yaml", "pluggy", "tqdm",
            "safetensors", "tokenizers", "huggingface_hub", "regex", "PIL", "filelock", "packaging")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
FP16_RTOL = 5e-2  # compiled vs eager final latents, max |Δ| / max |eager|, fp16, 20 chaotic random-UNet steps


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)


class Bench:
    """Results, notes and errors of one run of the script (written to JSON after every section)."""

    def __init__(self, args: argparse.Namespace, device: Any):
        import torch

        self.args, self.device = args, device
        self.budget = Budget(args.budget_s)
        self.deadline = float("inf")
        self.data: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "args": vars(args), "sections": {}, "notes": [], "errors": {},
        }
        try:
            import diffusers

            self.data["diffusers"] = diffusers.__version__
        except Exception:  # noqa: BLE001 - recorded by the pre-flight check
            self.data["diffusers"] = None

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.data["notes"].append(text)

    def save(self) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.budget.t0, 1)
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_engine.json").write_text(json.dumps(self.data, indent=1, default=str))

    def section(self, key: str, title: str, need_s: float, cap_s: float, fn: Callable[[dict[str, Any]], None]) -> None:
        """Run one section if ``need_s`` of the budget is left; its repetitions stop after ``cap_s``."""
        left = self.budget.left()
        self.deadline = time.monotonic() + cap_s
        print(f"\n== ({key}) {title}  [{left:.0f} s of budget left]", flush=True)
        if left < need_s:
            self.note(f"section ({key}) skipped: needs ~{need_s:.0f} s, {left:.0f} s left (raise --budget-s)")
            self.data["sections"][key] = {"skipped": True}
            self.save()
            return
        res: dict[str, Any] = {}
        self.data["sections"][key] = res
        t0 = time.monotonic()
        try:
            fn(res)
        except Exception:  # noqa: BLE001 - the script never dies as a whole
            tb = traceback.format_exc()
            print(tb, flush=True)
            self.data["errors"][key] = tb
        res["section_s"] = round(time.monotonic() - t0, 1)
        self.save()

    # timing ------------------------------------------------------------------------------------
    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def interleaved(self, fns: dict[str, Callable[[], Any]], reps: int, reserve_s: float) -> dict[str, float]:
        """Median seconds of each function over ``reps`` interleaved rounds (at least 2 rounds;
        fewer than ``reps`` when less than ``reserve_s`` of the budget would remain, or the
        section's time cap would pass)."""
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(reps):
            for name, fn in fns.items():
                times[name].append(self.timed(fn))
            per_round = sum(t[-1] for t in times.values())
            short = self.budget.left() - per_round < reserve_s or time.monotonic() + per_round > self.deadline
            if r >= 1 and r + 1 < reps and short:
                self.note(f"{'/'.join(fns)}: stopped after {r + 1} of {reps} rounds (budget or section time cap)")
                break
        return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def sd15_sized_pipeline(device: Any, dtype: Any, smoke: bool) -> Any:
    """SD 1.5's UNet (random weights, from its config), a 2-layer random CLIP text encoder with 768-wide
    states, the tiny VAE and character tokenizer of framework.models.tiny; the tiny pipeline in smoke mode."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from framework.models.tiny import build_tiny_pipeline

    if smoke:  # the process-wide tiny pipeline (shared with model=tiny_random)
        from framework.models.tiny import TinyRandom

        return TinyRandom().pipe.to(device=device, dtype=dtype)
    tiny = build_tiny_pipeline(seed=0)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        tok = tiny.tokenizer
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
            max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ))
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=tiny.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)


#: The grid of diffusers' DPMSolverMultistepScheduler with timestep_spacing="trailing", started as it
#: starts (x_T = √(1+σ₀²)·noise): on it solver=dpmpp_2m and diffusers' DPM-Solver++(2M) agree (tiny
#: model, float32: max |Δlatents| 4e-5 at scale 40).
GRID = ["schedule=uniform", "schedule.spacing=trailing", "schedule.init_noise=vp"]


def overrides(b: Bench, solver: str, steps: int, batch: int, cfg_scale: float, extra: list[str] = (),
              dtype: str | None = None, prompts: str = "[a red circle]") -> list[str]:
    return [f"solver={solver}", *GRID, f"steps={steps}", f"num_samples={batch}", f"batch_size={batch}",
            f"cfg_scale={cfg_scale}", f"prompts={prompts}", f"device={b.device}", f"dtype={dtype or b.args.dtype}",
            "save_images=false", *extra]


class Engine:
    """``execute`` on a composed config with a model object (composition done once per config)."""

    def __init__(self, adapter: Any):
        self.adapter = adapter
        self._cfgs: dict[tuple, Any] = {}

    def __call__(self, ov: list[str]) -> Any:
        from framework.entry.compose import compose
        from framework.runs.execute import execute

        key = tuple(ov)
        if key not in self._cfgs:
            self._cfgs[key] = compose(["model=tiny_random", *ov])
        cfg, choices = self._cfgs[key]
        return execute(cfg, choices, model=self.adapter)


def hand(pipe: Any, steps: int, x_vp: Any, batch: int, cfg_scale: float) -> Any:
    """Images of the hand-written diffusers loop with DPM-Solver++(2M) from VP-scaled latents ``x_vp``."""
    from diffusers import DPMSolverMultistepScheduler

    from framework.testing import diffusers_loop

    sched = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return diffusers_loop(pipe, sched, steps, x_vp[:batch].clone(), ["a red circle"] * batch, cfg_scale, decode=True)


def vp_start(result: Any) -> Any:
    """The engine's x_T as diffusers' DPM scheduler starts: unit-variance noise."""
    from framework.models.base import vp_scale

    return result.x_T * vp_scale(result.schedule.sigmas[0])


def rel_diff(a: Any, b: Any) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def finite_fraction(x: Any) -> float:
    import torch

    return float(torch.isfinite(x).flatten(1).all(1).double().mean())


def syncs_of(b: Bench, fn: Callable[[], Any]) -> tuple[int, list[str]]:
    """CUDA synchronisations made by ``fn`` (torch.cuda.set_sync_debug_mode warnings), and where."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    hits = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(hits), sorted({f"{Path(w.filename).name}:{w.lineno}" for w in hits})


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
def section_a(b: Bench, res: dict[str, Any], pipe: Any, engine: Engine) -> None:
    steps, cfg = b.args.steps, 7.5
    res.update(model="SD 1.5-sized UNet, random weights" if not b.args.smoke else "tiny pipeline (smoke)",
               solver="dpmpp_2m on the trailing grid (engine) / DPMSolverMultistepScheduler, trailing (diffusers)", steps=steps, cfg_scale=cfg,
               dtype=b.args.dtype, decode="both sides (tiny VAE)", callbacks="engine: none, and nan_guard (default)")
    for batch in b.args.batches:
        plain = overrides(b, "dpmpp_2m", steps, batch, cfg, ["callback=[]"])
        guarded = overrides(b, "dpmpp_2m", steps, batch, cfg)
        first = engine(plain)  # warm-up (and the shared x_T)
        x_vp = vp_start(first)
        ref = hand(pipe, steps, x_vp, batch, cfg)
        engine(guarded)
        t = b.interleaved({
            "hand": lambda: hand(pipe, steps, x_vp, batch, cfg),
            "engine": lambda: engine(plain),
            "engine_nan_guard": lambda: engine(guarded),
        }, b.args.reps if batch == 1 else max(2, b.args.reps // 2), reserve_s=b.args.reserve_s)
        row = {
            "hand_ms": t["hand"] * 1e3, "engine_ms": t["engine"] * 1e3, "engine_nan_guard_ms": t["engine_nan_guard"] * 1e3,
            "ratio": t["engine"] / t["hand"], "ratio_nan_guard": t["engine_nan_guard"] / t["hand"],
            "overhead_us_per_step": (t["engine"] - t["hand"]) / steps * 1e6,
            "overhead_nan_guard_us_per_step": (t["engine_nan_guard"] - t["hand"]) / steps * 1e6,
            "image_rel_diff_vs_hand": rel_diff(first.images, ref), "finite_fraction": finite_fraction(first.latents),
        }
        res[f"batch{batch}"] = row
        print(f"  batch {batch}: hand {row['hand_ms']:.1f} ms  engine {row['engine_ms']:.1f} ms  ratio {row['ratio']:.3f} "
              f"(target ≤ 1.02)  overhead {row['overhead_us_per_step']:.0f} µs/step  | nan_guard: ratio "
              f"{row['ratio_nan_guard']:.3f}  | images rel. diff vs hand {row['image_rel_diff_vs_hand']:.2g}", flush=True)
    if b.device.type == "cuda":
        counts = {}
        for n in (10, 20):
            counts[n], where = syncs_of(b, lambda n=n: engine(overrides(b, "dpmpp_2m", n, 1, cfg, ["callback=[]"])))
            counts[f"nan_guard_{n}"], where_g = syncs_of(b, lambda n=n: engine(overrides(b, "dpmpp_2m", n, 1, cfg)))
            counts[f"hand_{n}"], where_h = syncs_of(b, lambda n=n: hand(pipe, n, x_vp, 1, cfg))
        res["cuda_syncs"] = {
            "engine_per_run_20": counts[20], "engine_per_step": (counts[20] - counts[10]) / 10,
            "engine_nan_guard_per_step": (counts["nan_guard_20"] - counts["nan_guard_10"]) / 10,
            "hand_per_run_20": counts["hand_20"], "hand_per_step": (counts["hand_20"] - counts["hand_10"]) / 10,
            "engine_where": where, "engine_nan_guard_where": where_g, "hand_where": where_h,
        }
        s = res["cuda_syncs"]
        print(f"  CUDA syncs: engine {s['engine_per_run_20']} per 20-step run, {s['engine_per_step']:.2f} per step "
              f"(nan_guard {s['engine_nan_guard_per_step']:.2f}); hand loop {s['hand_per_run_20']} per run, "
              f"{s['hand_per_step']:.2f} per step", flush=True)
    if b.budget.left() > b.args.reserve_s + 10:
        plain = overrides(b, "dpmpp_2m", steps, 1, cfg, ["callback=[]"])
        cl = overrides(b, "dpmpp_2m", steps, 1, cfg, ["callback=[]", "channels_last=true"])
        engine(cl)
        t = b.interleaved({"engine": lambda: engine(plain), "engine_channels_last": lambda: engine(cl)}, 3, b.args.reserve_s)
        engine(plain)  # leave the UNet contiguous for the next sections
        res["channels_last_batch1"] = {"engine_ms": t["engine"] * 1e3, "engine_channels_last_ms": t["engine_channels_last"] * 1e3,
                                       "ratio": t["engine_channels_last"] / t["engine"]}
        print(f"  channels_last (eager, batch 1): {t['engine_channels_last'] * 1e3:.1f} ms vs {t['engine'] * 1e3:.1f} ms "
              f"(ratio {t['engine_channels_last'] / t['engine']:.3f})", flush=True)


def section_b(b: Bench, res: dict[str, Any], pipe: Any, engine: Engine) -> None:
    from framework.core import graphstep
    from framework.models import compiled

    backends = compiled.BACKEND, graphstep.BACKEND
    compiled.BACKEND = graphstep.BACKEND = b.args.compile_backend
    try:
        _section_b(b, res, pipe, engine)
    finally:
        compiled.BACKEND, graphstep.BACKEND = backends


def unet_floor(b: Bench, pipe: Any, engine: Engine, steps: int, mode: str) -> Callable[[], None]:
    """``steps`` back-to-back calls of the compiled UNet (CUDA-graphed on CUDA: the CompiledNetwork
    ``compile=true`` uses, called raw, without the engine's output copy) on the CFG pair of batch 1:
    the floor of a compiled ``steps``-step CFG run."""
    import torch

    from framework.models import compiled

    net = compiled.compile_network(pipe.unet, mode, b.device, pipe.unet.dtype)
    adapter = engine.adapter
    enc = adapter.encode_prompts(["a red circle", ""])
    x = torch.randn(2, *adapter.latent_shape, device=b.device, dtype=pipe.unet.dtype)
    t = torch.tensor(500.0, device=b.device)

    def run() -> None:
        for _ in range(steps):
            if net.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            net.compiled(x, t, **enc, return_dict=False)

    for _ in range(3):  # compile (shared with compile=true: same module, mode and shapes), warm up, record
        run()
    return run


def _section_b(b: Bench, res: dict[str, Any], pipe: Any, engine: Engine) -> None:
    import torch

    from framework.models import compiled

    steps, cfg = b.args.steps, 7.5
    mode = compiled.resolve_mode(None, b.device)
    res.update(steps=steps, cfg_scale=cfg, batch=1, mode=mode, backend=compiled.BACKEND, dtype=b.args.dtype,
               tolerance=f"max|compiled − eager| / max|eager| ≤ {FP16_RTOL} on the final latents")
    eager = overrides(b, "dpmpp_2m", steps, 1, cfg, ["callback=[]"])
    comp = overrides(b, "dpmpp_2m", steps, 1, cfg, ["callback=[]", "compile=true"])
    base = engine(eager)
    x_vp = vp_start(base)
    t0 = time.perf_counter()
    first = engine(comp)  # compiles (≈ 60 s for an SD 1.5 UNet on an H100)
    b.sync()
    res["first_compiled_run_s"] = time.perf_counter() - t0
    print(f"  first compiled run (compile included): {res['first_compiled_run_s']:.1f} s", flush=True)
    for _ in range(2):  # CUDA-graph trees warm up, then record
        engine(comp)
    step = overrides(b, "dpmpp_2m", steps, 1, cfg, ["callback=[]", "compile=step"])
    t0 = time.perf_counter()
    first_step = engine(step)  # compiles the step's variants (first, middle, last step)
    b.sync()
    res["first_step_run_s"] = time.perf_counter() - t0
    print(f"  first compile=step run (compile included): {res['first_step_run_s']:.1f} s", flush=True)
    for _ in range(2):
        engine(step)
    floor = unet_floor(b, pipe, engine, steps, mode)
    t = b.interleaved({
        "hand_eager": lambda: hand(pipe, steps, x_vp, 1, cfg),
        "engine_eager": lambda: engine(eager),
        "engine_compiled": lambda: engine(comp),
        "engine_step": lambda: engine(step),
        "floor": floor,
    }, b.args.reps, reserve_s=b.args.reserve_s)
    again = engine(comp)
    res["main"] = {
        "hand_eager_ms": t["hand_eager"] * 1e3, "engine_eager_ms": t["engine_eager"] * 1e3,
        "engine_compiled_ms": t["engine_compiled"] * 1e3,
        "ratio_compiled_vs_hand_eager": t["engine_compiled"] / t["hand_eager"],
        "ratio_compiled_vs_engine_eager": t["engine_compiled"] / t["engine_eager"],
        "rel_diff_vs_eager": rel_diff(again.latents, base.latents), "finite_fraction": finite_fraction(again.latents),
        "within_tolerance": rel_diff(again.latents, base.latents) <= FP16_RTOL,
        "rel_diff_first_vs_later_compiled": rel_diff(first.latents, again.latents),
    }
    m = res["main"]
    print(f"  dpmpp_2m batch 1: hand eager {m['hand_eager_ms']:.1f} ms  engine eager {m['engine_eager_ms']:.1f} ms  "
          f"engine compiled {m['engine_compiled_ms']:.1f} ms  ratio vs hand {m['ratio_compiled_vs_hand_eager']:.3f} "
          f"(target ≤ 0.40)  rel. diff vs eager {m['rel_diff_vs_eager']:.2g}", flush=True)
    got = engine(step)
    d = rel_diff(got.latents, base.latents)
    res["step"] = {
        "engine_step_ms": t["engine_step"] * 1e3, "floor_ms": t["floor"] * 1e3,
        "floor": f"{steps} × the compiled UNet call on the CFG pair (batch 2), back to back",
        "ratio_step_vs_floor": t["engine_step"] / t["floor"], "ratio_compiled_vs_floor": t["engine_compiled"] / t["floor"],
        "ratio_step_vs_compiled": t["engine_step"] / t["engine_compiled"],
        "rel_diff_vs_eager": d, "within_tolerance": d <= FP16_RTOL, "finite_fraction": finite_fraction(got.latents),
        "rel_diff_first_vs_later": rel_diff(first_step.latents, got.latents),
        "compile": got.record["compile"], "nfe": got.record["metrics"]["nfe"],
    }
    if b.device.type == "cuda":
        res["step"]["cuda_syncs_per_run"], res["step"]["cuda_sync_sites"] = syncs_of(b, lambda: engine(step))
    r = res["step"]
    print(f"  compile=step {r['engine_step_ms']:.1f} ms  floor ({steps} × compiled UNet) {r['floor_ms']:.1f} ms  "
          f"ratio {r['ratio_step_vs_floor']:.3f} (target ≤ 1.05; compile=true {r['ratio_compiled_vs_floor']:.3f})  "
          f"captured {r['compile']['steps_captured']}/{steps} steps  rel. diff vs eager {d:.2g}", flush=True)
    res["compile_stats"] = compiled.stats()
    for solver in b.args.compile_solvers:
        if b.budget.left() < b.args.reserve_s:
            b.note(f"(b) {solver} compiled vs eager skipped: budget")
            continue
        try:
            e_ov = overrides(b, solver, steps, 1, cfg, ["callback=[]"])
            c_ov = overrides(b, solver, steps, 1, cfg, ["callback=[]", "compile=true"])
            ref, got = engine(e_ov), engine(c_ov)  # warm-up (same shapes as above: no new compile)
            t = b.interleaved({"eager": lambda: engine(e_ov), "compiled": lambda: engine(c_ov)}, 2, b.args.reserve_s)
            te, tc = t["eager"], t["compiled"]
            d = rel_diff(got.latents, ref.latents)
            res[solver] = {"eager_ms": te * 1e3, "compiled_ms": tc * 1e3, "nfe": got.record["metrics"]["nfe"],
                           "rel_diff_vs_eager": d, "within_tolerance": d <= FP16_RTOL,
                           "finite_fraction": finite_fraction(got.latents)}
            print(f"  {solver}: eager {te * 1e3:.1f} ms  compiled {tc * 1e3:.1f} ms  NFE {res[solver]['nfe']:.0f}  "
                  f"rel. diff {d:.2g} ({'ok' if d <= FP16_RTOL else 'ABOVE'} tolerance {FP16_RTOL})", flush=True)
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            print(tb, flush=True)
            b.data["errors"][f"b.{solver}"] = tb
    res["compile_stats"] = compiled.stats()
    with contextlib.suppress(Exception):
        from torch._dynamo.utils import counters

        res["dynamo_frames"] = dict(counters["frames"])
        res["dynamo_unique_graphs"] = counters["stats"]["unique_graphs"]
    if b.device.type == "cuda":
        res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(b.device) / 2**30


def section_c(b: Bench, res: dict[str, Any]) -> None:
    from framework.models.bundled import Bundled

    n, steps = b.args.fid_samples, b.args.steps
    adapter = Bundled()
    engine = Engine(adapter)
    res.update(model="bundled", samples=n, steps=steps, solver="dpmpp_2m", cfg_scale=5.0, dtype="float32",
               callbacks="nan_guard (default)")
    runs = {}
    prompts = "[a red circle,a blue square,a green triangle,a yellow circle]"
    for bs in b.args.fid_batches:
        ov = overrides(b, "dpmpp_2m", steps, n, 5.0, [f"batch_size={bs}"], dtype="float32", prompts=prompts)
        runs[f"engine_batch{bs}"] = (lambda ov=ov: engine(ov))
    big = max(b.args.fid_batches)
    first = engine(overrides(b, "dpmpp_2m", steps, big, 5.0, dtype="float32"))
    x_vp = vp_start(first)

    def hand_all() -> None:
        for _ in range(n // big):
            hand(adapter.pipe, steps, x_vp, big, 5.0)

    runs[f"hand_batch{big}"] = hand_all
    for fn in runs.values():  # warm-up
        fn()
    t = b.interleaved(runs, 3, reserve_s=b.args.reserve_s)
    for k, v in t.items():
        samples = n if k.startswith("engine") else (n // big) * big
        res[k] = {"seconds": v, "images_per_s": samples / v}
        print(f"  {k}: {samples / v:.1f} images/s ({v:.2f} s for {samples})", flush=True)


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/gpu_engine")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-time cap; sections that would overrun are skipped")
    ap.add_argument("--reserve-s", type=float, default=None, help="budget kept back while repeating (default: 15 s, 0 in smoke)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny pipeline, few steps: checks the script in seconds")
    ap.add_argument("--sections", default="a,c,b", help="which sections, in this order (default a,c,b)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="float16 (GPU default), bfloat16, float32 (smoke)")
    ap.add_argument("--compile-backend", default=None, help="inductor (default); smoke uses eager (tracing only)")
    args = ap.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    smoke = args.smoke
    args.steps = args.steps or (2 if smoke else 20)
    args.reps = args.reps or (2 if smoke else 7)
    args.dtype = args.dtype or ("float32" if smoke else "float16")
    args.compile_backend = args.compile_backend or ("eager" if smoke else "inductor")
    args.reserve_s = args.reserve_s if args.reserve_s is not None else (0.0 if smoke else 15.0)
    args.batches = [1] if smoke else [1, 8]
    args.fid_samples, args.fid_batches = (4, [2, 4]) if smoke else (256, [64, 128])
    args.compile_solvers = ["heun", "dpmpp_2m", "unipc"]

    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        msg = f"missing packages: {', '.join(missing)} (unpack their wheels into a folder on PYTHONPATH; docs/environment.md)"
        print(msg, flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_engine.json").write_text(json.dumps({"errors": {"preflight": msg}}))
        return {"errors": {"preflight": msg}}

    import torch

    torch.backends.cudnn.benchmark = False
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    b = Bench(args, device)
    if device.type != "cuda" and not smoke:
        b.note("no CUDA device: the figures below are CPU figures, not the GPU benchmark")
    print(f"device {b.data['device']} | torch {torch.__version__} | diffusers {b.data['diffusers']} | dtype {args.dtype} | "
          f"budget {args.budget_s:.0f} s | sections {','.join(args.sections)}", flush=True)
    if smoke:
        torch.set_num_threads(1)

    state: dict[str, Any] = {}

    def shared() -> tuple[Any, Engine]:
        if "pipe" not in state:
            from framework.models.diffusers_sd import StableDiffusion

            t0 = time.monotonic()
            state["pipe"] = sd15_sized_pipeline(device, getattr(torch, args.dtype), smoke)
            state["engine"] = Engine(StableDiffusion(pipeline=state["pipe"]))
            b.data["build_pipeline_s"] = round(time.monotonic() - t0, 1)
        return state["pipe"], state["engine"]

    # (need, cap): a section starts only with `need` s of budget left; its repetitions stop after `cap` s
    need = {"a": (5, 60) if smoke else (40, 50), "b": (5, 60) if smoke else (280, 1e9), "c": (3, 60) if smoke else (15, 25)}
    for key in args.sections:
        if key == "a":
            b.section("a", "eager engine vs hand-written diffusers loop", *need["a"], lambda r: section_a(b, r, *shared()))
        elif key == "b":
            b.section("b", "compile=true vs the diffusers eager loop", *need["b"], lambda r: section_b(b, r, *shared()))
        elif key == "c":
            b.section("c", "images/s of batched FID generation, bundled model", *need["c"], lambda r: section_c(b, r))
        else:
            b.note(f"unknown section '{key}' ignored (a, b, c)")
    summary(b)
    b.save()
    print(f"\nwrote {Path(args.out) / 'gpu_engine.json'} ({b.data['wall_s']:.0f} s)", flush=True)
    return b.data


def summary(b: Bench) -> None:
    s = b.data["sections"]
    rows = []
    for batch in b.args.batches:
        r = s.get("a", {}).get(f"batch{batch}")
        if r:
            rows.append((f"(a) eager engine / hand loop, batch {batch}", f"{r['ratio']:.3f}", "≤ 1.02",
                         f"{r['engine_ms']:.1f} / {r['hand_ms']:.1f} ms, {r['overhead_us_per_step']:.0f} µs/step"))
    syncs = s.get("a", {}).get("cuda_syncs")
    if syncs:
        rows.append(("(a) CUDA syncs per step, engine / hand", f"{syncs['engine_per_step']:.2f}", "0",
                     f"hand {syncs['hand_per_step']:.2f}; per 20-step run {syncs['engine_per_run_20']} / {syncs['hand_per_run_20']}"))
    m = s.get("b", {}).get("main")
    if m:
        rows.append(("(b) compiled engine / hand eager, batch 1", f"{m['ratio_compiled_vs_hand_eager']:.3f}", "≤ 0.40",
                     f"{m['engine_compiled_ms']:.1f} / {m['hand_eager_ms']:.1f} ms, rel. diff {m['rel_diff_vs_eager']:.2g}"))
    r = s.get("b", {}).get("step")
    if r:
        rows.append(("(b) compile=step / floor (N × compiled UNet)", f"{r['ratio_step_vs_floor']:.3f}", "≤ 1.05",
                     f"{r['engine_step_ms']:.1f} / {r['floor_ms']:.1f} ms; compile=true / floor {r['ratio_compiled_vs_floor']:.3f}"))
    for solver in b.args.compile_solvers:
        r = s.get("b", {}).get(solver)
        if isinstance(r, dict) and "rel_diff_vs_eager" in r:
            rows.append((f"(b) {solver} compiled vs eager, rel. diff", f"{r['rel_diff_vs_eager']:.2g}", f"≤ {FP16_RTOL:g}",
                         f"{r['compiled_ms']:.1f} / {r['eager_ms']:.1f} ms"))
    for k, v in s.get("c", {}).items():
        if isinstance(v, dict) and "images_per_s" in v:
            rows.append((f"(c) {k}", f"{v['images_per_s']:.1f}/s", "", f"{v['seconds']:.2f} s"))
    if rows:
        print("\nsummary")
        for name, value, target, detail in rows:
            print(f"  {name:<44} {value:>9} {target:>7}  {detail}")
    if b.data["errors"]:
        print(f"  errors in: {', '.join(b.data['errors'])}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
