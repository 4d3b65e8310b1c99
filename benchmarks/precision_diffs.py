"""bfloat16/float16 images vs float32 for each family on the CPU, as tests/models/test_precision.py
runs them (4 Euler steps, CFG 5 except Flux, 2 samples, same seeds): max and mean |Δ| in [0, 1].

    python benchmarks/precision_diffs.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from framework.entry import api

    torch.set_num_threads(1)
    for model in ("tiny_random", "tiny_sdxl", "tiny_sd3", "tiny_flux", "bundled"):
        extra = ["guidance=[]"] if model == "tiny_flux" else []
        run = {dt: api.run([f"model={model}", f"dtype={dt}", "num_samples=2", "batch_size=2", "steps=4", "device=cpu",
                            *extra]).images.float() for dt in ("float32", "bfloat16", "float16")}
        cells = []
        for dt in ("bfloat16", "float16"):
            d = (run[dt] - run["float32"]).abs()
            cells.append(f"{dt} max {float(d.max()):.2g} mean {float(d.mean()):.2g}")
        print(f"{model}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
