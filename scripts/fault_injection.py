"""Fault injection for run folders: kill -9 at random points across a sweep, concurrent writers on
one folder, random damage to the files runs wrote; then the same commands again, and a check that
nothing was lost or is silently wrong.

    python scripts/fault_injection.py --trials 50            # the full run (about 40 s a trial on 2 cores)
    python scripts/fault_injection.py --smoke                # CI: one short trial
    python scripts/fault_injection.py --trials 5 --keep DIR  # keep the trial folders for a look

Every process is a real ``samplerlab`` (one intra-op thread each). A reference sweep made once,
uninterrupted, gives the expected files. Each trial, from a seeded random plan, in a fresh folder:

1. *kill*: start the sweep ``-m steps=1,2 name=fi`` and kill -9 it after a random delay, 0-2 times;
2. *concurrent writers*: start two processes at once on one ``name=single`` folder, with the same
   config or two different ones (and sometimes the sweep twice); the folder must then hold exactly
   one config's finished run (the reference's files, nothing of the other) or, if a process was
   refused, the other's;
3. *damage*: 1-3 random files of the run folders get one of: truncated, a flipped byte (anywhere,
   or inside a batch file's tensor data), deleted, ``[]``, a JSON field removed, replaced by a
   directory, a wrong-shape batch file under the same run key, garbage;
4. *repair*: the same commands again (the first attempt sometimes killed too).

A trial fails ("lost or silently wrong") when any of these does not hold at its end: every process
ended with 0, -9 (killed by us) or 2 with the one-line "in use" refusal, and no traceback; every
run folder holds a sound record whose files all match their digests, byte-identical PNGs and grid
and identical latents to the reference, no file that its record does not list (besides Hydra's),
no temporary or lock file; a rerun (in this process) finds every run finished; ``samplerlab-score``
reads every listed sample. ``--smoke``: one trial of 2 samples per run, one kill, two different
writers, two damaged files of the sweep, one repair. Prints one line per trial and the count of failed trials (target 0).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HYDRA_FILES = (".hydra", "samplerlab.log", "multirun.yaml")
DAMAGE = ("truncate", "flip", "flip tensor data", "delete", "empty list", "drop field", "directory", "wrong shape",
          "garbage")


@dataclass
class Plan:
    """What one trial does: its commands and its faults."""

    samples: int
    steps: tuple[int, ...] = (1, 2)

    def sweep(self) -> list[str]:
        return ["-m", f"steps={','.join(map(str, self.steps))}", *self.common(), "name=fi"]

    def single(self, steps: int) -> list[str]:
        return [f"steps={steps}", *self.common(), "name=single"]

    def common(self) -> list[str]:
        return [f"num_samples={self.samples}", "batch_size=1", "prompts=[a red circle,a blue square]"]


@dataclass
class Trial:
    index: int
    events: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def launch(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    code = "import sys; from framework.entry.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = open(log, "a")
    out.write(f"$ samplerlab {' '.join(argv)}\n")
    out.flush()
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, trial: Trial, log: Path, what: str, killed: bool = False) -> int:
    code = proc.wait(timeout=600)
    text = log.read_text()
    if "Traceback" in text:
        trial.problems.append(f"{what}: a traceback in {log.name}")
    ok = {0, 2} | ({-9} if killed else set())
    if code not in ok:
        trial.problems.append(f"{what}: exit {code}")
    if code == 2:
        tail = [line for line in text.splitlines() if line.startswith("samplerlab: error:")]
        if not tail or "is in use by" not in tail[-1]:
            trial.problems.append(f"{what}: exit 2 without the one-line 'in use' refusal: {tail[-1:]}")
        else:
            trial.events.append("refused")
    return code


def run_to_end(argv: list[str], cwd: Path, trial: Trial, what: str) -> str:
    log = cwd / f"log-{len(trial.events):03d}.txt"
    trial.events.append(what)
    code = finish(launch(argv, cwd, log), trial, log, what)
    if code == 2:  # nothing else holds the folders now: a refusal is a fault
        trial.problems.append(f"{what}: refused")
    return log.read_text()


def run_and_kill(argv: list[str], cwd: Path, trial: Trial, delay: float, what: str) -> None:
    log = cwd / f"log-{len(trial.events):03d}.txt"
    proc = launch(argv, cwd, log)
    try:
        proc.wait(timeout=delay)
        trial.events.append(f"{what} ended before kill")
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL
        trial.events.append(f"{what} killed at {delay:.1f}s")
    finish(proc, trial, log, what, killed=True)


# --- damage ------------------------------------------------------------------------------------
def folder_files(root: Path) -> list[Path]:
    out = []
    for sub in ("multirun/fi", "outputs/single"):
        for p in sorted((root / sub).rglob("*")) if (root / sub).exists() else ():
            rel = p.relative_to(root / sub).parts
            if p.is_file() and not any(part in HYDRA_FILES for part in rel) and p.name != ".lock":
                out.append(p)
    return out


def damage(path: Path, kind: str, rng: random.Random) -> str:
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: rng.randrange(0, max(1, len(data)))])
    elif kind == "flip" and data:
        i = rng.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:])
    elif kind == "flip tensor data" and path.suffix == ".safetensors" and len(data) > 8:
        start = 8 + struct.unpack("<Q", data[:8])[0]
        i = rng.randrange(start, len(data)) if start < len(data) else len(data) - 1
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:])
    elif kind == "delete":
        path.unlink()
    elif kind == "empty list":
        path.write_text("[]")
    elif kind == "drop field" and path.suffix == ".json":
        try:
            rec = json.loads(data)
            rec.pop(rng.choice(sorted(rec)), None)
            path.write_text(json.dumps(rec))
        except (ValueError, AttributeError, IndexError):
            path.write_text("{}")
    elif kind == "directory":
        path.unlink()
        path.mkdir()
        (path / "x").write_text("not a file")
    elif kind == "wrong shape" and path.suffix == ".safetensors":
        import torch
        from safetensors import safe_open
        from safetensors.torch import save_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
        except Exception:
            meta = {}
        save_file({"x_T": torch.zeros(1, 3), "latents": torch.zeros(1, 3)}, str(path), metadata=meta)
    else:
        path.write_bytes(os.urandom(rng.randrange(1, 200)))
        kind = "garbage"
    return kind


# --- checks ------------------------------------------------------------------------------------
def reference_folders(ref: Path) -> dict[str, Path]:
    return {json.loads(r.read_text())["run_key"]: r.parent for r in (ref / "multirun" / "fi").glob("*/record.json")}


def check_folder(folder: Path, refs: dict[str, Path], keys: set[str] | None = None) -> list[str]:
    """Problems of a run folder against the reference run of the same key (empty: sound)."""
    import torch
    from safetensors.torch import load_file

    from framework.runs.records import file_digest, record_problem

    try:
        rec = json.loads((folder / "record.json").read_text())
    except (OSError, ValueError) as e:
        return [f"{folder.name}: no readable record ({type(e).__name__})"]
    problem = record_problem(rec)
    if problem is not None:
        return [f"{folder.name}: record {problem}"]
    key = rec["run_key"]
    if key not in refs or (keys is not None and key not in keys):
        return [f"{folder.name}: record of an unexpected run {key}"]
    ref = refs[key]
    ref_rec = json.loads((ref / "record.json").read_text())
    out = []
    if set(rec["files"]) != set(ref_rec["files"]):
        out.append(f"{folder.name}: lists {sorted(set(rec['files']) ^ set(ref_rec['files']))} unlike the reference")
    for rel, want in rec["files"].items():
        if file_digest(folder / rel) != want:
            out.append(f"{folder.name}: {rel} does not match its digest")
        elif rel.endswith(".png") and (folder / rel).read_bytes() != (ref / rel).read_bytes():
            out.append(f"{folder.name}: {rel} differs from the reference")
        elif rel.endswith(".safetensors"):
            a, b = load_file(str(folder / rel)), load_file(str(ref / rel))
            if set(a) != set(b) or any(not torch.equal(a[k], b[k]) for k in a):
                out.append(f"{folder.name}: {rel} latents differ from the reference")
    if rec["metrics"].get("nfe") != ref_rec["metrics"].get("nfe") or rec["failed_samples"] != ref_rec["failed_samples"]:
        out.append(f"{folder.name}: metrics or failures differ from the reference")
    for p in folder.rglob("*"):
        rel = str(p.relative_to(folder))
        if p.is_file() and rel != "record.json" and rel not in rec["files"] and p.relative_to(folder).parts[0] not in HYDRA_FILES:
            out.append(f"{folder.name}: stray file {rel}")
    return out


def found_finished(folder: Path, plan: Plan) -> list[str]:
    """A rerun of the folder's config finds it finished (nothing made again)."""
    from framework.entry.api import run

    steps = json.loads((folder / "record.json").read_text())["config"]["steps"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run([f"steps={steps}", *plan.common()], output_dir=folder)
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return [] if res.skipped and not said else [f"{folder.name}: a rerun did not find it finished ({said})"]


def score_folder(folder: Path, samples: int) -> list[str]:
    from framework.tools.score import score

    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            merged = score([folder], ["metrics=[prompt_accuracy]"], out=out)
        except Exception as e:
            return [f"{folder.name}: samplerlab-score failed: {type(e).__name__}: {e}"]
    damaged = [str(w.message) for w in caught if "missing or damaged" in str(w.message)]  # none in a sound folder
    if damaged or merged["num_samples"] != samples:
        return [f"{folder.name}: scored {merged['num_samples']} of {samples} ({damaged})"]
    return []


# --- one trial ---------------------------------------------------------------------------------
def trial(index: int, plan: Plan, work: Path, refs: dict[str, Path], ref_seconds: float, rng: random.Random,
          smoke: bool = False) -> Trial:
    t = Trial(index)
    root = work / f"trial-{index:03d}"
    root.mkdir(parents=True)
    # 1. kill -9 at random points across the sweep
    for _ in range(1 if smoke else rng.choice((0, 1, 1, 2))):
        run_and_kill(plan.sweep(), root, t, rng.uniform(0.5, ref_seconds), "sweep")
    # 2. concurrent writers
    a, b = (plan.steps[:2] if smoke else (rng.choice(plan.steps), rng.choice(plan.steps)))
    procs = []
    for steps in (a, b):
        log = root / f"log-{len(t.events):03d}.txt"
        t.events.append(f"single steps={steps} (concurrent)")
        procs.append((launch(plan.single(steps), root, log), log, steps))
    if not smoke and rng.random() < 0.3:
        log = root / f"log-{len(t.events):03d}.txt"
        t.events.append("sweep (concurrent)")
        procs.append((launch(plan.sweep(), root, log), log, None))
    codes = [(finish(p, t, log, "concurrent"), steps) for p, log, steps in procs]
    winners = {steps for code, steps in codes if code == 0 and steps is not None}
    single = root / "outputs" / "single"
    keys = {k for k, r in refs.items() if json.loads((r / "record.json").read_text())["config"]["steps"] in winners}
    if winners:  # one config's run, whole, and nothing of the other
        t.problems += [f"after concurrent writers: {p}" for p in check_folder(single, refs, keys)]
    # 3. damage (smoke: the sweep's folders only, so the single run needs no repair)
    candidates = [p for p in folder_files(root) if not smoke or "multirun" in p.parts]
    for path in rng.sample(candidates, min(len(candidates), 2 if smoke else rng.randint(1, 3))):
        kind = damage(path, rng.choice(DAMAGE), rng)
        t.events.append(f"damage {kind}: {path.relative_to(root)}")
    # 4. repair: the same commands (the first attempt sometimes killed)
    final = rng.choice(plan.steps)
    if not smoke and rng.random() < 0.3:
        run_and_kill(plan.sweep(), root, t, rng.uniform(0.5, ref_seconds), "repair sweep")
    run_to_end(plan.sweep(), root, t, "repair sweep")
    if smoke:
        final_key = keys
    else:
        run_to_end(plan.single(final), root, t, f"repair single steps={final}")
        final_key = {k for k, r in refs.items() if json.loads((r / "record.json").read_text())["config"]["steps"] == final}
    folders = sorted(p.parent for p in (root / "multirun" / "fi").glob("*/record.json")) + [single]
    if len(folders) != len(plan.steps) + 1:
        t.problems.append(f"{len(folders)} finished run folders, expected {len(plan.steps) + 1}")
    for folder in folders:
        t.problems += check_folder(folder, refs, final_key if folder == single else None)
        t.problems += found_finished(folder, plan)
        t.problems += score_folder(folder, plan.samples)
    leftovers = [str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock"]
    if leftovers:
        t.problems.append(f"temporary or lock files left: {leftovers}")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=3, help="samples per run (one batch each)")
    ap.add_argument("--smoke", action="store_true", help="one short trial (CI)")
    ap.add_argument("--keep", help="keep the trial folders here (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.trials, args.samples = 1, 2
    plan = Plan(samples=args.samples)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="samplerlab-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ref = work / "reference"
        ref.mkdir(exist_ok=True)
        started = time.monotonic()
        reference = Trial(-1)
        run_to_end(plan.sweep(), ref, reference, "reference sweep")
        ref_seconds = time.monotonic() - started
        refs = reference_folders(ref)
        if reference.problems or len(refs) != len(plan.steps):
            print(f"reference sweep failed: {reference.problems}", file=sys.stderr)
            return 2
        failed = 0
        for i in range(args.trials):
            t = trial(i, plan, work, refs, ref_seconds, random.Random(args.seed * 100003 + i), smoke=args.smoke)
            failed += bool(t.problems)
            faults = [e for e in t.events if e.startswith(("damage", "sweep killed", "repair sweep killed", "refused"))]
            print(f"trial {i:3d}: {'FAILED' if t.problems else 'ok'}; {len(faults)} faults: {'; '.join(faults)}"
                  + (f"\n    problems: {t.problems}" if t.problems else ""), flush=True)
            if not args.keep:
                shutil.rmtree(work / f"trial-{i:03d}", ignore_errors=True)
        print(f"fault injection: {args.trials} trials, {failed} in which anything was lost or silently wrong")
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
