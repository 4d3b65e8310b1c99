"""``samplerlab-report <sweep folder>``: a self-contained HTML dashboard built from run records.

Reads every ``record.json`` under the folder (a Hydra multirun folder, a merged-shards folder, or
any tree of run folders) and writes one HTML file (default ``<folder>/report.html``) with no
external references — images are inlined as base64 PNG, plots as inline SVG (matplotlib):

- **curves** — each quality metric against NFE, one line per sampler (solver plus whatever else
  varies across runs except the step count and seed), with the Pareto front over all runs
  (fewest NFE, best metric);
- **grid** — samplers side by side at equal seeds: one row per sampler, one column per step count,
  each cell the run's ``grid.png``;
- **previews** — each run's per-step preview strip (``preview.png``, written by the ``preview``
  callback) where present;
- **runs** — a table of every run with its metrics and only the config keys that differ across
  runs.

When W&B is online (an API key or ~/.netrc and ``WANDB_MODE`` not offline/disabled) the same plots,
the runs table and the HTML page are logged to one W&B run (job type ``report``, group = the sweep
folder's name); otherwise that is skipped and said once. Records are the only input: logs are
never read.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Metrics shown as curves, best first; (name, higher is better).
QUALITY_METRICS: tuple[tuple[str, bool], ...] = (
    ("fid", False), ("kid", False), ("frechet_to_data", False), ("rmse_to_reference", False),
    ("clip_score", True), ("prompt_accuracy_colour", True), ("prompt_accuracy_shape", True),
)
HIGHER_IS_BETTER = {name for name, higher in QUALITY_METRICS if higher} | {"samples_per_second", "images_per_second"}
#: Config keys that never distinguish samplers (the x axis, the seed, where things are stored).
NOT_SAMPLER_KEYS = ("steps", "seed", "output_dir", "save_images", "solver._target_")


@dataclass
class RunRecord:
    """One run folder and its record."""

    folder: Path
    record: dict[str, Any]
    label: str = ""

    @property
    def metrics(self) -> dict[str, float]:
        return self.record.get("metrics", {})

    @property
    def solver(self) -> str:
        names = self.record.get("plugins", {}).get("step") or []
        if names:
            return str(names[0])
        target = str(self.record.get("config", {}).get("solver", {}).get("_target_", "?"))
        return target.rsplit(".", 1)[-1].lower()

    @property
    def steps(self) -> Any:
        return self.record.get("config", {}).get("steps")

    @property
    def seed(self) -> Any:
        return self.record.get("seed", self.record.get("config", {}).get("seed"))


def load_runs(folder: str | Path) -> list[RunRecord]:
    """Every run record under ``folder`` (sorted by path; unreadable records are skipped with a warning)."""
    root = Path(folder)
    runs = []
    for path in sorted(root.rglob("record.json"), key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.parts]):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            warnings.warn(f"skipping {path}: {e}", stacklevel=2)
            continue
        if isinstance(record, dict) and "config" in record:
            runs.append(RunRecord(path.parent, record))
    return runs


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists and scalars as values (lists as JSON text)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: "{}"}
    return {prefix[:-1]: json.dumps(data) if isinstance(data, list) else data}


def config_differences(runs: Sequence[RunRecord]) -> list[str]:
    """The config keys whose value is not the same in every run (missing counts as a value)."""
    flats = [flatten(r.record.get("config", {})) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({json.dumps(f.get(k, "<absent>"), default=str) for f in flats}) > 1]


def label_runs(runs: Sequence[RunRecord]) -> None:
    """Name each run's sampler: the solver plus the differing keys that are not steps/seed/storage."""
    diffs = [k for k in config_differences(runs) if k not in NOT_SAMPLER_KEYS and not k.startswith("solver._")]
    for r in runs:
        flat = flatten(r.record.get("config", {}))
        extra = [f"{k.removeprefix('solver.')}={flat.get(k, '-')}" for k in diffs if k != "solver"]
        r.label = r.solver + (f" ({', '.join(extra)})" if extra else "")


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = False) -> list[tuple[float, float]]:
    """The non-dominated (x, y) points — fewer x and better y — sorted by x."""
    front: list[tuple[float, float]] = []
    sign = -1.0 if higher_is_better else 1.0
    for x, y in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if not front or sign * y < sign * front[-1][1]:
            front.append((x, y))
    return front


# ---------------------------------------------------------------------------------------------
# Plots and images
# ---------------------------------------------------------------------------------------------
def _figure_svg_png(fig: Any, want_png: bool) -> tuple[str, bytes | None]:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    svg = buf.getvalue()
    svg = svg[svg.find("<svg"):]  # drop the XML prolog and doctype: inline SVG
    png = None
    if want_png:
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
        png = out.getvalue()
    return svg, png


