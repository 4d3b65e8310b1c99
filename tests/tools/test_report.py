"""samplerlab-report: the HTML dashboard from sweep records (curves with the Pareto front, the grid of
samplers at equal seeds, previews, the table of config differences) and its W&B logging."""
from __future__ import annotations

import json
import re

import torch

from framework.tools import report
from framework.runs.images import png_bytes


def fake_sweep(root, solvers=("euler", "heun"), steps=(2, 4), preview=None):
    """Run folders with records and images, as a sweep writes them (no model needed)."""
    gen = torch.Generator().manual_seed(0)
    k = 0
    for s in solvers:
        for n in steps:
            folder = root / str(k)
            (folder / "samples").mkdir(parents=True)
            (folder / "grid.png").write_bytes(png_bytes(torch.rand(3, 8, 8, generator=gen)))
            nfe = n if s == "euler" else 2 * n - 1
            record = {
                "config": {"solver": {"_target_": f"plugins.solver.{s}.{s.title()}"}, "steps": n, "seed": 0,
                           "cfg_scale": 5.0},
                "plugins": {"step": [s]}, "seed": 0,
                "metrics": {"nfe": float(nfe), "fid": 10.0 / nfe + (0.5 if s == "heun" else 0.0), "seconds": 1.0},
                "images": {"grid": "grid.png", "samples": []},
            }
            (folder / "record.json").write_text(json.dumps(record))
            if preview == k:
                (folder / "preview.png").write_bytes(png_bytes(torch.rand(3, 8, 40, generator=gen)))
            k += 1
    return root


def test_pareto_front():
    pts = [(1, 5.0), (2, 3.0), (2, 4.0), (3, 3.5), (4, 1.0), (5, 1.0)]
    assert report.pareto_front(pts) == [(1, 5.0), (2, 3.0), (4, 1.0)]
    assert report.pareto_front(pts, higher_is_better=True) == [(1, 5.0)]
    assert report.pareto_front([(1, 1.0), (2, 2.0)], higher_is_better=True) == [(1, 1.0), (2, 2.0)]


def test_config_differences_and_sampler_labels(tmp_path):
    runs = report.load_runs(fake_sweep(tmp_path))
    assert report.config_differences(runs) == ["solver._target_", "steps"]
    report.label_runs(runs)
    assert [r.label for r in runs] == ["euler", "euler", "heun", "heun"]
    runs[0].record["config"]["schedule"] = {"rho": 3.0}
    report.label_runs(runs)
    assert runs[0].label == "euler (schedule.rho=3.0)" and runs[1].label == "euler (schedule.rho=-)"


def test_report_sections_images_and_plots(tmp_path, capsys):
    root = fake_sweep(tmp_path / "sweep", preview=1)
    assert report.main([str(root)]) == 0
    page = (root / "report.html").read_text()
    for section in ("curves", "grid", "previews", "runs"):
        assert f'<section id="{section}">' in page
    assert page.count('class="sample"') == 4 and page.count('class="strip"') == 1
    svg = re.search(r'<figure class="plot" data-metric="fid">(.*?)</figure>', page, re.S).group(1)
    assert svg.startswith("<svg") and "euler" in svg and "heun" in svg and "Pareto front" in svg
    assert not re.search(r"(src|href)=\"(?!data:|#)", page) and "<script" not in page  # self-contained
    runs_table = page[page.index('<section id="runs">'):]
    assert runs_table.count("<tr>") == 5 and "solver._target_" in runs_table and "cfg_scale" not in runs_table
    assert "not logged to W&B" in capsys.readouterr().out


def test_report_logs_to_wandb_when_online(tmp_path, monkeypatch):
    import wandb

    logged = {}

    class FakeRun:
        def log(self, data):
            logged.update(data)

        def finish(self):
            logged["finished"] = True

    monkeypatch.setattr(report, "wandb_online", lambda: True)
    monkeypatch.setattr(wandb, "init", lambda **kw: logged.update(init=kw) or FakeRun())
    root = fake_sweep(tmp_path / "sw")
    rec = json.loads((root / "0" / "record.json").read_text())
    del rec["metrics"]["fid"]  # a run without the metric: an empty cell, not a type clash
    (root / "0" / "record.json").write_text(json.dumps(rec))
    report.build_report(root)
    assert logged["init"]["group"] == "sw" and logged["init"]["job_type"] == "report" and logged["finished"]
    assert isinstance(logged["report/fid_vs_nfe"], wandb.Image) and isinstance(logged["report/runs"], wandb.Table)
    assert isinstance(logged["report/page"], wandb.Html)


def test_wandb_online_detection(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not report.wandb_online()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert report.wandb_online()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not report.wandb_online()


def test_report_errors(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no record.json" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 2


def test_three_by_three_sweep_under_the_basic_launcher_yields_a_report(tiny_overrides, tmp_path, capsys):
    from framework.entry.cli import main

    sweep = tmp_path / "sweep"
    code = main(["-m", *tiny_overrides, "solver=euler,heun,dpmpp_2m", "steps=1,2,3", "num_samples=2", "batch_size=2",
                 "metrics=[fid]", "metrics.fid.reference=8", f"metrics.fid.cache_dir={tmp_path / 'cache'}",
                 f"hydra.sweep.dir={sweep}"])
    assert code == 0
    assert report.main([str(sweep), "--no-wandb"]) == 0
    page = (sweep / "report.html").read_text()
    assert page.count('class="sample"') == 9  # 3 samplers × 3 step counts at seed 0
    svg = re.search(r'data-metric="fid">(.*?)</figure>', page, re.S).group(1)
    assert all(name in svg for name in ("euler", "heun", "dpmpp_2m", "Pareto front"))
    assert page[page.index('<section id="runs">'):].count("<tr>") == 10
