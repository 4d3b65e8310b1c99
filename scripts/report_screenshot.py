"""Run a 3 solvers × 3 step counts sweep on the bundled model, build its report, open the report in
real headless Chromium and check that its plots and images show; keep the screenshot.

    python scripts/report_screenshot.py                         # basic launcher → docs/report_screenshot.png
    python scripts/report_screenshot.py --launcher local_joblib --steps 2,3,4 --samples 4 --screenshot /tmp/joblib.png
    python scripts/report_screenshot.py --report some/sweep     # only check an existing sweep's report

Needs Debian's ``chromium`` (``apt-get install -y chromium``); not part of CI. Checks, each a
failure when not met:
- in the DOM after load (``--dump-dom`` of a copy of the page with a small inline checker
  script): every ``<img>`` decoded (``complete`` and ``naturalWidth > 0``) and every inline SVG plot
  laid out with a non-zero size;
- in the screenshot: not blank (enough non-white pixels and colours), and the whole page: the
  window is as wide and tall as the laid-out page (the runs table is wider than 1280 px).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--hide-scrollbars", "--virtual-time-budget=10000"]
CHECKER = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const plots = [...document.querySelectorAll('figure.plot svg')];
  const flat = plots.filter(s => { const r = s.getBoundingClientRect(); return !(r.width > 50 && r.height > 50); });
  const out = document.createElement('pre');
  out.id = 'samplerlab-check';
  const page = document.documentElement;
  out.textContent = JSON.stringify({images: imgs.length, undecoded: bad, plots: plots.length, unsized: flat.length,
                                    width: page.scrollWidth, height: page.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: apt-get install -y chromium")


def sweep(folder: Path, launcher: str, steps: str = "3,6,12", samples: int = 16) -> None:
    from framework.entry.cli import main

    overrides = ["-m", f"hydra/launcher={launcher}", "solver=euler,heun,dpmpp_2m", f"steps={steps}",
                 f"num_samples={samples}", f"batch_size={samples}", "metrics=[fid,clip_score,prompt_accuracy]", "callback=[nan_guard,preview]",
                 "callback.preview.samples=4", f"hydra.sweep.dir={folder}"]
    if launcher == "local_joblib":
        overrides.append("hydra.launcher.n_jobs=2")
    if main(overrides) != 0:
        raise SystemExit("the sweep failed")


def dom_check(page: Path, width: int = 1280) -> dict:
    """Open a copy of the page with the checker script in headless Chromium (a window ``width`` px
    wide) and read its verdict, with the laid-out page's full width and height."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(page.read_text().replace("</body>", CHECKER + "</body>"))
        dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--window-size={width},1000", "--dump-dom", probe.as_uri()], capture_output=True,
                             text=True, timeout=180).stdout
    m = re.search(r'<pre id="samplerlab-check">(.*?)</pre>', dom, re.S)
    if not m:
        raise SystemExit("Chromium did not run the page's checker (no verdict in the dumped DOM)")
    return json.loads(m.group(1).replace("&quot;", '"'))


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2600) -> dict:
    """Render the page to ``out`` in a ``width`` × ``height`` window (give the page's own laid-out
    size, :func:`dom_check`, so nothing is cut at the right or the bottom) and measure how much of
    it is drawn."""
    import numpy as np
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--screenshot={out}", page.as_uri()],
                   capture_output=True, timeout=180, check=True)
    arr = np.asarray(Image.open(out).convert("RGB"))
    drawn = np.nonzero((arr.min(axis=2) < 250).any(axis=1))[0]
    if len(drawn):  # crop the empty space below the page
        arr = arr[: min(arr.shape[0], drawn[-1] + 24)]
        Image.fromarray(arr).save(out, optimize=True)
    ink = float((arr.min(axis=2) < 235).mean())
    colours = len(np.unique(arr.reshape(-1, 3)[::7], axis=0))
    return {"size": list(arr.shape[1::-1]), "ink_fraction": round(ink, 4), "colours": colours}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher", default="basic", help="basic or a preset of conf/hydra/launcher (local_joblib)")
    parser.add_argument("--sweep-dir", default=None, help="where the sweep goes (default: a temporary folder)")
    parser.add_argument("--report", default=None, help="skip the sweep: check the report of this sweep folder")
    parser.add_argument("--steps", default="3,6,12", help="the step counts of the sweep (default 3,6,12)")
    parser.add_argument("--samples", type=int, default=16, help="samples per run (default 16)")
    parser.add_argument("--screenshot", default=str(ROOT / "docs" / "report_screenshot.png"))
    args = parser.parse_args(argv)

    from framework.tools.report import build_report

    if args.report:
        folder = Path(args.report)
    else:
        folder = Path(args.sweep_dir or tempfile.mkdtemp(prefix="samplerlab-sweep-"))
        sweep(folder, args.launcher, args.steps, args.samples)
    page = build_report(folder, wandb=False)
    verdict = dom_check(page)
    # the window as wide and tall as the laid-out page (a wide runs table overflows 1280 px): the whole page
    shot = screenshot(page, Path(args.screenshot), width=max(1280, verdict["width"] + 16),
                      height=max(800, verdict["height"] + 16))
    print(json.dumps({"report": str(page), "dom": verdict, "screenshot": {"path": args.screenshot, **shot}}, indent=1))
    problems = []
    if verdict["undecoded"] or verdict["images"] == 0:
        problems.append(f"images not decoded: {verdict['undecoded'] or 'none in the page'}")
    if verdict["unsized"] or verdict["plots"] == 0:
        problems.append(f"{verdict['unsized']} of {verdict['plots']} plots not laid out")
    if shot["ink_fraction"] < 0.02 or shot["colours"] < 50:
        problems.append(f"the screenshot looks blank ({shot})")
    for p in problems:
        print(f"report_screenshot: FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
