"""experiments/schedule_opt: the study end to end on a tiny plan (slow), and its helpers."""
from __future__ import annotations

import math

import pytest

import experiments.schedule_opt.__main__ as study_mod


def test_log_rms_and_best_cells():
    assert study_mod.log_rms([8.0, 2.0, 0.0], [8.0, 2.0, 0.0]) == 0.0
    assert math.isclose(study_mod.log_rms([8.0, 2.0, 0.0], [8.0, 2.0 * math.e, 0.0]), math.sqrt(0.5), rel_tol=1e-12)
    assert study_mod.log_rms([8.0, 0.0], [8.0, 1.0, 0.0]) is None
    res = {"stock": {"euler": {"karras": {"5": {"error": 0.5, "nfe": 5}}, "uniform": {"skipped": "no"}},
                     "heun": {"karras": {"5": {"error": 0.4, "nfe": 5}}}},
           "optimised": {"gits": {"euler": {"5": {"error": 0.1, "nfe": 5}}}, "oss": {"heun": {"skipped": "x"}}}}
    best = study_mod.best_cells(res, [5, 6])
    assert set(best) == {"5"} and best["5"]["stock"]["sampler"] == "heun + karras"
    assert best["5"]["optimised"]["sampler"] == "euler + gits" and math.isclose(best["5"]["ratio"], 0.25)


def test_best_optimised_is_chosen_on_the_calibration_set():
    """The chosen grid is the one with the least calibration RMSE, not the held-out best (the oracle)."""
    res = {"stock": {"euler": {"karras": {"5": {"error": 0.5, "nfe": 5}}}},
           "optimised": {"oss": {"unipc": {"5": {"error": 0.2, "nfe": 5, "calibration_rmse_to_teacher": 0.3}}},
                         "ld3": {"unipc": {"5": {"error": 0.3, "nfe": 5, "calibration_rmse_to_teacher": 0.1}}}}}
    b = study_mod.best_cells(res, [5])["5"]
    assert b["optimised"]["sampler"] == "unipc + ld3" and math.isclose(b["ratio"], 0.6)
    assert b["oracle"]["sampler"] == "unipc + oss" and math.isclose(b["oracle"]["ratio"], 0.4)
    assert study_mod.best_cells(res, [5], select="heldout")["5"]["optimised"]["sampler"] == "unipc + oss"


def test_per_sample_split_of_the_best_pair():
    """Where both cells keep their per-sample errors: the ratio of the medians and the samples the optimised
    grid wins — here one flipped sample gives the stock sampler its large RMSE, the typical sample is worse."""
    stock = [0.1, 0.1, 0.1, 2.0]
    opt = [0.2, 0.2, 0.05, 0.3]
    rms = lambda v: math.sqrt(sum(x * x for x in v) / len(v))
    res = {"stock": {"euler": {"karras": {"5": {"error": rms(stock), "nfe": 5, "sample_errors": stock}}}},
           "optimised": {"oss": {"euler": {"5": {"error": rms(opt), "nfe": 5, "sample_errors": opt}}}}}
    b = study_mod.best_cells(res, [5])["5"]
    assert b["ratio"] < 0.25  # the RMSE's verdict
    assert math.isclose(b["per_sample"]["median_ratio"], 2.0) and b["per_sample"]["better"] == 2 and b["per_sample"]["n"] == 4
    lo, hi = b["per_sample"]["ratio_interval"]
    assert lo <= b["ratio"] <= hi and hi > 2 * lo  # one sample carries the RMSE: the ratio is barely known
    del res["stock"]["euler"]["karras"]["5"]["sample_errors"]  # an older record: no split
    assert "per_sample" not in study_mod.best_cells(res, [5])["5"]


@pytest.mark.slow
def test_study_on_a_tiny_plan(tmp_path):
    argv = ["models=[mixture]", "nfe=[4,5]", "plan={mixture: {gits: [euler, heun]}}", "agreement={mixture: [gits/euler]}",
            "stock_solvers=[euler]", "stock_schedules=[karras,linspace]", "transfer_solvers=[euler,dpmpp_2m]",
            "heldout.num_samples.mixture=8", "fine.mixture=10", "calibration.num_samples.mixture=4",
            "keep_results=null", f"out={tmp_path / 'docs'}", f"runs={tmp_path / 'runs'}"]
    record = study_mod.main(argv)
    res = record["results"]["mixture"]
    assert res["stock"]["euler"]["linspace"]["skipped"].startswith("schedule=uniform")
    assert [c["nfe"] for c in res["stock"]["euler"]["karras"].values()] == [4, 5]
    assert set(res["optimised"]["gits"]["heun"]) == {"5"}  # heun meets odd budgets only
    for n in ("4", "5"):
        b = res["best"][n]
        assert b["optimised"]["error"] < b["stock"]["error"], b  # optimised euler beats karras euler
    assert set(res["agreement"]["gits/euler"]) >= {"4", "5"}
    text = (tmp_path / "docs" / "optimisation_table.md").read_text()
    assert "| gits + euler |" in text and "ratio" in text
    assert (tmp_path / "docs" / "optimisation_mixture.png").stat().st_size > 1000
    # the docs again from the record, without sampling: the same table
    study_mod.main(argv + [f"from_results={tmp_path / 'runs' / 'record.json'}", f"out={tmp_path / 'again'}"])
    assert (tmp_path / "again" / "optimisation_table.md").read_text() == text