def metric_curves(runs: Sequence[RunRecord], want_png: bool = False) -> list[tuple[str, str, bytes | None]]:
    """(metric, inline SVG, PNG bytes or None) per quality metric present: metric vs NFE per sampler
    with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = []
    names = [n for n, _ in QUALITY_METRICS if any(n in r.metrics for r in runs)]
    for name in names:
        higher = name in HIGHER_IS_BETTER
        by_label: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in runs:
            if name in r.metrics and "nfe" in r.metrics:
                by_label[r.label].append((float(r.metrics["nfe"]), float(r.metrics[name])))
        with plt.rc_context({"svg.fonttype": "none"}):  # text stays text: searchable, small
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label, pts in sorted(by_label.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        front = pareto_front([p for pts in by_label.values() for p in pts], higher)
        ax.plot([p[0] for p in front], [p[1] for p in front], ls="--", color="black", lw=1.2, marker="s",
                mfc="none", ms=9, label="Pareto front")
        ax.set_xlabel("NFE (denoiser evaluations)")
        ax.set_ylabel(f"{name} ({'higher' if higher else 'lower'} is better)")
        ys = [p[1] for pts in by_label.values() for p in pts]
        if ys and min(ys) > 0 and max(ys) > 10 * min(ys):  # log only across decades
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{name} vs NFE")
        with plt.rc_context({"svg.fonttype": "none"}):
            svg, png = _figure_svg_png(fig, want_png)
        plt.close(fig)
        out.append((name, svg, png))
    return out


def _img_tag(path: Path, alt: str, css: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" class="{css}">'


def _run_image(r: RunRecord) -> Path | None:
    images = r.record.get("images") or {}
    for rel in (images.get("grid"), "grid.png", *(images.get("samples") or [])[:1]):
        if rel and (r.folder / rel).is_file():
            return r.folder / rel
    return None


# ---------------------------------------------------------------------------------------------
# HTML sections
# ---------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _curves_html(curves: list[tuple[str, str, bytes | None]]) -> str:
    if not curves:
        return "<p>No quality metric in these records (add e.g. metrics=[fid] or use an analytic model).</p>"
    return "".join(f'<figure class="plot" data-metric="{html.escape(n)}">{svg}</figure>' for n, svg, _ in curves)


def _grid_html(runs: Sequence[RunRecord]) -> str:
    by_seed: dict[Any, list[RunRecord]] = defaultdict(list)
    for r in runs:
        if _run_image(r) is not None:
            by_seed[r.seed].append(r)
    if not by_seed:
        return "<p>No images in these runs (image models write grid.png).</p>"
    parts = []
    for seed, group in sorted(by_seed.items(), key=lambda kv: str(kv[0])):
        steps = sorted({r.steps for r in group}, key=lambda s: (s is None, s))
        labels = sorted({r.label for r in group})
        head = "".join(f"<th>steps={_fmt(s)}</th>" for s in steps)
        rows = []
        for label in labels:
            cells = []
            for s in steps:
                match = [r for r in group if r.label == label and r.steps == s]
                cell = "".join(
                    _img_tag(_run_image(r), f"{label}, steps {s}", "sample") + f"<div class=cap>nfe {_fmt(r.metrics.get('nfe', '?'))}</div>"
                    for r in match[:1]
                )
                cells.append(f"<td>{cell or '—'}</td>")
            rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
        parts.append(f"<h3>seed {_fmt(seed)}</h3><table class=grid><tr><th></th>{head}</tr>{''.join(rows)}</table>")
    return "".join(parts)


def _previews_html(runs: Sequence[RunRecord]) -> str:
    items = [r for r in runs if (r.folder / "preview.png").is_file()]
    if not items:
        return "<p>No per-step previews in these runs (add the preview callback: callback=[nan_guard,preview]).</p>"
    return "".join(
        f"<figure class=preview><figcaption>{html.escape(r.label)}, steps {_fmt(r.steps)} ({html.escape(r.folder.name)})"
        f"</figcaption>{_img_tag(r.folder / 'preview.png', 'preview ' + r.label, 'strip')}</figure>"
        for r in items
    )


def runs_table(runs: Sequence[RunRecord], root: Path) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): run folder, sampler, the metrics, then the config keys that differ."""
    metric_names = sorted(set().union(*(r.metrics for r in runs)))
    diffs = config_differences(runs)
    columns = ["run", "sampler", *metric_names, *diffs]
    rows = []
    for r in runs:
        flat = flatten(r.record.get("config", {}))
        rel = str(r.folder.relative_to(root)) if r.folder.is_relative_to(root) else str(r.folder)
        rows.append([rel, r.label, *(r.metrics.get(m, "") for m in metric_names), *(flat.get(k, "") for k in diffs)])
    return columns, rows


