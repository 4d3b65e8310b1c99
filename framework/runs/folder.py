"""The run folder: what a run writes, batch by batch, and what a rerun reads back.

```
<folder>/samples/{k:06d}.png             global sample k (failed samples have none)
<folder>/batches/{first:06d}.safetensors  per batch: x_T and latents; metadata key ``samplerlab``: a
                                          JSON object with the run key, indices, failures and NFE
<folder>/grid.png                        all samples tiled
<folder>/record.json                     written last: a folder with a record.json is finished
```
Every file is written atomically (temporary file, then rename). A batch's latents file is its
"done" mark, written after its PNGs, so a batch interrupted half-way is redone whole.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from framework.core.files import atomic_write_bytes, atomic_write_json
from framework.core.run import Result
from framework.core.state import Schedule
from framework.runs.images import grid, png_bytes

BATCH_DIR = "batches"


def sample_name(k: int) -> str:
    """Where global sample ``k``'s image lives in a run folder."""
    return f"samples/{k:06d}.png"


@dataclass
class SavedBatch:
    """A batch read back from ``batches/{first:06d}.safetensors``."""

    x_T: torch.Tensor
    latents: torch.Tensor
    failures: dict[int, str]
    nfe: int
    unet_calls: int


def _batch_info(f: Any) -> dict[str, Any]:
    return json.loads((f.metadata() or {}).get("samplerlab", "{}"))


class RunFolder:
    """The folder of one run, known by its run key: batches saved and read back, the record."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key

    def batch_path(self, indices: list[int]) -> Path:
        return self.path / BATCH_DIR / f"{indices[0]:06d}.safetensors"

    def clean(self) -> None:
        """Delete the temporary files a killed process left behind (atomic writes never leave others)."""
        for sub in (self.path, self.path / "samples", self.path / BATCH_DIR):
            for tmp in sub.glob(".*.tmp") if sub.is_dir() else ():
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def save_samples(self, indices: list[int], images: torch.Tensor, failures: dict[int, str],
                     only_missing: bool = False) -> None:
        """Write samples/{k:06d}.png for the finite samples of a batch (``only_missing``: keep existing files)."""
        for k, img in zip(indices, images):
            path = self.path / sample_name(k)
            if k not in failures and not (only_missing and path.exists()):
                atomic_write_bytes(path, png_bytes(img))

    def save_batch(self, indices: list[int], x_T: torch.Tensor, latents: torch.Tensor, images: torch.Tensor | None,
                   failures: dict[int, str], nfe: int, unet_calls: int) -> None:
        """Save one finished batch: the PNGs of its finite samples, then its latents file."""
        from safetensors.torch import save as st_save

        if images is not None:
            self.save_samples(indices, images, failures)
        info = {"run_key": self.key, "indices": indices, "nfe": nfe, "unet_calls": unet_calls,
                "failures": {str(k): why for k, why in failures.items()}}
        meta = {"samplerlab": json.dumps(info, sort_keys=True)}  # one key: safetensors orders keys at random
        tensors = {"x_T": x_T.detach().cpu().contiguous(), "latents": latents.detach().cpu().contiguous()}
        atomic_write_bytes(self.batch_path(indices), st_save(tensors, metadata=meta))

    def load_batch(self, indices: list[int]) -> SavedBatch | None:
        """The saved batch of ``indices`` made under this run key, or None (absent, other run, damaged)."""
        from safetensors import safe_open

        path = self.batch_path(indices)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                info = _batch_info(f)
                if info.get("run_key") != self.key or info.get("indices") != indices:
                    return None
                x_T, latents = f.get_tensor("x_T"), f.get_tensor("latents")
            failures = {int(k): why for k, why in info["failures"].items()}
            return SavedBatch(x_T, latents, failures, int(info["nfe"]), int(info["unet_calls"]))
        except Exception as e:  # damaged: make the batch again
            warnings.warn(f"ignoring unreadable {path} ({type(e).__name__}: {e}); the batch is made again", stacklevel=2)
            return None

    def save(self, result: Result, save_images: bool = True) -> None:
        """Finish the folder: grid.png for image models, then record.json (the samples' PNGs were
        saved per batch)."""
        if save_images and result.images is not None:
            indices = result.indices or list(range(len(result.images)))
            failed = set(result.failed)
            atomic_write_bytes(self.path / "grid.png", png_bytes(grid(result.images)))
            result.record["images"] = {"samples": [sample_name(k) for k in indices if k not in failed], "grid": "grid.png"}
        atomic_write_json(self.path / "record.json", result.record)

    def finished(self) -> Result | None:
        """The finished run here (record.json with this run key and all its batches), or None.

        Its images are read back from the PNGs (8-bit); failed samples, which have none, are NaN.
        """
        from safetensors import safe_open

        path = self.path / "record.json"
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if rec.get("run_key") != self.key:
            warnings.warn(f"{self.path} holds another run (run key {rec.get('run_key')}, not {self.key}): "
                          "its files are overwritten", stacklevel=2)
            return None
        shard = rec.get("shard") or {"start": 0, "stop": rec.get("num_samples", 0)}
        indices = list(range(shard["start"], shard["stop"]))
        saved, covered = [], []
        for p in sorted((self.path / BATCH_DIR).glob("*.safetensors")):
            with contextlib.suppress(Exception), safe_open(str(p), framework="pt") as f:
                ks = _batch_info(f).get("indices", [])
                b = self.load_batch(ks)
                if b is not None:
                    saved.append(b)
                    covered += ks
        if covered != indices:
            return None
        images = None
        if rec.get("images"):
            images = self._read_images(indices, set(rec.get("failed_samples", [])))
            if images is False:  # a PNG was removed or damaged: the run is made again (its batches are read back)
                return None
        schedule = Schedule(tuple(rec["sigmas"]), None if rec["timesteps"] is None else tuple(rec["timesteps"]),
                            rec.get("init_noise_scale"))
        return Result(
            x_T=torch.cat([b.x_T for b in saved]), latents=torch.cat([b.latents for b in saved]), images=images,
            record=rec, schedule=schedule, failed=list(rec.get("failed_samples", [])), indices=indices,
            resumed=indices, skipped=True, failures={int(k): v for k, v in rec.get("failures", {}).items()},
        )

    def _read_images(self, indices: list[int], failed: set[int]) -> torch.Tensor | None | bool:
        import numpy as np
        from PIL import Image

        try:
            pics = {k: torch.from_numpy(np.array(Image.open(self.path / sample_name(k)).convert("RGB"))).permute(2, 0, 1)
                    for k in indices if k not in failed}
        except OSError:
            return False
        if not pics:
            return None
        like = next(iter(pics.values()))
        nan = torch.full(like.shape, float("nan"))
        return torch.stack([pics[k].float() / 255 if k in pics else nan for k in indices])
