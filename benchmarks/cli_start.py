"""CLI start-up: wall time of ``samplerlab --help`` and of a configuration error (``samplerlab
solver=nope``), each a fresh process, N runs, median. Also says whether either path imported torch
or a plugin (it must not: torch alone takes ~2 s to import on a small machine).

    python benchmarks/cli_start.py [--runs 15]     # the figures (target: ≤ 1.0 s each, idle 2-core machine)
    python benchmarks/cli_start.py --smoke         # one run each (CI: the script works)

The machine's load is printed alongside: on a busy machine the figures are upper bounds.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

#: What each measured process runs: the console script's own code, then a report of heavy imports.
PROBE = (
    "import sys\n"
    "from framework.entry.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
    "heavy += sorted({m.split('.')[0] + '.' + m.split('.')[1] for m in sys.modules if m.startswith('plugins.')})\n"
    "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    "raise SystemExit(code)\n"
)
CASES = (("samplerlab --help", ["--help"], 0), ("samplerlab solver=nope", ["solver=nope"], 2))


def _console_script() -> list[str] | None:
    exe = shutil.which("samplerlab") or str(os.path.join(os.path.dirname(sys.executable), "samplerlab"))
    return [exe] if os.path.exists(exe) else None


def measure(argv: list[str], runs: int, expected: int) -> tuple[list[float], list[float], str]:
    """(wall times of the console script, wall times of the probe, heavy modules the probe saw)."""
    script = _console_script()
    walls, probes, heavy = [], [], ""
    for _ in range(runs):
        if script is not None:
            t0 = time.perf_counter()
            done = subprocess.run(script + argv, capture_output=True, text=True)
            walls.append(time.perf_counter() - t0)
            if done.returncode != expected:
                raise SystemExit(f"{' '.join(script + argv)} exited {done.returncode}: {done.stderr}")
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True)
        probes.append(time.perf_counter() - t0)
        if done.returncode != expected:
            raise SystemExit(f"probe {argv} exited {done.returncode}: {done.stderr}")
        heavy = next((l.split("=", 1)[1] for l in done.stderr.splitlines() if l.startswith("HEAVY=")), "?")
    return walls, probes, heavy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--smoke", action="store_true", help="one run of each (checks the script, not the figures)")
    args = ap.parse_args(argv)
    runs = 1 if args.smoke else args.runs
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"cpus={os.cpu_count()} load(1 min)={load:.2f} python={sys.version.split()[0]} runs={runs}")
    failed = False
    for name, case, expected in CASES:
        walls, probes, heavy = measure(case, runs, expected)
        wall = f"{statistics.median(walls):.3f} s" if walls else "n/a (console script not installed)"
        print(f"{name:<24} median wall {wall}; in-process probe {statistics.median(probes):.3f} s; "
              f"heavy imports: {heavy or 'none'}")
        failed = failed or bool(heavy)
    if failed:
        print("FAIL: a start-up path imported torch or a plugin")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
