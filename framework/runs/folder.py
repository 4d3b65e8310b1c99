"""The run folder: what a run writes, batch by batch, and what a rerun reads back.

```
<folder>/samples/{k:06d}.png             global sample k (failed samples have none)
<folder>/batches/{first:06d}.safetensors  per batch: x_T and latents; metadata key ``samplerlab``: a
                                          JSON object with the run key, indices, failures, NFE, the
                                          digests of the batch's PNGs and its own digest
<folder>/grid.png                        all samples tiled
<folder>/record.json                     written last: a folder with a record.json is finished; it
                                          lists the digest of every file the run wrote (``files``)
<folder>/.lock                           while a process works in the folder
```
Every file is written atomically (temporary file, then rename). A batch's latents file is its
"done" mark, written after its PNGs, so a batch interrupted half-way is redone whole.

- **One process at a time** (:meth:`RunFolder.locked`): an exclusive ``flock`` on ``.lock``, held
  from the first look at the folder to the record. A second process making the same run (same run
  key) waits for the first, then finds its work done; one making another run is refused with one
  line. Temporaries are deleted only under the lock, so never while another process writes them.
- **One run's files** (:meth:`RunFolder.prepare`): before its first batch a run removes what
  another run (another run key, or ``resume=false``) left: samples, batches, grid, record, and the
  files that run's record lists.
- **Integrity**: each digest is checked when a file is read back (resume, a finished run,
  ``samplerlab-score``); a file that does not match is made again with a one-line warning.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from framework.core.errors import ConfigError, SamplerlabError
from framework.core.files import atomic_write_bytes, atomic_write_json
from framework.core.run import Result
from framework.core.state import Schedule
from framework.runs.images import grid, png_bytes
from framework.runs.records import digest, file_digest, read_record, seal

BATCH_DIR = "batches"
LOCK = ".lock"
RECORD = "record.json"
GRID = "grid.png"
_SAMPLE = re.compile(r"^\d{6,}\.png$")
_BATCH = re.compile(r"^\d{6,}\.safetensors$")
#: Batch files of this format carry digests (of themselves and of their PNGs); older ones do not.
BATCH_FORMAT = 2


def sample_name(k: int) -> str:
    """Where global sample ``k``'s image lives in a run folder."""
    return f"samples/{k:06d}.png"


class FolderInUse(SamplerlabError):
    """Another process is making another run in this run folder."""


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


@dataclass
class SavedBatch:
    """A batch read back from ``batches/{first:06d}.safetensors``."""

    x_T: torch.Tensor
    latents: torch.Tensor
    failures: dict[int, str]
    nfe: int
    unet_calls: int
    indices: list[int]
    samples: dict[int, str] | None = None  # digest of each PNG written with it (None: an older file)
    network_inputs: int | None = None  # network inputs per sample (None: a file written before issue 23)


def _batch_info(f: Any) -> dict[str, Any]:
    return json.loads((f.metadata() or {}).get("samplerlab", "{}"))