def test_probe_table_names_the_model_of_non_default_records():
    """A probe record mixes the VP model's pairs (keys without a model, as before) and other models'
    (model/method/solver/nfe): the table sorts by model and names the other model."""
    from experiments.schedule_opt.probe import table

    cell = {"error": 0.4, "calibration_rmse_to_teacher": 0.25, "sigmas": [float("inf"), 10.0, 1.0, 0.0]}
    record = {"bundled_flow/ld3/euler/8": {"pair": "ld3/euler", "model": "bundled_flow", "nfe": 8.0, **cell},
              "oss/unipc/5": {"pair": "oss/unipc", "nfe": 5, **cell, "sigmas": [5.13, 1.0, 0.0]}}
    rows = table(record).splitlines()[2:]
    assert rows[0].startswith("| oss/unipc | 5 | 5.13 |")
    assert rows[1].startswith("| bundled_flow: ld3/euler | 8 | inf | 0.4 | 0.25 |")


def test_ratio_interval_is_a_paired_bootstrap():
    from experiments.schedule_opt.common import ratio_interval

    rng = __import__("random").Random(0)
    stock = [rng.uniform(0.1, 0.3) for _ in range(64)]
    assert ratio_interval(stock, [0.5 * v for v in stock]) == pytest.approx([0.5, 0.5], abs=1e-12)  # paired: no spread
    noisy = [v * rng.uniform(0.3, 1.1) for v in stock]
    lo, hi = ratio_interval(stock, noisy)
    point = math.sqrt(sum(v * v for v in noisy) / sum(v * v for v in stock))
    assert lo < point < hi < 1.0 and ratio_interval(stock, noisy) == [lo, hi]  # seeded: the same interval again
    with pytest.raises(ValueError, match="same held-out samples"):
        ratio_interval(stock, noisy[:-1])


def test_a_method_spec_may_set_its_own_calibration_size(tmp_path):
    from experiments.harness import Experiment
    from experiments.schedule_opt.__main__ import HERE, Study

    cfg = Experiment.compose(HERE, ["fine.mixture=10", "calibration.num_samples.mixture=4", f"runs={tmp_path}",
                                    "+method_specs.gits_six={method: gits, samples: 6}"]).cfg
    s = Study(cfg, "mixture", tmp_path)
    assert s.optimise("gits_six", "euler", [4], 1000, "")["content"]["calibration"]["num_samples"] == 6
    assert s.optimise("gits", "euler", [4], 1000, "")["content"]["calibration"]["num_samples"] == 4



def test_a_flow_models_reference_may_be_a_many_step_solver_from_t_1(tmp_path):
    """From σ = ∞ the reference is the configured solver on the model's own grid (there is no exponential grid from
    there), and grids from ∞ are measured against it from the same x_T."""
    import json
    import math

    from experiments.harness import Experiment
    from experiments.schedule_opt.__main__ import HERE, Study

    cfg = Experiment.compose(HERE, ["heldout.num_samples.bundled_flow=2", "heldout.batch_size=1", f"runs={tmp_path}",
                                    "reference.bundled_flow.steps=6"]).cfg
    s = Study(cfg, "bundled_flow", tmp_path)
    assert math.isinf(s.sigma_max) and s.ref_nfe == 6
    conf = json.loads((tmp_path / "bundled_flow" / "reference" / "record.json").read_text())["config"]
    assert conf["solver"]["_target_"].endswith("UniPC") and conf["schedule"]["_target_"].endswith("FlowMatch")
    same = s.error(["solver=unipc", "schedule=flow_match", "steps=6"], "unipc6")  # the reference's own sampler
    assert math.isinf(same["sigmas"][0]) and "own_reference" not in same and same["error"] < 1e-5
    other = s.error(["solver=euler", "schedule=flow_match", "steps=6"], "euler6")
    assert math.isinf(other["sigmas"][0]) and other["error"] > 1e-3
    # a learned grid whose first evaluation is finite (first_sigma: x_T = 30·ε there) is judged against the same
    # reference from t = 1, not one of its own
    from framework.runs.schedule_file import read_schedule_file, write_schedule_file

    content = dict(read_schedule_file(HERE / "learned_fits" / "bundled_flow_learned_fset.json"))
    g = dict(content["grids"]["6"])
    c = g["coefficients"]
    g.update(sigmas=[30.0, *g["sigmas"][1:]], init_noise=30.0, coefficients={**c, "e": [v / 30.0 for v in c["e"]]})
    content["grids"] = {"6": g}
    write_schedule_file(file := tmp_path / "first30.json", content)
    first = s.error(["solver=learned", "schedule=optimized", f"schedule.file={file}", "steps=6"], "first30")
    assert first["sigmas"][0] == 30.0 and "own_reference" not in first and "skipped" not in first and first["error"] > 1e-3
    assert len(s.refs) == 1
    # batches of one (heldout.batch_size) draw the x_T of one batch of two
    import torch

    from experiments.schedule_opt.common import base_overrides
    from framework.entry.api import run

    one = run(base_overrides("bundled_flow", "float32", list(cfg.heldout.prompts), int(cfg.heldout.seed), 2)
              + ["solver=unipc", "schedule=flow_match", "steps=6"], output_dir=tmp_path / "one_batch")
    assert torch.equal(one.x_T.cpu(), s.main_reference.x_T.cpu())
    assert torch.allclose(one.latents.cpu(), s.main_reference.latents.cpu(), atol=1e-4)


