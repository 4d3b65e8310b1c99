"""The guidance study's methods config (experiments/guidance_study/methods.py): matched step counts,
the image measures, the verdicts against the noise floor, and a fast run end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.guidance_study import methods
from experiments.harness import Experiment

HERE = Path(methods.__file__).resolve().parent


def test_steps_match_the_pair_budget():
    assert methods.steps_for(30) == 30                       # CFG: one pair per step
    assert methods.steps_for(30, extra=0.5) == 20            # CFG + a perturbed branch: 1.5 pairs per step
    assert methods.steps_for(6, extra=0.5) == 4
    # SLG's window [0.01, 0.2): the branch on steps ⌊0.01·N⌋ ≤ i < ⌊0.2·N⌋ only
    assert methods.pairs(27, 0.5, (0.01, 0.2)) == 29.5 and methods.pairs(28, 0.5, (0.01, 0.2)) == 30.5
    assert methods.steps_for(30, 0.5, (0.01, 0.2)) == 27     # a tie: the fewer steps


def test_configurations_of_the_study():
    cfg = Experiment.compose(HERE, ["--config-name", "methods"]).cfg
    confs = {c["label"]: c for c in methods.configurations(cfg)}
    assert {"cfg w=3", "cfg w=5", "cfg w=7.5", "pag w=5 pag.scale=3", "euler_cfg_pp λ=0.4"} <= set(confs)
    assert confs["cfg w=5"]["steps"] == 20 and confs["cfg w=5"]["refs"] == []  # the model's default 20 steps
    pag = confs["pag w=5 pag.scale=3"]
    assert pag["steps"] == 13 and pag["pairs"] == 19.5                          # 1.5 pairs per step
    assert confs["slg w=5 slg.scale=2.8"]["steps"] == 18                       # 18 + 0.5·(⌊3.6⌋ − ⌊0.18⌋) = 19.5
    assert pag["refs"] == ["cfg w=5", "cfg_equal_steps w=5 (13 steps)"]
    assert all(r in confs for c in confs.values() for r in c["refs"])  # every comparison row exists
    assert confs["euler_cfg_pp λ=0.4"]["overrides"][-1] == "cfg_scale=0.4"
    assert confs["euler_cfg_pp λ=0.4"]["refs"] == ["cfg w=5"]
    assert confs["autoguidance_model w=2"]["refs"] == ["cfg w=3"]  # no cfg w=2 row: the nearest
    assert all(abs(c["pairs"] - 20) <= 0.5 for c in confs.values() if not c["equal_steps"])


def test_saturation_and_contrast():
    grey, red = torch.full((1, 3, 4, 4), 0.5), torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    assert methods.saturation(grey) < 1e-7 and abs(methods.saturation(red) - 1) < 1e-7
    assert methods.saturation(torch.zeros(1, 3, 4, 4)) < 1e-7  # black: 0, not NaN
    half = torch.zeros(2, 3, 4, 4)
    half[0, :, :, :2] = 1  # image 0: half white (luma 1), half black: std 0.5; image 1 flat: 0
    assert abs(methods.contrast(half) - 0.25) < 1e-6
    assert abs(methods.contrast(red) - 0.0) < 1e-7


def _results(values: dict[str, tuple[float, float]]) -> dict:
    def row(v):
        return {f: v for f in methods.FIGURES}
    confs = {label: {"refs": [] if label == "cfg w=5" else ["cfg w=5"], "sets": {"A": row(a), "B": row(b)}}
             for label, (a, b) in values.items()}
    return {"configurations": confs}


def test_verdicts_need_both_sets_beyond_the_effect_floor():
    # Δ against cfg per set (A/B): a +.2/+.2, b +.02/+.1, c +.3/−.1, d −.3/−.3, e +.1/+.2
    # |ΔA − ΔB|: 0, .08, .4, 0, .1 → effect floor .08; |A − B| per row: .1 .1 .02 .5 .1 0 → noise floor .1
    res = _results({"cfg w=5": (0.5, 0.4), "a": (0.7, 0.6), "b": (0.52, 0.5), "c": (0.8, 0.3), "d": (0.2, 0.1),
                    "e": (0.6, 0.6)})
    methods.summarise(res, ["A", "B"])
    assert abs(res["effect_floor"]["colour"] - 0.08) < 1e-12 and abs(res["noise_floor"]["colour"] - 0.1) < 1e-12
    verdict = {k: res["configurations"][k]["effects"]["cfg w=5"] for k in "abcde"}
    assert {k: v["colour"]["verdict"] for k, v in verdict.items()} == {
        "a": "better", "b": "within noise", "c": "within noise", "d": "worse", "e": "better"}
    assert verdict["a"]["fd"]["verdict"] == "worse" and verdict["d"]["fd"]["verdict"] == "better"  # FD: lower is better
    assert abs(verdict["e"]["colour"]["mean"] - 0.15) < 1e-12
    assert res["configurations"]["cfg w=5"]["effects"] == {}


@pytest.mark.slow  # ~30 s of CPU (2–3 min wall on the loaded build machine): 3 methods × 2 sets of 4 samples, FD, CLIP score
def test_methods_study_fast(tmp_path, monkeypatch):
    from experiments.guidance_study.__main__ import main

    argv = ["--config-name", "methods", "fast=true", f"out={tmp_path / 'docs'}", f"runs={tmp_path / 'runs'}"]
    record = main(argv)
    res = record["results"]
    confs = res["configurations"]
    assert set(confs) == {"cfg w=3", "cfg w=5", "cfg w=7.5", "cfg_zero_star w=5", "cfg_zero_star w=7.5",
                          "pag w=5 pag.scale=1.5", "pag w=5 pag.scale=3"}
    for c in confs.values():  # the planned budget is what the record measured (6 pairs at fast)
        assert all(abs(c["sets"][s]["nfe_pairs"] - 6) < 1e-9 for s in "AB"), c
    assert confs["pag w=5 pag.scale=3"]["sets"]["A"]["network_inputs"] == 12  # 4 steps × 3 inputs
    assert res["sets"]["A"]["prompts"] != res["sets"]["B"]["prompts"]
    assert set(record["files"]) == {"methods.md", "methods.json", "methods.png"}
    text = (tmp_path / "docs" / "guidance" / "methods.md").read_text()
    assert "| pag w=5 pag.scale=3 | cfg w=5 (6 steps) |" in text and "Noise floor" in text
    assert (tmp_path / "docs" / "guidance" / "methods.png").stat().st_size > 1000
    # a rerun reuses every measured configuration: no sampling
    monkeypatch.setattr(methods, "run", lambda *a, **k: pytest.fail("sampled again"))
    again = main(argv)["results"]["configurations"]
    assert again["cfg w=5"]["sets"]["A"]["fd"] == confs["cfg w=5"]["sets"]["A"]["fd"]
    assert json.loads((tmp_path / "runs" / "record.json").read_text())["config_name"] == "methods"


def test_methods_study_on_the_flow_model(tmp_path):
    """model=bundled_flow: its own file names, and a method it cannot run (the VP guide network) is
    listed with the reason while the others are measured (2 samples per set, 3 steps)."""
    from experiments.guidance_study.__main__ import main

    argv = ["--config-name", "methods", "model=bundled_flow", "samples=2", "budget_pairs=3", "batch_size=2",
            "fid_reference=8", "grid_prompts=2", "only=[cfg,autoguidance_model]", "methods.cfg.cfg_scale=[5]",
            "methods.autoguidance_model.cfg_scale=[2]", f"out={tmp_path / 'docs'}", f"runs={tmp_path / 'runs'}"]
    record = main(argv)
    res = record["results"]
    assert res["model"] == "bundled_flow" and set(res["configurations"]) == {"cfg w=5"}
    assert "same kind of network" in res["cannot_run"]["autoguidance_model w=2"]
    assert set(record["files"]) == {"methods_bundled_flow.md", "methods_bundled_flow.json", "methods_bundled_flow.png"}
    text = (tmp_path / "docs" / "guidance" / "methods_bundled_flow.md").read_text()
    assert text.startswith("`model=bundled_flow`") and "- autoguidance_model w=2: guide" in text
    assert json.loads(next((tmp_path / "runs" / "rows").glob("cfg_w_5_A.json")).read_text())["overrides"][0] == "model=bundled_flow"