def _table_html(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table class=runs><tr>{head}</tr>{body}</table>"


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h1{margin-bottom:.2em}
section{margin:1.5em 0}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:center}table.runs td{text-align:right}figure{display:inline-block;margin:.5em}
img.sample{image-rendering:pixelated;width:160px}img.strip{image-rendering:pixelated;max-width:100%;height:96px}
.cap{font-size:11px;color:#666}figure.plot svg{max-width:640px;height:auto}"""


def build_html(runs: Sequence[RunRecord], root: Path, title: str, curves: list[tuple[str, str, bytes | None]]) -> str:
    """The dashboard page (self-contained HTML)."""
    columns, rows = runs_table(runs, root)
    sections = [
        ("curves", "Metrics vs NFE", _curves_html(curves)),
        ("grid", "Samplers side by side (equal seeds)", _grid_html(runs)),
        ("previews", "Per-step previews", _previews_html(runs)),
        ("runs", "Runs and their config differences", _table_html(columns, rows)),
    ]
    body = "".join(f'<section id="{sid}"><h2>{head}</h2>{content}</section>' for sid, head, content in sections)
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{CSS}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><p>{len(runs)} runs from {html.escape(str(root))}</p>{body}</body></html>\n")


# ---------------------------------------------------------------------------------------------
# W&B
# ---------------------------------------------------------------------------------------------
def wandb_online() -> bool:
    """Whether W&B would log online: an API key (env or ~/.netrc) and WANDB_MODE not offline/disabled."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    return bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))


def log_to_wandb(root: Path, page: str, curves: list[tuple[str, str, bytes | None]], columns: list[str],
                 rows: list[list[Any]], project: str, entity: str | None) -> bool:
    """Log the plots, the runs table and the page to one W&B run; False (with a warning) on failure."""
    try:
        import wandb
        from PIL import Image

        run = wandb.init(project=project, entity=entity, group=root.name, job_type="report", name=f"report-{root.name}",
                         reinit="create_new")
        data: dict[str, Any] = {f"report/{name}_vs_nfe": wandb.Image(Image.open(io.BytesIO(png)))
                                for name, _, png in curves if png}
        cells = [[v if isinstance(v, (int, float)) else (None if v == "" else str(v)) for v in row] for row in rows]
        data["report/runs"] = wandb.Table(columns=columns, data=cells, allow_mixed_types=True)
        data["report/page"] = wandb.Html(page)
        run.log(data)
        run.finish()
        return True
    except Exception as e:  # the local report is what matters
        warnings.warn(f"W&B logging of the report failed ({type(e).__name__}: {e}); the HTML report is written", stacklevel=2)
        return False


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def build_report(folder: str | Path, out: str | Path | None = None, title: str | None = None, wandb: bool = True,
                 project: str = "samplerlab", entity: str | None = None) -> Path:
    """Write the dashboard of the runs under ``folder``; returns the HTML file's path."""
    from framework.core.errors import ConfigError
    from framework.core.files import atomic_write_bytes

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder: give a sweep folder (e.g. multirun/<date>/<time>)")
    runs = load_runs(root)
    if not runs:
        raise ConfigError(f"no record.json under {root}: run a sweep first (samplerlab -m solver=euler,heun steps=5,10)")
    label_runs(runs)
    online = wandb and wandb_online()
    curves = metric_curves(runs, want_png=online)
    page = build_html(runs, root, title or f"samplerlab report: {root.name}", curves)
    path = Path(out) if out else root / "report.html"
    atomic_write_bytes(path, page.encode())
    if online:
        columns, rows = runs_table(runs, root)
        log_to_wandb(root, page, curves, columns, rows, project, entity)
    elif wandb:
        print("samplerlab-report: W&B is offline or has no API key: the report is not logged to W&B")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``samplerlab-report <sweep folder> [--out FILE] [--title T] [--no-wandb]``; returns the exit code."""
    from framework.core.errors import SamplerlabError

    parser = argparse.ArgumentParser(prog="samplerlab-report", description="Build an HTML dashboard from run records.")
    parser.add_argument("folder", help="a sweep folder (or any folder holding run folders with record.json)")
    parser.add_argument("--out", help="the HTML file (default: <folder>/report.html)")
    parser.add_argument("--title")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B even when online")
    parser.add_argument("--project", default="samplerlab", help="W&B project (default: samplerlab)")
    parser.add_argument("--entity", default=None, help="W&B entity")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from framework.entry.quiet import quiet_libraries

    try:
        with quiet_libraries():
            path = build_report(args.folder, args.out, args.title, not args.no_wandb, args.project, args.entity)
    except SamplerlabError as e:
        print(f"samplerlab-report: error: {e}", file=sys.stderr)
        return 2
    print(f"samplerlab-report: {path}")
    return 0


def run() -> None:  # console-script shim
    raise SystemExit(main())