def test_cfg_probe_runs_a_file_at_other_scales(tmp_path):
    """experiments.schedule_opt.cfg_probe: a schedule file made at CFG 5 runs at other scales, each against its own
    reference and stock samplers; the ratio is the file's error over the best stock sampler's."""
    import json
    import math

    from experiments.schedule_opt import cfg_probe
    from experiments.schedule_opt.__main__ import HERE

    from framework.runs.schedule_file import read_schedule_file, write_schedule_file

    six = dict(read_schedule_file(HERE / "learned_fits" / "bundled_flow_learned_fset.json"))  # its NFE 6 alone
    six["grids"] = {"6": six["grids"]["6"]}
    six.pop("checksum", None)
    write_schedule_file(file := tmp_path / "bundled_flow_learned_fset.json", six)
    out = tmp_path / "r.json"
    rec = cfg_probe.main(["model=bundled_flow", "solver=learned", "scales=3,7.5", "n=2", f"file={file}", "stock=euler",
                          "stock_schedules=flow_match", f"runs={tmp_path}", f"out={out}", "reference.bundled_flow.steps=6"])
    assert set(rec) == {f"bundled_flow/cfg{s}/bundled_flow_learned_fset/6" for s in ("3", "7.5")}
    for v in rec.values():
        assert v["stock_best"] == "euler + flow_match" and v["heldout_samples"] == 2
        assert math.isclose(v["ratio"], v["error"] / v["stock_error"], rel_tol=1e-12)
    a, b = rec["bundled_flow/cfg3/bundled_flow_learned_fset/6"], rec["bundled_flow/cfg7.5/bundled_flow_learned_fset/6"]
    assert abs(a["error"] - b["error"]) > 1e-4  # each scale its own runs and reference
    assert json.loads(out.read_text()) == rec


def test_first_sigma_scan_matches_the_tool(tmp_path):
    """The scan's greedy fit with the first evaluation at σ 30 is the tool's (method=learned coef_init=greedy
    first_sigma=30 on the same grid, calibration set and teacher): the same calibration RMSE."""
    import math

    from experiments.harness import Experiment
    from experiments.schedule_opt import first_sigma_scan
    from experiments.schedule_opt.__main__ import HERE
    from framework.tools.schedule_opt import Calibration, Options, optimize

    file = HERE / "learned_fits" / "bundled_flow_learned_ftr.json"
    rec = first_sigma_scan.main([f"file={file}", "nfe=5", "sigmas=inf,30", "samples=2", "fine=6", "threads=1",
                                 f"out={tmp_path / 'scan.json'}"])
    assert set(rec["first_sigma"]) == {"inf", "30"} and (tmp_path / "scan.json").is_file()
    cal = Experiment.compose(HERE, []).cfg.calibration
    content, _ = optimize(Options(method="learned", nfe=[5], init=str(file), coef_init="greedy", consistent=True, guidance_terms=True,
                                  iterations=1, fine=6, fine_top=100.0, teacher_substeps=2, first_sigma=30.0, progress=False, plot=False,
                                  out=str(tmp_path / "f.json"), calibration=Calibration(list(cal.prompts), int(cal.seed), 2)),
                          ["model=bundled_flow", "dtype=float32", "solver=learned"], log=lambda s: None)
    assert math.isclose(content["grids"]["5"]["calibration_rmse_to_teacher"], rec["first_sigma"]["30"]["rmse"], rel_tol=1e-6)
