"""Modern sizes and precisions (issue 26, item 2): each model family in float32, bfloat16 and
float16 (``dtype=``: the denoiser, the text encoders and the VAE decode all in that dtype), eager
and optionally ``compile=true``, against the family's own diffusers pipeline, with the memory peak.

    python benchmarks/precision.py --preset smoke                    # CPU: the tiny families, seconds
    python benchmarks/precision.py --preset sdxl,sd3_medium,flux      # a GPU (random weights)

Presets (random weights, built from configs: no download):

- ``sdxl``: SDXL-base's UNet (320/640/1280 channels, 1/2/10 transformer layers, 2048-wide cross
  attention, text-time embedding) and SD VAE decoder at 1024² (128² latents);
- ``sd3_medium``: SD3-medium's MMDiT (24 layers × 24 heads × 64, patch 2, 4096-wide joint
  attention) and 16-channel VAE at 1024², without T5 (the pipeline's zero T5 states, 256 tokens);
- ``flux``: FLUX.1-dev's transformer (19 double + 38 single blocks × 24 heads × 128, guidance
  embedding) and 16-channel VAE at 1024²; ``--depth 0.25`` keeps a quarter of the blocks when
  memory demands (the record says which);
- ``smoke``: the tiny SD, SDXL, SD3 and Flux pipelines of framework.models (64², CPU).

Text encoders are 2-layer random CLIP (and T5 for Flux) at the published output widths (their cost
is small against the denoiser; they run in the same dtype).

Per preset and dtype: the engine (``solver=euler``, CFG 5 — Flux: guidance-distilled, no CFG —
``--steps`` steps, batch ``--batch``, decode included) and the pipeline's own ``__call__`` with its
Euler scheduler, the same steps and guidance, timed interleaved (medians); ratio = engine / pipeline.
Memory peak: ``torch.cuda.max_memory_allocated`` of each call on CUDA; on the CPU it is not measured
(torch keeps no allocator peak there; the process's ``ru_maxrss`` is printed as the lifetime peak
only). Images of bfloat16/float16 are compared with float32 from the same seed (max and mean |Δ|).
``--out`` receives ``precision.json``, rewritten after each preset.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: model= override for composing each family's defaults (schedule, guidance); the adapter object replaces it.
FAMILY_MODEL = {"sd": "tiny_random", "sdxl": "tiny_sdxl", "sd3": "tiny_sd3", "flux": "tiny_flux"}


def _vae(latent_channels: int, scaling: float, shift: float | None, quant: bool) -> Any:
    from diffusers import AutoencoderKL

    extra = {} if shift is None else {"shift_factor": shift}
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=scaling,
                         use_quant_conv=quant, use_post_quant_conv=quant, **extra).eval()


def _clip(tokenizer: Any, width: int, projection: bool) -> Any:
    from framework.models.tiny_families import clip_text_model

    return clip_text_model(tokenizer, dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                           num_attention_heads=8), projection)


def build(preset: str, depth: float) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """(name, family, pipeline, adapter options) of a preset (weights in float32, on the CPU)."""
    import torch

    from framework.models import tiny_families as tf

    if preset == "smoke":
        from framework.models.tiny import TinyRandom

        return [("tiny_sd", "sd", TinyRandom().pipe, {}), ("tiny_sdxl", "sdxl", tf.tiny_pipeline("sdxl"), {}),
                ("tiny_sd3", "sd3", tf.tiny_pipeline("sd3", with_t5=False), {"use_t5": False}),
                ("tiny_flux", "flux", tf.tiny_pipeline("flux"), {"height": 64, "width": 64})]
    torch.manual_seed(0)
    if preset == "sdxl":
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

        layers = tuple(max(1, round(n * depth)) for n in (1, 2, 10))
        tok, tok2 = tf.clip_tokenizer(), tf.clip_tokenizer()
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=layers, attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816).eval()
        pipe = StableDiffusionXLPipeline(
            vae=_vae(4, 0.13025, None, True), text_encoder=_clip(tok, 768, False), text_encoder_2=_clip(tok2, 1280, True),
            tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=EulerDiscreteScheduler(**tf.SDXL_SCHEDULER))
        return [(f"sdxl(transformer layers {layers})", "sdxl", pipe, {})]
    if preset == "sd3_medium":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        n = max(1, round(24 * depth))
        tok, tok2 = tf.clip_tokenizer(), tf.clip_tokenizer()
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=n, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=192).eval()
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**tf.SD3_SCHEDULER),
            vae=_vae(16, 1.5305, 0.0609, False), text_encoder=_clip(tok, 768, True), tokenizer=tok,
            text_encoder_2=_clip(tok2, 1280, True), tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None)
        return [(f"sd3_medium({n} layers)", "sd3", pipe, {"use_t5": False})]
    if preset == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import T5Config, T5EncoderModel

        double, single = max(1, round(19 * depth)), max(1, round(38 * depth))
        tok, tok2 = tf.clip_tokenizer(), tf.t5_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id,
                                     decoder_start_token_id=tok2.pad_token_id, d_model=4096, d_kv=64, d_ff=1024,
                                     num_layers=2, num_heads=64, feed_forward_proj="gated-gelu")).eval()
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56)).eval()
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**tf.FLUX_SCHEDULER),
                            vae=_vae(16, 0.3611, 0.1159, False), text_encoder=_clip(tok, 768, False), tokenizer=tok,
                            text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)
        return [(f"flux({double}+{single} blocks)", "flux", pipe, {"height": 1024, "width": 1024,
                                                                    "max_sequence_length": 512})]
    raise SystemExit(f"unknown preset {preset!r}: smoke, sdxl, sd3_medium, flux")


def adapter_for(family: str, pipe: Any, options: dict[str, Any]) -> Any:
    from framework.models.diffusers_sd import StableDiffusion
    from framework.models.flux import Flux
    from framework.models.sd3 import StableDiffusion3
    from framework.models.sdxl import StableDiffusionXL

    cls = {"sd": StableDiffusion, "sdxl": StableDiffusionXL, "sd3": StableDiffusion3, "flux": Flux}[family]
    return cls(pipeline=pipe, **options)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: Any, fn: Any) -> tuple[float, Any, float | None]:
    """Seconds, result and peak allocated GiB (CUDA; None on the CPU) of one call."""
    import torch

    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, out, peak


def diff(a: Any, b: Any) -> dict[str, float]:
    a, b = a.double().cpu(), b.double().cpu()
    return {"max_abs": float((a - b).abs().max()), "mean_abs": float((a - b).abs().mean())}


def run_model(args: argparse.Namespace, device: Any, name: str, family: str, pipe: Any, options: dict[str, Any],
              res: dict[str, Any]) -> None:
    import torch

    from framework.entry.compose import compose
    from framework.runs.execute import execute

    cfg_scale = 5.0
    guidance = "guidance=[]" if family == "flux" else "guidance=[cfg]"
    size = 64 if args.preset_name == "smoke" else 1024
    ref_images = None
    pipe.set_progress_bar_config(disable=True)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        pipe.to(device=device, dtype=dtype)
        adapter = adapter_for(family, pipe, options)
        ov = [f"model={FAMILY_MODEL[family]}", "solver=euler", guidance, f"steps={args.steps}",
              f"num_samples={args.batch}", f"batch_size={args.batch}", f"cfg_scale={cfg_scale}",
              "prompts=[a red circle]", f"device={device}", f"dtype={dtype_name}", "save_images=false",
              "callback=[]", f"compile={str(args.compile).lower()}"]
        cfg, choices = compose(ov)

        def engine() -> Any:
            return execute(cfg, choices, model=adapter).images

        def hand() -> Any:
            kw: dict[str, Any] = dict(num_inference_steps=args.steps, output_type="pt", height=size, width=size,
                                      generator=torch.Generator("cpu").manual_seed(0))
            kw["guidance_scale"] = 3.5 if family == "flux" else cfg_scale
            vae_dtype = pipe.vae.dtype  # the adapter keeps an upcast VAE (SDXL) in float32; the pipeline decides itself
            pipe.vae.to(dtype)
            try:
                with torch.no_grad():
                    return pipe(["a red circle"] * args.batch, **kw).images
            finally:
                pipe.vae.to(vae_dtype)

        row: dict[str, Any] = {}
        res[dtype_name] = row
        first_s, images, _ = timed(device, engine)  # warm-up (and compile, when asked)
        row["first_engine_s"] = first_s
        timed(device, hand)
        e_times, h_times, e_peaks, h_peaks = [], [], [], []
        for _ in range(args.reps):
            s, images, p = timed(device, engine)
            e_times.append(s)
            e_peaks.append(p)
            s, _, p = timed(device, hand)
            h_times.append(s)
            h_peaks.append(p)
        e, h = statistics.median(e_times), statistics.median(h_times)
        row.update(engine_s=e, pipeline_s=h, engine_over_pipeline=e / h, engine_all_s=e_times, pipeline_all_s=h_times,
                   peak_gib_engine=max(e_peaks) if e_peaks[0] is not None else None,
                   peak_gib_pipeline=max(h_peaks) if h_peaks[0] is not None else None,
                   finite=bool(torch.isfinite(images).all()))
        if ref_images is None and dtype_name == "float32":
            ref_images = images.float()
        elif ref_images is not None:
            row["images_vs_float32"] = diff(images.float(), ref_images)
        peak = "not measured (CPU)" if row["peak_gib_engine"] is None else \
            f"{row['peak_gib_engine']:.2f} / {row['peak_gib_pipeline']:.2f} GiB"
        vs = row.get("images_vs_float32")
        print(f"  {name} {dtype_name}: engine {e:.3f} s, pipeline {h:.3f} s, ratio {e / h:.3f}; peak engine/pipeline "
              f"{peak}" + (f"; vs float32 max {vs['max_abs']:.3g} mean {vs['mean_abs']:.3g}" if vs else ""), flush=True)
    pipe.to(dtype=torch.float32)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="comma-separated: smoke, sdxl, sd3_medium, flux (CPU default: smoke)")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--steps", type=int, default=None, help="default 10 (smoke: 2)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=None, help="default 3 (smoke: 1)")
    ap.add_argument("--depth", type=float, default=1.0, help="fraction of the transformer layers kept (memory)")
    ap.add_argument("--compile", action="store_true", help="compile=true on the engine side (the pipeline stays eager)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from framework.core.engine import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    presets = (args.preset or ("sdxl,sd3_medium,flux" if device.type == "cuda" else "smoke")).split(",")
    if device.type != "cuda" and presets != ["smoke"]:
        raise SystemExit("the full-size presets need a GPU: use --preset smoke on the CPU")
    args.dtypes = args.dtypes.split(",")
    data: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "args": vars(args), "presets": {}, "errors": {},
        "memory": "torch.cuda.max_memory_allocated per call" if device.type == "cuda" else
                  "not measured on the CPU (no allocator peak); ru_maxrss_mib below is the process's lifetime peak",
    }
    print(f"device: {data['device']}  load: {os.getloadavg()}", flush=True)
    for preset in presets:
        args.preset_name = preset
        smoke = preset == "smoke"
        args.steps = args.steps or (2 if smoke else 10)
        args.reps = args.reps or (1 if smoke else 3)
        data["presets"][preset] = {}
        try:
            for name, family, pipe, options in build(preset, args.depth):
                res: dict[str, Any] = {"family": family}
                data["presets"][preset][name] = res
                run_model(args, device, name, family, pipe, options, res)
        except Exception:  # noqa: BLE001 - the other presets still run
            tb = traceback.format_exc()
            print(tb, flush=True)
            data["errors"][preset] = tb
        data["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        data["load_after"] = os.getloadavg()
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "precision.json").write_text(json.dumps(data, indent=1, default=str))
    return data


if __name__ == "__main__":
    main()
