"""Peak memory of loss guidance with and without VAE-decoder gradient checkpointing.

    python benchmarks/guidance_memory.py                         # bundled model, 128 px, batch 32
    python benchmarks/guidance_memory.py --batch 64 --size 64 --steps 2

Each configuration runs in its own subprocess (one sampling run, color_loss at every step), which
reports its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and, on a GPU,
``torch.cuda.max_memory_allocated``. The same run without loss guidance is the baseline: the
guidance's own memory is peak − baseline, and the ratio checkpointed/plain is printed for both the
whole peak and the guidance's share. ``--size`` sets the image size (model.height/width; the
bundled model is convolutional, so larger images only cost compute).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from framework.entry.api import run
overrides = json.loads(sys.argv[1])
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
run(overrides)
out = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if torch.cuda.is_available():
    out["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
print("RESULT " + json.dumps(out))
"""


def measure(overrides: list[str]) -> dict[str, float]:
    """Peak memory of one run in a fresh interpreter."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides)], cwd=root, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    base = [f"model={args.model}", f"model.height={args.size}", f"model.width={args.size}", f"steps={args.steps}",
            f"num_samples={args.batch}", f"batch_size={args.batch}", f"device={args.device}", "save_images=false",
            "callback=[]"]
    guided = ["guidance=[cfg,color_loss]", "guidance.color_loss.every=1"]
    configs = {
        "no loss guidance": base + ["guidance=[cfg]"],
        "color_loss": base + guided,
        "color_loss, checkpoint": base + guided + ["guidance.color_loss.checkpoint=true"],
    }
    results = {name: measure(o) for name, o in configs.items()}
    print(f"model={args.model}, {args.size}×{args.size} px, batch {args.batch}, {args.steps} steps, color_loss every step")
    keys = [k for k in ("rss_mib", "cuda_mib") if k in results["color_loss"]]
    for name, r in results.items():
        print(f"  {name:<24}" + "  ".join(f"{k} {r[k]:8.1f}" for k in keys))
    for k in keys:
        plain, ckpt, none = results["color_loss"][k], results["color_loss, checkpoint"][k], results["no loss guidance"][k]
        share = (ckpt - none) / (plain - none) if plain > none else float("nan")
        print(f"  {k}: checkpointed/plain peak = {ckpt / plain:.3f}; guidance's share (peak − baseline) "
              f"{plain - none:.1f} → {ckpt - none:.1f} MiB, ratio {share:.3f}")
    return results


if __name__ == "__main__":
    main()