def _batch_digest(info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """The digest of a batch: its metadata (without the digest) and its tensors' dtypes, shapes, bytes."""
    import hashlib

    h = hashlib.sha256(json.dumps({k: v for k, v in info.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _remove(path: Path) -> None:
    """Remove a file, or a folder standing where a file should be."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _decodes(path: Path) -> bool:
    """Whether a PNG decodes whole (files written before PNGs carried digests)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


class RunFolder:
    """The folder of one run, known by its run key: locked, cleaned of other runs' files, batches
    saved and read back (checked against their digests), the record."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key
        self.digests: dict[str, str] = {}  # files this run wrote or checked: path in the folder → digest
        self._lock_fd: int | None = None
        self._made = False
        self._before: dict[str, tuple[int, int, int]] = {}

    def batch_path(self, indices: list[int]) -> Path:
        return self.path / BATCH_DIR / f"{indices[0]:06d}.safetensors"

    # --- one process at a time ------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[RunFolder]:
        """Hold the folder's lock for the duration (see the module docstring)."""
        self._acquire()
        try:
            yield self
        finally:
            self._release()

    def _acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: docs/reliability.md says so
            return
        lock = self.path / LOCK
        while True:
            try:
                self._made = self._made or not self.path.exists()
                self.path.mkdir(parents=True, exist_ok=True)
                if lock.is_dir() and not lock.is_symlink():  # never a lock: something in its place
                    _remove(lock)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConfigError(f"cannot write the run folder {self.path} ({e.strerror}): "
                                  "choose a writable output folder") from e
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = self._holder(fd)
                    who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
                    if holder.get("run_key") != self.key:
                        raise FolderInUse(
                            f"{self.path} is in use by {who}, making another run (run key {holder.get('run_key', '?')}): "
                            "wait for it to finish, or give this run another name= or output folder") from None
                    print(f"samplerlab: {self.path} is in use by {who}, making the same run: waiting for it",
                          file=sys.stderr)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if self._is_current(fd, lock):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder removed that lock file as it finished: lock the current one
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_key": self.key}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._lock_fd = fd

    @staticmethod
    def _holder(fd: int) -> dict[str, Any]:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    @staticmethod
    def _is_current(fd: int, lock: Path) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(lock)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path / LOCK)  # still holding it: a waiter sees the file is gone and retries
        os.close(fd)
        if self._made:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if the run left nothing (it failed before writing)

    # --- one run's files ----------------------------------------------------------------------
    def prepare(self, resume: bool, save_images: bool = True) -> None:
        """Make the folder this run's alone, before its first batch: delete temporaries, the record
        and grid (rewritten at the end), the files an earlier run's record lists, and every batch
        file and PNG that is not this run's (all of them without ``resume``)."""
        old = self._old_record()
        for sub in (self.path, self.path / "samples", self.path / BATCH_DIR):
            for tmp in sub.glob(".*.tmp") if sub.is_dir() else ():
                _remove(tmp)
        for rel in (old or {}).get("files", {}):
            if "/" not in rel and rel not in (RECORD, GRID) and not rel.startswith("."):
                _remove(self.path / rel)  # files plugins wrote (previews): made again, or gone with their run
        for rel in (RECORD, GRID):
            if (self.path / rel).exists() or (self.path / rel).is_symlink():
                _remove(self.path / rel)
        for sub in ("samples", BATCH_DIR):
            if (self.path / sub).exists() and not (self.path / sub).is_dir():
                _remove(self.path / sub)
        keep: set[int] = set()
        others = 0
        for p in sorted((self.path / BATCH_DIR).iterdir()) if (self.path / BATCH_DIR).is_dir() else ():
            if not _BATCH.match(p.name):
                continue
            ks, damage = self._own_batch(p) if resume else (None, None)
            if damage is not None:
                _warn(f"{BATCH_DIR}/{p.name} in {self.path} is damaged ({damage}): its batch is made again")
            others += ks is None and damage is None
            if ks is None:
                _remove(p)
            else:
                keep.update(ks)
        for p in sorted((self.path / "samples").iterdir()) if (self.path / "samples").is_dir() else ():
            if _SAMPLE.match(p.name) and (int(p.name[:-4]) not in keep or not save_images or not p.is_file()):
                _remove(p)
        if others and resume:
            _warn(f"{self.path} held {others} batch file(s) of another run: removed with their samples")
        self._before = self._top_level_files()

    def _old_record(self) -> dict[str, Any] | None:
        rec, problem = read_record(self.path / RECORD)
        return rec if problem is None else None

    def _own_batch(self, path: Path) -> tuple[list[int] | None, str | None]:
        """(indices, None) for a batch file saved under this run key; (None, None) for another
        run's; (None, why) for a damaged one. Its content is checked when it is read back."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                info = _batch_info(f)
            ks = info.get("indices")
            if not isinstance(ks, list) or not ks or not all(isinstance(k, int) for k in ks):
                raise ValueError("no indices")
        except Exception as e:
            return None, (str(e).splitlines()[0] if str(e) else type(e).__name__)
        return (ks if info.get("run_key") == self.key else None), None

    def _top_level_files(self) -> dict[str, tuple[int, int, int]]:
        out = {}
        for p in self.path.iterdir() if self.path.is_dir() else ():
            if p.name.startswith(".") or p.name in (RECORD, GRID) or p.suffix == ".log" or not p.is_file():
                continue
            st = p.stat()
            out[p.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return out

    # --- batches ------------------------------------------------------------------------------
    def save_samples(self, indices: list[int], images: torch.Tensor, failures: dict[int, str]) -> dict[int, str]:
        """Write samples/{k:06d}.png for the finite samples of a batch; returns their digests."""
        out = {}
        for k, img in zip(indices, images):
            if k not in failures:
                data = png_bytes(img)
                atomic_write_bytes(self.path / sample_name(k), data)
                out[k] = self.digests[sample_name(k)] = digest(data)
        return out

    def save_batch(self, indices: list[int], x_T: torch.Tensor, latents: torch.Tensor, images: torch.Tensor | None,
                   failures: dict[int, str], nfe: int, unet_calls: int, samples: dict[int, str] | None = None,
                   network_inputs: int | None = None) -> None:
        """Save one finished batch: the PNGs of its finite samples, then its latents file (which
        carries the PNGs' digests, or ``samples`` when they are already on disk)."""
        from safetensors.torch import save as st_save

        if images is not None:
            samples = self.save_samples(indices, images, failures)
        info = {"run_key": self.key, "indices": indices, "nfe": nfe, "unet_calls": unet_calls, "format": BATCH_FORMAT,
                "failures": {str(k): why for k, why in failures.items()},
                "samples": {str(k): d for k, d in sorted((samples or {}).items())}}
        if network_inputs is not None:
            info["network_inputs"] = network_inputs
        tensors = {"x_T": x_T.detach().cpu().contiguous(), "latents": latents.detach().cpu().contiguous()}
        info["sha256"] = _batch_digest(info, tensors)
        meta = {"samplerlab": json.dumps(info, sort_keys=True)}  # one key: safetensors orders keys at random
        data = st_save(tensors, metadata=meta)
        path = self.batch_path(indices)
        atomic_write_bytes(path, data)
        self.digests[str(path.relative_to(self.path))] = digest(data)

    def load_batch(self, indices: list[int], shape: tuple[int, ...] | None = None) -> SavedBatch | None:
        """The saved batch of ``indices`` made under this run key, or None (absent, another run's,
        or damaged: then with a warning). ``shape`` is one sample's latent shape, when known."""
        path = self.batch_path(indices)
        if not path.exists():
            return None
        saved = self._read_batch(path, indices, shape)
        if saved is not None:
            self.digests[str(path.relative_to(self.path))] = file_digest(path) or ""
        return saved

    def _read_batch(self, path: Path, indices: list[int] | None, shape: tuple[int, ...] | None) -> SavedBatch | None:
        from safetensors import safe_open

        rel = str(path.relative_to(self.path))
        try:
            with safe_open(str(path), framework="pt") as f:
                info = _batch_info(f)
                if info.get("run_key") != self.key or (indices is not None and info.get("indices") != indices):
                    return None
                tensors = {"x_T": f.get_tensor("x_T"), "latents": f.get_tensor("latents")}
            ks = info["indices"]
            if "sha256" in info or "format" in info:
                if info.get("sha256") != _batch_digest(info, tensors):
                    raise ValueError("its checksum does not match its content")
            n = len(ks)
            want = tensors["x_T"].shape[1:] if shape is None else torch.Size(shape)
            for name, t in tensors.items():
                if t.shape != (n, *want):
                    raise ValueError(f"{name} has shape {list(t.shape)}, expected {[n, *want]}")
            failures = {int(k): str(why) for k, why in info["failures"].items()}
            if not set(failures) <= set(ks):
                raise ValueError("its failures name samples it does not hold")
            samples = {int(k): str(d) for k, d in info["samples"].items()} if "samples" in info else None
            inputs = int(info["network_inputs"]) if "network_inputs" in info else None
            return SavedBatch(tensors["x_T"], tensors["latents"], failures, int(info["nfe"]), int(info["unet_calls"]),
                              list(ks), samples, inputs)
        except Exception as e:  # damaged: make the batch again
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            _warn(f"{rel} in {self.path} is damaged ({why}): its batch is made again")
            _remove(path)
            return None

    def restore_samples(self, saved: SavedBatch, images: torch.Tensor) -> None:
        """For a batch read back: check each PNG against its digest and write again (with a warning)
        those missing or damaged; the batch file then records the new digests."""
        digests: dict[int, str] = {}
        for k, img in zip(saved.indices, images):
            if k in saved.failures:
                continue
            rel, path = sample_name(k), self.path / sample_name(k)
            want = None if saved.samples is None else saved.samples.get(k)
            have = file_digest(path) if path.is_file() else None
            if have is not None and (have == want if want is not None else _decodes(path)):
                digests[k] = self.digests[rel] = have
                continue
            state = "is missing" if not (path.exists() or path.is_symlink()) else (
                "does not match its checksum" if want is not None else "is unreadable")
            _warn(f"{rel} in {self.path} {state}: written again from the saved latents")
            if path.is_dir():
                _remove(path)
            data = png_bytes(img)
            atomic_write_bytes(path, data)
            digests[k] = self.digests[rel] = digest(data)
        if digests != (saved.samples or {}):
            self.save_batch(saved.indices, saved.x_T, saved.latents, None, saved.failures, saved.nfe, saved.unet_calls,
                            samples=digests, network_inputs=saved.network_inputs)

    # --- the record ---------------------------------------------------------------------------
    def save(self, result: Result, save_images: bool = True) -> None:
        """Finish the folder: grid.png for image models, then record.json with the digest of every
        file the run wrote (the samples' PNGs and batch files were saved per batch)."""
        failed = set(result.failed)
        indices = result.indices or list(range(len(result.latents)))
        files = {}
        if save_images and result.images is not None:
            data = png_bytes(grid(result.images))
            atomic_write_bytes(self.path / GRID, data)
            result.record["images"] = {"samples": [sample_name(k) for k in indices if k not in failed], "grid": GRID}
            files[GRID] = digest(data)
            for rel in result.record["images"]["samples"]:
                files[rel] = self.digests.get(rel) or file_digest(self.path / rel) or ""
        files.update({rel: d for rel, d in self.digests.items() if rel.startswith(BATCH_DIR + "/")})
        for name, stat in self._top_level_files().items():  # what plugins wrote here (previews)
            if self._before.get(name) != stat:
                files[name] = file_digest(self.path / name) or ""
        result.record["files"] = dict(sorted(files.items()))
        atomic_write_json(self.path / RECORD, seal(result.record))

    def finished(self) -> Result | None:
        """The finished run here (a sound record.json with this run key, and every file it lists
        matching its digest), or None: then with a one-line warning when something is damaged.

        Its images are read back from the PNGs (8-bit); failed samples, which have none, are NaN.
        """
        path = self.path / RECORD
        if not (path.exists() or path.is_symlink()):
            return None
        rec, problem = read_record(path)
        if problem is not None:
            _warn(f"{RECORD} in {self.path} is damaged ({problem}): the run is finished again from its saved batches")
            return None
        if rec["run_key"] != self.key:
            _warn(f"{self.path} holds another run (run key {rec['run_key']}, not {self.key}): its files are replaced")
            return None
        try:
            return self._read_finished(rec)
        except Exception as e:  # a record that passed its checks but does not fit this code: make it again
            _warn(f"{RECORD} in {self.path} cannot be read back ({type(e).__name__}: {e}): the run is finished again")
            return None

    def _read_finished(self, rec: dict[str, Any]) -> Result | None:
        shard = rec.get("shard") or {"start": 0, "stop": rec["num_samples"]}
        indices = list(range(shard["start"], shard["stop"]))
        files = rec.get("files")
        if files is not None:  # schema 2: every file the run wrote, by digest
            for rel, want in files.items():
                if file_digest(self.path / rel) != want:
                    _warn(f"{rel} in {self.path} is missing or does not match its checksum: "
                          "the run is finished again from its saved batches")
                    return None
            batch_files = [self.path / rel for rel in files if rel.startswith(BATCH_DIR + "/")]
        else:  # schema 1: the batch files present
            batch_files = sorted((self.path / BATCH_DIR).glob("*.safetensors"))
        saved = [b for b in (self._read_batch(p, None, None) for p in batch_files) if b is not None]
        saved.sort(key=lambda b: b.indices[0])
        if [k for b in saved for k in b.indices] != indices:
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
            pics = {}
            for k in indices:
                if k not in failed:
                    with Image.open(self.path / sample_name(k)) as im:
                        pics[k] = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        except Exception:
            return False
        if not pics:
            return None
        like = next(iter(pics.values()))
        nan = torch.full(like.shape, float("nan"))
        return torch.stack([pics[k].float() / 255 if k in pics else nan for k in indices])
