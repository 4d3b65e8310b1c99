"""scripts/fault_injection.py in its smoke mode: one trial (a killed sweep, two writers on one
folder, two damaged files, the repair) with real processes; the full run (50 trials) is in
docs/reliability.md."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fault_injection_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault_injection.py"), "--smoke", "--keep", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fault injection: 1 trials, 0 in which anything was lost or silently wrong" in out.stdout
