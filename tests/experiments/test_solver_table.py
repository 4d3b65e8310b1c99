"""The solver table experiment (fast=true on the mixture): cells at the NFE budgets, a reference
that starts from the same x_T, errors that fall with NFE for a convergent solver."""
from __future__ import annotations

import json

import experiments.solver_table.__main__ as table_mod


def test_solver_table_fast(tmp_path):
    docs, runs = tmp_path / "docs", tmp_path / "run"
    argv = ["fast=true", f"out={docs}", "models=[mixture]", "nfe=[10,20]", f"runs={runs}"]
    record = table_mod.main(argv)
    results = record["results"]
    rows = results["mixture"]["karras"]
    euler, heun = rows["euler"], rows["heun"]
    assert [c["nfe"] for c in euler] == [10, 20]
    assert all(c["nfe"] <= 20 for c in heun) and heun[-1]["nfe"] >= 19  # largest step count that fits
    assert euler[1]["error"] < euler[0]["error"] / 1.5  # first order: ~2× smaller at twice the NFE
    assert heun[-1]["error"] < heun[0]["error"] / 2  # second order: ~4× smaller at twice the NFE
    text = (docs / "solver_table.md").read_text()
    assert "| euler |" in text and "schedule=karras" in text
    assert (docs / "solver_table_mixture.png").stat().st_size > 1000
    assert set(record["files"]) == {"solver_table.md", "solver_table_mixture.png"}
    # the docs again from the record, without sampling: the same table
    (docs / "solver_table.md").unlink()
    table_mod.main(argv[:-1] + [f"from_results=[{runs / 'record.json'}]", f"runs={tmp_path / 'again'}"])
    assert (docs / "solver_table.md").read_text() == text
    assert json.loads((tmp_path / "again" / "record.json").read_text())["results"] == json.loads(json.dumps(results))


def test_reference_final_denoise_matches_fixed_step_convention(tmp_path):
    """solver.final=denoise ends with D at the last nonzero σ: on the gaussian model it equals the
    exact solution to σ_min followed by the exact D there (float64, 1e-8)."""
    import torch

    from framework.entry.api import run
    from framework.models.analytic import Gaussian

    base = ["model=gaussian", "dtype=float64", "num_samples=2", "batch_size=2", "guidance=[]", "callback=[]",
            "schedule=custom", "schedule.sigmas=[10.0,0.05,0.0]", "steps=2"]
    res = run(base + ["solver=reference", "solver.final=denoise"])
    g = Gaussian()
    x_min = g.exact_solution(res.x_T, 10.0, 0.05)
    expected = g(x_min, torch.tensor(0.05, dtype=torch.float64))
    assert torch.allclose(res.latents, expected, atol=1e-8, rtol=0)


def test_verdict_rows(tmp_path):
    """The verdict rows (``verdicts``: a probe record and the pair per budget): the record's best stock sampler at the
    budget, the pair's pooled RMSE over it, and its interval; a budget without its pair is left out."""
    from omegaconf import OmegaConf

    def entry(errors, nfe):
        return {"nfe": float(nfe), "error": (sum(e * e for e in errors) / len(errors)) ** 0.5, "sample_errors": errors}

    record = {"m/stock/euler/karras/6": entry([0.4, 0.4, 0.4, 0.4], 6), "m/stock/euler/leading/6": entry([0.2, 0.2, 0.2, 0.2], 6),
              "m/spec/learned/6": entry([0.1, 0.1, 0.1, 0.1], 6), "m/stock/euler/karras/8": entry([0.1] * 4, 8)}
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(record))
    cfg = OmegaConf.create({"verdicts": {"m": {"record": str(path), "pairs": {6: "spec/learned"}}}})
    lines = table_mod.verdict_rows(cfg, "m", [6, 8])
    text = "\n".join(lines)
    assert "| sampler | 6 |" in text and "(spec)" in text and "(euler + leading)" in text
    assert "| ratio (90 % interval) | 0.50 (0.50–0.50) |" in text
    assert table_mod.verdict_rows(OmegaConf.create({}), "m", [6]) == []
    record["m/spec/learned/8"] = entry([0.05] * 4, 8)
    path.write_text(json.dumps(record))
    cfg.verdicts.m.pairs[8] = "spec/learned"
    assert "| ratio (90 % interval) | 0.50 (0.50–0.50) | 0.50 (0.50–0.50) |" in "\n".join(table_mod.verdict_rows(cfg, "m", [6, 8]))
