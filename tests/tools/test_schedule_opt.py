"""samplerlab-optimize-schedule (framework/tools/schedule_opt.py), schedule files and schedule=optimized."""
from __future__ import annotations

import itertools
import json
import math
import random
import warnings
from dataclasses import replace

import pytest
import torch

from framework.core.errors import ConfigError
from framework.entry.api import run
from framework.runs.schedule_file import read_schedule_file, write_schedule_file
from framework.tools import schedule_opt
from framework.tools.schedule_opt import Calibration, Options, dp_path, optimize

MIX = ["model=gaussian", "dtype=float64", "guidance=[]", "device=cpu"]  # exact solution in closed form: cheap tests
SMALL = dict(fine=12, teacher="reference", teacher_substeps=1, teacher_rtol=1e-8, progress=False, plot=False,
             calibration=Calibration(seed=1000, num_samples=4))


@pytest.mark.parametrize("last,steps,seed", [(7, 3, 0), (8, 4, 1), (6, 6, 2), (9, 1, 3), (9, 5, 4)])
def test_dp_finds_the_exact_optimum_of_a_toy_cost(last, steps, seed):
    rng = random.Random(seed)
    cost = {(i, j): rng.random() for i in range(last) for j in range(i + 1, last + 1)}
    path, value = dp_path(lambda i, j: cost[(i, j)], last, steps)
    brute = min((sum(cost[(a, b)] for a, b in zip((0, *mid, last), (*mid, last))), (0, *mid, last))
                for mid in itertools.combinations(range(1, last), steps - 1))
    assert path == list(brute[1]) and math.isclose(value, brute[0], rel_tol=1e-12)
    assert len(path) == steps + 1 and path[0] == 0 and path[-1] == last


def test_dp_refuses_an_impossible_path():
    with pytest.raises(ValueError):
        dp_path(lambda i, j: 1.0, 3, 4)


@pytest.fixture(scope="module")
def mixture_files(tmp_path_factory):
    """GITS and OSS grids for euler at NFE 4 on the Gaussian (calibration seed 1000)."""
    root = tmp_path_factory.mktemp("sched")
    out = {}
    for method in ("gits", "oss"):
        content, path = optimize(Options(method=method, nfe=[4], out=str(root / f"{method}.json"), **SMALL),
                                 MIX + ["solver=euler"], log=lambda s: None)
        out[method] = (content, path)
    return out


@pytest.mark.parametrize("method", ["gits", "oss"])
def test_optimised_grid_beats_karras_for_euler_on_the_gaussian(mixture_files, method, tmp_path):
    """Held-out seed 0 (calibration used 1000): error to the exact solution (the built-in
    rmse_to_reference), optimised grid vs karras, both 4 steps = 4 NFE."""
    content, path = mixture_files[method]
    assert content["grids"]["4"]["steps"] == 4
    base = MIX + ["solver=euler", "steps=4", "seed=0", "num_samples=8", "batch_size=8", "callback=[]"]
    karras = run(base + ["schedule=karras"]).record["metrics"]
    opt = run(base + ["schedule=optimized", f"schedule.file={path}"]).record["metrics"]
    assert opt["nfe"] == karras["nfe"] == 4
    # demand a 25 % gain at least (measured: see the printed figures)
    print(method, opt["rmse_to_reference"], karras["rmse_to_reference"])
    assert opt["rmse_to_reference"] < 0.75 * karras["rmse_to_reference"], (opt, karras)


def test_schedule_file_round_trips_and_the_plugin_uses_it(mixture_files):
    content, path = mixture_files["gits"]
    again = read_schedule_file(path)
    assert again["grids"] == content["grids"] and again["model"]["fingerprint"] == content["model"]["fingerprint"]
    for key in ("solver", "method", "calibration", "settings"):
        assert again[key] == content[key]
    res = run(MIX + ["solver=euler", "steps=4", "num_samples=2", "batch_size=2", "callback=[]", "schedule=optimized",
                     f"schedule.file={path}"])
    assert list(res.schedule.sigmas) == content["grids"]["4"]["sigmas"]
    assert res.schedule.sigmas[0] == 80.0 and res.schedule.sigmas[-1] == 0.0
    assert content["grids"]["4"]["seconds"] > 0 and content["grids"]["4"]["optimiser_nfe"] > 0


def test_rerun_resumes_from_the_file(mixture_files):
    content, path = mixture_files["gits"]
    said = []
    again, _ = optimize(Options(method="gits", nfe=[4], out=str(path), **SMALL), MIX + ["solver=euler"], log=said.append)
    assert again["grids"] == content["grids"] and any("resuming" in s for s in said)


def test_another_budget_or_other_settings_lose_nothing(mixture_files, tmp_path):
    """A rerun for another budget adds it to the file (the earlier budget stays); a rerun with other settings
    moves the earlier file aside instead of overwriting it."""
    content, path = mixture_files["gits"]
    copy = tmp_path / "g.json"
    copy.write_bytes(path.read_bytes())
    both, _ = optimize(Options(method="gits", nfe=[3], out=str(copy), **SMALL), MIX + ["solver=euler"], log=lambda s: None)
    assert set(both["grids"]) == {"3", "4"} and both["grids"]["4"] == content["grids"]["4"]
    said = []
    optimize(Options(method="gits", nfe=[3], out=str(copy), **{**SMALL, "fine": 10}), MIX + ["solver=euler"], log=said.append)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("g.replaced-")]
    assert len(moved) == 1 and set(read_schedule_file(moved[0])["grids"]) == {"3", "4"}
    assert set(read_schedule_file(copy)["grids"]) == {"3"} and any("moved to" in s for s in said)


@pytest.mark.parametrize("rel,resumes", [(3e-9, True), (1e-3, False)])
def test_a_file_made_on_another_device_resumes(mixture_files, tmp_path, rel, resumes):
    """The model's σ range may differ in the last bits on a GPU, and the device is not part of the settings:
    such a file resumes; a σ range that differs beyond float32 rounding does not."""
    content, path = mixture_files["gits"]
    other = dict(read_schedule_file(path))
    other["model"] = {**other["model"], "sigma_min": other["model"]["sigma_min"] * (1 + rel)}
    other.pop("checksum", None)
    moved = tmp_path / "gpu.json"
    write_schedule_file(moved, other)
    said = []
    overrides = [o for o in MIX if not o.startswith("device=")] + ["solver=euler", "device=cpu"]
    optimize(Options(method="gits", nfe=[4], out=str(moved), **SMALL), overrides, log=said.append)
    assert any("resuming" in s for s in said) is resumes


def one_line_error(capsys, argv) -> str:
    assert schedule_opt.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("samplerlab-optimize-schedule: error:"), err
    return err


def test_budget_the_solver_cannot_meet_is_one_line_exit_2(capsys, tmp_path):
    err = one_line_error(capsys, ["method=gits", "solver=heun", "nfe=[5,6]", f"out={tmp_path / 'h.json'}", *MIX,
                                  "fine=8", "progress=false", "plot=false"])
    assert "NFE 6 is not reachable" in err and "5, 7" in err
    assert not (tmp_path / "h.json").exists()  # refused before any work


def test_bad_options_are_one_line(capsys, tmp_path):
    assert "choose from" in one_line_error(capsys, ["method=nope", *MIX])
    assert "not an override" in one_line_error(capsys, ["gits"])


def test_per_nfe_options_in_one_call_share_its_teacher(tmp_path):
    """``per_nfe``: each budget runs with its own options, the grids those of separate calls, from one teacher where
    the teacher's keys agree (a budget with its own fine grid makes its own); the options are part of the file's
    settings (a rerun with the same resumes, with others moves the file aside)."""
    solver = MIX + ["solver=dpmpp_2m"]
    teachers: dict = {}
    both, path = optimize(Options(method="gits", nfe=[4, 6], out=str(tmp_path / "b.json"), per_nfe={"6": {"history": True}},
                                  **SMALL), solver, log=lambda s: None, teachers=teachers)
    four, _ = optimize(Options(method="gits", nfe=[4], out=str(tmp_path / "4.json"), **SMALL), solver, log=lambda s: None)
    six, _ = optimize(Options(method="gits", nfe=[6], out=str(tmp_path / "6.json"), history=True, **SMALL), solver,
                      log=lambda s: None)
    assert both["grids"]["4"]["sigmas"] == four["grids"]["4"]["sigmas"]
    assert both["grids"]["6"]["sigmas"] == six["grids"]["6"]["sigmas"]
    assert len(teachers) == 1 and both["teacher_nfe"] == four["teacher_nfe"]
    assert both["settings"]["per_nfe"] == {"6": {"history": True}} and "per_nfe" not in four["settings"]
    said: list[str] = []
    optimize(Options(method="gits", nfe=[4, 6], out=str(path), per_nfe={6: {"history": True}}, **SMALL), solver, log=said.append)
    assert any("resuming" in s and "4, 6" in s for s in said)  # (YAML's int keys are the same budget)
    own, _ = optimize(Options(method="gits", nfe=[4, 6], out=str(tmp_path / "f.json"), per_nfe={"6": {"fine": 10}},
                              **SMALL), solver, log=lambda s: None)
    assert own["teacher_nfe"] > four["teacher_nfe"]  # two teachers: the 12-point fine grid's and the 10-point one's
    assert len(own["grids"]["6"]["sigmas"]) == 7


def test_per_nfe_on_the_command_line(capsys, tmp_path):
    out = tmp_path / "c.json"
    assert schedule_opt.main(["method=gits", "solver=euler", "nfe=[3,4]", "per_nfe.4.history=true", f"out={out}", *MIX,
                              "fine=10", "teacher=reference", "teacher_substeps=1", "progress=false", "plot=false",
                              "calibration.num_samples=2"]) == 0
    content = read_schedule_file(out)
    assert content["settings"]["per_nfe"] == {"4": {"history": True}} and set(content["grids"]) == {"3", "4"}


def test_bad_per_nfe_options_are_one_line(capsys, tmp_path):
    base = ["method=gits", "solver=euler", "nfe=[4,6]", f"out={tmp_path / 'p.json'}", *MIX, "progress=false", "plot=false"]
    assert "per_nfe.5: not a budget of nfe=[4, 6]" in one_line_error(capsys, base + ["per_nfe.5.history=true"])
    assert "not method" in one_line_error(capsys, base + ["per_nfe.6.method=oss"])
    assert "per_nfe.6.fined: no such option" in one_line_error(capsys, base + ["per_nfe.6.fined=3"])
    assert "per_nfe.6" in one_line_error(capsys, base + ["per_nfe.6.fine=many"])
    assert "per_nfe.6: consistent=, guidance_terms=" in one_line_error(capsys, base + ["per_nfe.6.sample_power=1"])
    assert "per_nfe.4: fine=2" in one_line_error(capsys, base + ["per_nfe.4.fine=2"])
    assert not (tmp_path / "p.json").exists()


def test_fingerprint_mismatch_is_an_error_or_a_warning(mixture_files):
    _, path = mixture_files["gits"]
    other = [o for o in MIX] + ["model.std=2.0", "solver=euler", "steps=4", "num_samples=1", "batch_size=1", "callback=[]",
                                "schedule=optimized", f"schedule.file={path}"]
    with pytest.raises(ConfigError, match="was made for model gaussian weights .*schedule.on_mismatch=warn"):
        run(other)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(other + ["schedule.on_mismatch=warn"])
    assert any("was made for model gaussian weights" in str(w.message) for w in caught)


def test_corrupt_missing_and_absent_nfe_are_one_line(mixture_files, tmp_path):
    content, path = mixture_files["gits"]
    base = MIX + ["solver=euler", "num_samples=1", "batch_size=1", "callback=[]", "schedule=optimized"]
    bad = tmp_path / "bad.json"
    bad.write_text(path.read_text()[:-40])
    for file, steps, want in ((bad, 4, "not readable JSON"), (tmp_path / "none.json", 4, "not found"),
                              (path, 7, "no grid with steps=7")):
        with pytest.raises(ConfigError, match=want) as e:
            run(base + [f"schedule.file={file}", f"steps={steps}"])
        assert "\n" not in str(e.value)
    tampered = json.loads(path.read_text())
    tampered["grids"]["4"]["sigmas"][1] *= 1.01
    (tmp_path / "t.json").write_text(json.dumps(tampered))
    with pytest.raises(ConfigError, match="damaged"):
        read_schedule_file(tmp_path / "t.json")
    with pytest.raises(ConfigError, match="needs schedule.file="):
        run(base + ["steps=4"])
    with pytest.raises(ConfigError, match="has no grid for NFE 9"):
        run(base + [f"schedule.file={path}", "steps=4", "schedule.nfe=9"])


def test_write_refuses_nothing_and_read_checks_order(tmp_path):
    p = tmp_path / "s.json"
    write_schedule_file(p, {"model": {"name": "m", "fingerprint": "x"}, "grids": {"2": {"steps": 2, "sigmas": [3.0, 1.0, 0.0]}}})
    assert read_schedule_file(p)["grids"]["2"]["sigmas"] == [3.0, 1.0, 0.0]
    write_schedule_file(p, {"model": {"name": "m", "fingerprint": "x"}, "grids": {"2": {"steps": 2, "sigmas": [1.0, 3.0, 0.0]}}})
    with pytest.raises(ConfigError, match="strictly decreasing"):
        read_schedule_file(p)


@pytest.mark.parametrize("solver,steps", [("dpmpp_2m", 3), ("unipc", 4)])
def test_history_aware_gits_is_the_exact_optimum_of_its_cost(solver, steps):
    """gits history=true: the pair DP's path and value equal a brute force over every path of the
    same cost (first step + steps carrying one step of history), on a 7-point fine grid."""
    from framework.tools.schedule_opt import Sampler, fine_grid, gits_history, history_costs, make_teacher

    s = Sampler(MIX + [f"solver={solver}", "seed=1000", "num_samples=4", "batch_size=4", "callback=[]"])
    teacher = make_teacher(s, fine_grid(s.sigma_max, s.sigma_min, 6), "reference", 1, 1e-8)
    grid, value = gits_history(s, teacher, steps)
    first, local = history_costs(s, teacher, steps)
    last = len(teacher.fine) - 1

    def cost(path):
        return first(path[1]) + sum(local(a, b, c) for a, b, c in zip(path, path[1:], path[2:]))

    brute = min((cost((0, *mid, last)), (0, *mid, last)) for mid in itertools.combinations(range(1, last), steps - 1))
    assert grid == [teacher.fine[q] for q in brute[1]] and math.isclose(value, brute[0], rel_tol=1e-12)


def test_tpe_baseline_finds_a_grid_and_records_its_trials(tmp_path):
    pytest.importorskip("optuna")
    content, _ = optimize(Options(method="tpe", nfe=[3], trials=8, out=str(tmp_path / "t.json"), **SMALL),
                          MIX + ["solver=euler"], log=lambda s: None)
    g = content["grids"]["3"]
    assert g["steps"] == 3 and g["sigmas"][-1] == 0.0 and all(a > b for a, b in zip(g["sigmas"], g["sigmas"][1:]))
    assert content["settings"]["trials"] == 8
    # the objective is the final RMSE to the teacher of the grid it returns
    assert math.isclose(g["objective"], g["calibration_rmse_to_teacher"], rel_tol=1e-9)


def test_start_below_sigma_max_is_the_grid_s_first_point_and_the_run_s_x_T(tmp_path):
    """start=σ_0: every grid starts there (x_T = σ_0·ε, recorded as init_noise), and a run of the
    file starts from that x_T; start=leading needs a discrete model (one line on the Gaussian)."""
    content, path = optimize(Options(method="oss", nfe=[3], start="5.0", out=str(tmp_path / "s.json"), **SMALL),
                             MIX + ["solver=euler"], log=lambda s: None)
    g = content["grids"]["3"]
    assert g["sigmas"][0] == 5.0 and g["init_noise"] == 5.0 and len(g["sigmas"]) == 4
    base = MIX + ["solver=euler", "steps=3", "seed=0", "num_samples=2", "batch_size=2", "callback=[]"]
    res = run(base + ["schedule=optimized", f"schedule.file={path}"])
    plain = run(base + ["schedule=karras"])
    assert res.schedule.sigmas[0] == 5.0
    assert math.isclose(float(res.x_T.abs().max()) * plain.schedule.sigmas[0], float(plain.x_T.abs().max()) * 5.0, rel_tol=1e-9)
    with pytest.raises(ConfigError, match="discrete"):
        optimize(Options(method="oss", nfe=[3], start="leading", out=str(tmp_path / "l.json"), **SMALL),
                 MIX + ["solver=euler"], log=lambda s: None)
    with pytest.raises(ConfigError, match="start="):
        Options(start="high").check()


@pytest.mark.parametrize("method,history", [("gits", False), ("gits", True), ("oss", False), ("ld3", False)])
def test_final_sigma_min_pins_the_last_step_at_sigma_min(method, history, tmp_path):
    """final=sigma_min: every grid takes its last step to 0 from the model's σ_min (the stock grids'
    near-free final step), its other points optimised; the NFE stays the budget's."""
    opts = Options(method=method, history=history, nfe=[4], final="sigma_min", iterations=2, out=str(tmp_path / "p.json"),
                   **SMALL)
    content, path = optimize(opts, MIX + ["solver=dpmpp_2m"], log=lambda s: None)
    g = content["grids"]["4"]
    s_min = content["model"]["sigma_min"]
    assert g["steps"] == 4 and g["nfe"] == 4 and g["sigmas"][-1] == 0.0
    assert math.isclose(g["sigmas"][-2], s_min, rel_tol=1e-12) and g["sigmas"][-3] > s_min * 1.005
    assert content["settings"]["final"] == "sigma_min"
    res = run(MIX + ["solver=dpmpp_2m", "steps=4", "num_samples=1", "batch_size=1", "callback=[]", "schedule=optimized",
                     f"schedule.file={path}"])
    assert res.record["metrics"]["nfe"] == 4


def test_pinned_gits_is_the_best_path_through_sigma_min():
    """The pinned DP's value is the brute-force least summed cost over the paths through σ_min, and
    never below the free DP's (it searches a subset)."""
    from framework.tools.schedule_opt import Sampler, fine_grid, gits, make_teacher

    s = Sampler(MIX + ["solver=euler", "seed=1000", "num_samples=4", "batch_size=4", "callback=[]"])
    teacher = make_teacher(s, fine_grid(s.sigma_max, s.sigma_min, 7), "reference", 1, 1e-8)
    free_grid, free = gits(s, teacher, 3)
    grid, value = gits(s, teacher, 3, pinned=True)
    fine, last = teacher.fine, len(teacher.fine) - 1

    def cost(path):
        return sum(schedule_opt.rmse(s.step(schedule_opt._fine_node(teacher, a), fine[b], 1 if b == last else 2).x,
                                     teacher.x[b]) for a, b in zip(path, path[1:]))

    brute = min((cost((0, m, last - 1, last)), (0, m, last - 1, last)) for m in range(1, last - 1))
    assert grid == [fine[q] for q in brute[1]] and math.isclose(value, brute[0], rel_tol=1e-12)
    assert value >= free - 1e-12 and grid[-2] == fine[-2]
    with pytest.raises(ConfigError, match="at least 2 steps"):
        gits(s, teacher, 1, pinned=True)


def test_bad_final_is_one_line(capsys):
    assert "final=" in one_line_error(capsys, ["final=zero", *MIX])


def test_objective_and_leading_k_options_are_checked(capsys):
    assert "objective=" in one_line_error(capsys, ["objective=fd", *MIX])
    assert "leading:<steps" in one_line_error(capsys, ["start=leading:x", *MIX])
    Options(start="leading:4", objective="image_grad").check()


def test_image_objective_needs_a_decoder(tmp_path):
    with pytest.raises(ConfigError, match="no decoder"):
        optimize(Options(method="ld3", nfe=[3], objective="image", out=str(tmp_path / "i.json"), **SMALL),
                 MIX + ["solver=euler"], log=lambda s: None)


def test_final_loss_image_grad_sees_edges_not_offsets():
    """The edge-sensitive error is 0 at the target and for a uniform offset of the decoded image
    (finite differences cancel it), which the image RMSE charges in full (a stand-in decoder:
    nearest upsampling of three latent channels)."""
    import torch

    class Model:
        has_decoder = True

        def decode(self, x):
            return torch.nn.functional.interpolate(x[:, :3], scale_factor=4)

    class S:
        model = Model()

    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grad, image = schedule_opt.final_loss(S(), target, "image_grad"), schedule_opt.final_loss(S(), target, "image")
    assert grad(target) < 1e-12 and image(target) < 1e-12
    assert grad(target + 0.3) < 1e-12 and math.isclose(image(target + 0.3), 0.3, rel_tol=1e-9)
    blurred = torch.nn.functional.avg_pool2d(target, 3, 1, 1, count_include_pad=False)
    assert grad(blurred) > 0.1
    assert math.isclose(schedule_opt.final_loss(S(), target, "latent")(blurred), schedule_opt.rmse(blurred, target))


def test_ld3_from_a_stock_grid_keeps_its_points_or_maps_its_shape(tmp_path):
    """init=karras: from σ_max the karras grid itself is the start (0 iterations leave it); from a
    lower start with too few karras points below it, the grid's log σ is mapped affinely onto
    [its last nonzero σ, σ_0] (first point σ_0, last nonzero point kept)."""
    from framework.tools.schedule_opt import stock_grid

    base = dict(SMALL, iterations=0, init="karras")
    content, _ = optimize(Options(method="ld3", nfe=[4], out=str(tmp_path / "k.json"), **base), MIX + ["solver=euler"],
                          log=lambda s: None)
    g = content["grids"]["4"]["sigmas"]
    model = schedule_opt.Sampler(MIX + ["solver=euler", "num_samples=1", "batch_size=1", "callback=[]"]).model
    karras = stock_grid("karras", model, 4)
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(g, karras))
    content, _ = optimize(Options(method="ld3", nfe=[4], start="5.0", out=str(tmp_path / "m.json"), **base),
                          MIX + ["solver=euler"], log=lambda s: None)
    m = content["grids"]["4"]["sigmas"]
    a, b = math.log(karras[0]), math.log(karras[-2])
    want = [5.0] + [math.exp(b + (math.log(v) - b) * (math.log(5.0) - b) / (a - b)) for v in karras[1:-1]] + [0.0]
    assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(m, want)) and math.isclose(m[-2], karras[-2], rel_tol=1e-9)


FLOW = ["model=gaussian", "model.parametrization=flow", "schedule=custom", "schedule.sigmas=[inf,1.0,0.0]", "steps=2",
        "dtype=float64", "guidance=[]", "device=cpu"]  # the flow twin, its grids from σ = ∞ (t = 1)


@pytest.mark.parametrize("method", ["gits", "oss", "ld3"])
def test_grids_of_a_model_that_starts_at_infinity_start_there(method, tmp_path):
    """A model whose grid starts at σ = ∞ (a flow model's t = 1) gets grids from ∞ with x_T = ε
    (init_noise 1); the file runs through schedule=optimized from the same x_T as the model's own
    grid, and on a held-out seed beats ∞ followed by the karras points of the same NFE (Euler,
    error to the exact solution). AYS's KLUB has no term from ∞: one line."""
    content, path = optimize(Options(method=method, nfe=[3], out=str(tmp_path / "f.json"), iterations=5, **SMALL),
                             FLOW + ["solver=euler"], log=lambda s: None)
    g = content["grids"]["3"]
    assert math.isinf(g["sigmas"][0]) and g["init_noise"] == 1.0 and len(g["sigmas"]) == 4
    assert all(math.isfinite(s) for s in g["sigmas"][1:]) and g["sigmas"][1] <= content["model"]["sigma_max"]
    base = FLOW[:2] + ["dtype=float64", "guidance=[]", "solver=euler", "steps=3", "seed=0", "num_samples=8",
                       "batch_size=8", "callback=[]"]
    opt = run(base + ["schedule=optimized", f"schedule.file={path}"])
    karras = run(FLOW[:2] + ["schedule=karras", "steps=3", "dtype=float64"]).schedule.sigmas
    stock = run(base + ["schedule=custom", "schedule.sigmas=[inf," + ",".join(map(str, karras[1:])) + "]"])
    assert opt.schedule.from_infinity and torch.equal(opt.x_T, stock.x_T)  # the same draw, x_T = ε
    e_opt, e_stock = (r.record["metrics"]["rmse_to_reference"] for r in (opt, stock))
    print(method, e_opt, e_stock)
    assert e_opt < 0.75 * e_stock and opt.record["metrics"]["nfe"] == stock.record["metrics"]["nfe"] == 3
    with pytest.raises(ConfigError, match="KLUB has no term from σ = ∞"):
        optimize(Options(method="ays", nfe=[3], out=str(tmp_path / "a.json"), **SMALL), FLOW + ["solver=euler"],
                 log=lambda s: None)


def test_fine_top_caps_the_fine_grid_of_a_grid_from_infinity(tmp_path):
    """fine_top: the largest finite fine σ of a grid from ∞ (the flow model's σ_max is 1598, t = 0.9994:
    a log-uniform lattice from there wastes its points), so GITS picks its points at or below it."""
    content, _ = optimize(Options(method="gits", nfe=[3], fine_top=4.0, out=str(tmp_path / "t.json"), **SMALL),
                          FLOW + ["solver=euler"], log=lambda s: None)
    sig = content["grids"]["3"]["sigmas"]
    assert math.isinf(sig[0]) and max(sig[1:]) <= 4.0 * (1 + 1e-12) and content["settings"]["fine_top"] == 4.0
    with pytest.raises(ConfigError, match="fine_top"):
        Options(fine_top=-1.0).check()


def test_euler_as_linear_is_euler_from_a_finite_start_and_from_infinity():
    """Euler's steps written as x_{j+1} = e_j·x_T + Σ b_jk·D_k (solver=learned's form) give Euler's
    states to rounding, with arbitrary D's; from ∞ the limit step x₁ = D₀ + σ₁·ε."""
    from framework.maths.multistep import euler_as_linear, linear_update

    g = torch.Generator().manual_seed(0)
    for sig in ([14.6, 5.0, 1.7, 0.4, 0.0], [math.inf, 30.0, 4.0, 0.5, 0.0]):
        x_T = torch.randn(3, 4, generator=g, dtype=torch.float64)
        ds = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in sig[:-1]]
        e, b = euler_as_linear(sig)
        x = x_T
        for j, (a, s) in enumerate(zip(sig, sig[1:])):
            x = ds[j] + s * x if math.isinf(a) else x + (s - a) * (x - ds[j]) / a
            assert torch.allclose(linear_update(x_T, ds[: j + 1], e[j], b[j]), x, rtol=0, atol=1e-12)


def test_learned_solver_without_a_file_is_euler():
    base = MIX + ["steps=5", "num_samples=4", "batch_size=4", "callback=[]", "schedule=karras"]
    a, b = run(base + ["solver=euler"]), run(base + ["solver=learned"])
    assert b.record["metrics"]["nfe"] == a.record["metrics"]["nfe"] == 5
    assert torch.allclose(a.latents, b.latents, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def learned_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("learned") / "learned.json"
    opts = Options(method="learned", nfe=[4], init="karras", iterations=40, coef_lr=0.01, out=str(path),
                   **{**SMALL, "calibration": Calibration(seed=1000, num_samples=16)})
    return optimize(opts, MIX + ["solver=learned"], log=lambda s: None)


def test_learned_coefficients_beat_euler_on_their_grid_and_the_run_reproduces_the_fit(learned_file):
    """Held-out seed 0 (calibration 1000): the fitted coefficients on karras's 4-step grid against Euler
    on the same grid, both 4 NFE, error to the exact solution; on the calibration seed the run gives
    the tool's calibration RMSE (teacher: DOP853 at rtol 1e-8)."""
    content, path = learned_file
    g = content["grids"]["4"]
    assert g["steps"] == 4 and set(g["coefficients"]) == {"e", "b"} and [len(r) for r in g["coefficients"]["b"]] == [1, 2, 3, 4]
    base = MIX + ["steps=4", "callback=[]", "schedule=optimized", f"schedule.file={path}"]
    held = ["seed=0", "num_samples=16", "batch_size=16"]
    euler = run(base + held + ["solver=euler"]).record["metrics"]
    fitted = run(base + held + ["solver=learned"]).record["metrics"]
    assert fitted["nfe"] == euler["nfe"] == 4
    print("learned", fitted["rmse_to_reference"], "euler", euler["rmse_to_reference"])
    assert fitted["rmse_to_reference"] < 0.7 * euler["rmse_to_reference"], (fitted, euler)
    cal = run(base + ["seed=1000", "num_samples=16", "batch_size=16", "solver=learned"]).record["metrics"]
    assert math.isclose(cal["rmse_to_reference"], g["calibration_rmse_to_teacher"], rel_tol=1e-3, abs_tol=1e-6)


def test_learned_solver_and_method_refuse_what_does_not_fit(learned_file, tmp_path, mixture_files):
    _, path = learned_file
    base = MIX + ["num_samples=2", "batch_size=2", "callback=[]", "solver=learned", f"solver.file={path}"]
    with pytest.raises(ConfigError, match="fitted on its 4-step grid"):  # (the file's grid is karras's)
        run(base + ["schedule=exponential", "steps=4"])
    with pytest.raises(ConfigError, match="not steps=5"):
        run(base + ["schedule=karras", "steps=5"])
    with pytest.raises(ConfigError, match="holds no coefficients"):
        run(MIX + ["num_samples=2", "callback=[]", "solver=learned", "schedule=optimized",
                   f"schedule.file={mixture_files['gits'][1]}", "steps=4"])
    for method, solver in (("learned", "euler"), ("gits", "learned")):
        with pytest.raises(ConfigError, match="use them together"):
            optimize(Options(method=method, nfe=[4], out=str(tmp_path / "x.json"), **SMALL), MIX + [f"solver={solver}"])


def test_learned_coefficients_from_infinity(tmp_path):
    """A model whose grid starts at σ = ∞: without a file solver=learned takes Euler's limit step (equal to
    Euler's run to rounding); fitted from ∞ (x_T = ε) on the OSS grid, its coefficients beat Euler on that
    grid on a held-out seed (error to the exact solution)."""
    content, path = optimize(Options(method="learned", init="oss", nfe=[3], iterations=30, coef_lr=0.01,
                                     out=str(tmp_path / "l.json"), **SMALL), FLOW + ["solver=learned"], log=lambda s: None)
    g = content["grids"]["3"]
    assert math.isinf(g["sigmas"][0]) and g["init_noise"] == 1.0
    base = FLOW[:2] + ["dtype=float64", "guidance=[]", "steps=3", "seed=0", "num_samples=8", "batch_size=8", "callback=[]",
                       "schedule=optimized", f"schedule.file={path}"]
    euler = run(base + ["solver=euler"])
    plain = run(base + ["solver=learned", "solver.file=''"])
    fitted = run(base + ["solver=learned"])
    assert torch.allclose(plain.latents, euler.latents, rtol=0, atol=1e-12)
    e_fit, e_euler = (r.record["metrics"]["rmse_to_reference"] for r in (fitted, euler))
    print("from inf: learned", e_fit, "euler", e_euler)
    assert e_fit < 0.9 * e_euler


@pytest.mark.parametrize("first", [1.0, 3.0])
def test_first_sigma_evaluates_a_grid_from_infinity_first_at_a_finite_sigma(first, tmp_path):
    """first_sigma: at σ = ∞ the flow twin's D(ε, ∞) is the data mean 0 whatever ε, so the consistent one-step sampler
    (x = D₀) returns 0; with its first evaluation at σ = F on F·ε it returns D(F·ε, F) = F/(1 + F²)·ε. The exact solution
    from ∞ is ε (N(0, 1) data), so on any seed the error ratio to the fit from ∞ is exactly 1 − F/(1 + F²). The file's
    grid starts at F with x_T = F·ε (the same draw), and the engine runs it as fitted."""
    common = dict(method="learned", init="oss", nfe=[1], iterations=2, consistent=True, **SMALL)
    _, p_inf = optimize(Options(out=str(tmp_path / "inf.json"), **common), FLOW + ["solver=learned"], log=lambda s: None)
    content, p_first = optimize(Options(first_sigma=first, out=str(tmp_path / "f.json"), **common), FLOW + ["solver=learned"],
                                log=lambda s: None)
    g = content["grids"]["1"]
    assert g["sigmas"] == [first, 0.0] and g["init_noise"] == first and content["settings"]["first_sigma"] == first
    base = FLOW[:2] + ["dtype=float64", "guidance=[]", "steps=1", "seed=0", "num_samples=8", "batch_size=8", "callback=[]",
                       "solver=learned", "schedule=optimized"]
    a, b = (run(base + [f"schedule.file={p}"]) for p in (p_inf, p_first))
    assert torch.allclose(b.x_T, first * a.x_T, rtol=1e-12, atol=0)  # x_T = F·ε
    eps = a.x_T
    e_inf, e_first = (float((r.latents - eps).pow(2).mean().sqrt()) for r in (a, b))
    assert math.isclose(e_first / e_inf, 1 - first / (1 + first ** 2), rel_tol=1e-9), (e_first, e_inf)


def test_first_sigma_moves_with_learn_grid_and_refuses_bad_input(tmp_path):
    """learn_grid moves the first evaluation too: from F = 4 toward F = 1, where the one-step sampler above errs least
    (1 − F/(1 + F²)); first_sigma on a grid that does not start at ∞, on another method, beside start=, or not
    above the grid's next point: one clear error each."""
    content, _ = optimize(Options(method="learned", init="oss", nfe=[1], iterations=40, consistent=True, first_sigma=4.0,
                                  learn_grid=True, lr=0.1, out=str(tmp_path / "g.json"), **SMALL),
                          FLOW + ["solver=learned"], log=lambda s: None)
    f = content["grids"]["1"]["sigmas"][0]
    assert 0.5 < f < 2.0 and content["grids"]["1"]["init_noise"] == f, f
    # a first_sigma file continued (coef_init=init): its e weigh x_T = F·ε, the fit's x_T is ε — the same sampler back
    common = dict(method="learned", nfe=[3], consistent=True, coef_lr=0.01, first_sigma=3.0, **SMALL)
    a, pa = optimize(Options(init="oss", iterations=10, out=str(tmp_path / "a.json"), **common), FLOW + ["solver=learned"],
                     log=lambda s: None)
    b, _ = optimize(Options(init=str(pa), coef_init="init", iterations=1, out=str(tmp_path / "b.json"), **common),
                    FLOW + ["solver=learned"], log=lambda s: None)
    ga, gb = a["grids"]["3"], b["grids"]["3"]
    assert gb["sigmas"] == ga["sigmas"] and ga["sigmas"][0] == 3.0
    assert math.isclose(gb["calibration_rmse_to_teacher"], ga["calibration_rmse_to_teacher"], rel_tol=1e-9)
    assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(gb["coefficients"]["e"], ga["coefficients"]["e"]))
    with pytest.raises(ConfigError, match="first_sigma.*σ = ∞"):
        optimize(Options(method="learned", init="karras", nfe=[2], iterations=1, first_sigma=3.0, out=str(tmp_path / "m.json"),
                         **SMALL), MIX + ["solver=learned"], log=lambda s: None)
    with pytest.raises(ConfigError, match="above the grid's next point"):
        optimize(Options(method="learned", init="oss", nfe=[3], iterations=1, first_sigma=1e-3, out=str(tmp_path / "n.json"),
                         **SMALL), FLOW + ["solver=learned"], log=lambda s: None)
    for bad in (dict(method="gits", first_sigma=3.0), dict(method="learned", first_sigma=3.0, start="5.0"),
                dict(method="learned", first_sigma=-1.0)):
        with pytest.raises(ConfigError, match="first_sigma"):
            Options(**bad).check()


@pytest.mark.parametrize("flow", [False, True])
def test_consistent_learned_coefficients_are_exact_on_a_constant_denoiser(flow, tmp_path):
    """consistent=true: every fitted step keeps Σ_k b_jk = 1 − e_j (from ∞: 1), the last leaves no x_T (e = 0), so
    a denoiser that returns a constant gives that constant; the fit still beats Euler on its grid (held-out seed 0,
    error to the exact solution). Without it the fit is free (the held-out figures are printed)."""
    base_cfg = (FLOW + ["solver=learned"]) if flow else (MIX + ["solver=learned"])
    common = dict(method="learned", init="oss" if flow else "karras", nfe=[3 if flow else 4], iterations=30, coef_lr=0.01, **SMALL)
    content, path = optimize(Options(consistent=True, out=str(tmp_path / "c.json"), **common), base_cfg, log=lambda s: None)
    g = next(iter(content["grids"].values()))
    assert content["settings"]["consistent"] is True
    e, b = g["coefficients"]["e"], g["coefficients"]["b"]
    assert e[-1] == 0.0
    for ej, row in zip(e, b):
        assert math.isclose(sum(row), 1.0 if flow else 1.0 - ej, rel_tol=0, abs_tol=1e-12), (ej, row)
    steps = g["steps"]
    run_base = (FLOW[:2] + ["dtype=float64", "guidance=[]"] if flow else MIX) + [
        f"steps={steps}", "seed=0", "num_samples=8", "batch_size=8", "callback=[]", "schedule=optimized", f"schedule.file={path}"]
    euler, fitted = (run(run_base + [s]).record["metrics"]["rmse_to_reference"] for s in ("solver=euler", "solver=learned"))
    print("consistent", "flow" if flow else "vp", fitted, "euler", euler)
    assert fitted < 0.9 * euler
    if not flow:  # one consistent step has nothing free: x₁ = D₀
        one, _ = optimize(Options(**{**common, "nfe": [1]}, consistent=True, out=str(tmp_path / "one.json")), base_cfg, log=lambda s: None)
        assert one["grids"]["1"]["coefficients"] == {"e": [0.0], "b": [[1.0]]}
    with pytest.raises(ConfigError, match="consistent=, guidance_terms=, sample_power=, learn_grid=, first_sigma= and validation= are method=learned"):
        optimize(Options(method="gits", consistent=True, nfe=[4], out=str(tmp_path / "g.json"), **SMALL), MIX + ["solver=euler"])


def test_validation_holds_back_whole_prompts():
    from framework.tools.schedule_opt import validation_mask

    assert validation_mask([0, 1, 2, 0, 1, 2], 1 / 3).tolist() == [False, False, True, False, False, True]
    assert validation_mask([0, 0, 0, 0], 0.25).tolist() == [False, False, False, True]  # one prompt: by sample
    with pytest.raises(ConfigError, match="holds back all 2"):
        validation_mask([0, 1, 0, 1], 0.9)
    with pytest.raises(ConfigError, match="0 ≤ validation < 1"):
        Options(method="learned", validation=1.5).check()


def test_learned_fit_keeps_the_coefficients_best_on_the_held_back_samples(tmp_path):
    """validation=0.25 on 8 calibration samples: 2 are held back from the gradient, the kept step is the one best
    on them, and the fit stops `patience` steps after it; the coefficients still beat Euler on a held-out seed."""
    small = {**SMALL, "calibration": Calibration(seed=1000, num_samples=8)}
    content, path = optimize(Options(method="learned", init="karras", nfe=[4], iterations=60, coef_lr=0.01, validation=0.25,
                                     patience=15, out=str(tmp_path / "v.json"), **small), MIX + ["solver=learned"], log=lambda s: None)
    g = content["grids"]["4"]
    assert content["settings"]["validation"] == 0.25 and content["settings"]["patience"] == 15
    assert g["validation_samples"] == 2 and 1 <= g["kept_iteration"] <= g["iterations"] <= 60
    assert g["iterations"] == 60 or g["iterations"] - g["kept_iteration"] == 15
    assert 0 < g["validation_rmse"] < 1
    base = MIX + ["steps=4", "seed=0", "num_samples=8", "batch_size=8", "callback=[]", "schedule=optimized", f"schedule.file={path}"]
    euler, fitted = (run(base + [s]).record["metrics"]["rmse_to_reference"] for s in ("solver=euler", "solver=learned"))
    print("validation: learned", fitted, "euler", euler, "kept", g["kept_iteration"], "of", g["iterations"])
    assert fitted < 0.7 * euler


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_learned_coefficients_can_start_from_a_multistep_solver(solver, tmp_path):
    """coef_init=<solver>: its coefficients on the grid, recovered by least squares, reproduce that solver's
    run (the first Adam step is the start itself, kept with iterations=1); a stochastic solver is refused."""
    content, path = optimize(Options(method="learned", init="karras", coef_init=solver, nfe=[5], iterations=1,
                                     out=str(tmp_path / "l.json"), **SMALL), MIX + ["solver=learned"], log=lambda s: None)
    base = MIX + ["steps=5", "seed=0", "num_samples=4", "batch_size=4", "callback=[]", "schedule=optimized", f"schedule.file={path}"]
    a, b = run(base + [f"solver={solver}"]), run(base + ["solver=learned"])
    assert torch.allclose(a.latents, b.latents, rtol=0, atol=1e-9 * float(a.latents.abs().max()))
    with pytest.raises(ConfigError, match="not a fixed linear combination"):
        optimize(Options(method="learned", init="karras", coef_init="euler_ancestral", nfe=[5], iterations=1,
                         out=str(tmp_path / "s.json"), **SMALL), MIX + ["solver=learned"], log=lambda s: None)


@pytest.mark.parametrize("flow,consistent", [(False, True), (False, False), (True, True)])
def test_greedy_coefficients_are_exact_on_a_gaussian(flow, consistent, tmp_path):
    """coef_init=greedy (no Adam step): on a Gaussian every exact state is a multiple of x_T, as every D is, so the
    step-by-step least squares to the teacher's states (DOP853, rtol 1e-8) recovers the exact solution on a held-out
    seed, from σ_max and from ∞, free or consistent (Euler on the same grid: 0.1–0.5)."""
    cfg = FLOW if flow else MIX
    content, path = optimize(Options(method="learned", init="oss" if flow else "karras", coef_init="greedy", consistent=consistent,
                                     nfe=[3 if flow else 4], iterations=1, out=str(tmp_path / "g.json"), **SMALL),
                             cfg + ["solver=learned"], log=lambda s: None)
    g = next(iter(content["grids"].values()))
    if consistent:
        assert g["coefficients"]["e"][-1] == 0.0
    base = (FLOW[:2] + ["dtype=float64", "guidance=[]"] if flow else MIX) + [
        f"steps={g['steps']}", "seed=0", "num_samples=8", "batch_size=8", "callback=[]", "schedule=optimized", f"schedule.file={path}"]
    euler, fitted = (run(base + [s]).record["metrics"]["rmse_to_reference"] for s in ("solver=euler", "solver=learned"))
    print("greedy", flow, consistent, fitted, "euler", euler)
    # (the held-out reference's own tolerance is ~1e-6: the fit is exact to it, 10⁴ × below Euler)
    assert g["calibration_rmse_to_teacher"] < 1e-6 and fitted < 1e-4 * euler, (g["calibration_rmse_to_teacher"], fitted, euler)


def test_greedy_coefficients_beat_euler_on_a_mixture(tmp_path):
    """On the analytic mixture (the states are no longer multiples of x_T) the greedy fit on karras's 5-step grid
    beats Euler there by a wide margin on a held-out seed (error to the exact solution). Adam continues from it
    (``iterations`` > 1: the kept coefficients are no worse on the calibration set), and with ``validation`` the
    held-back prompts take no part in the least squares (other coefficients)."""
    cfg = ["model=mixture", "dtype=float64", "guidance=[]", "device=cpu"]
    common = dict(method="learned", init="karras", coef_init="greedy", consistent=True, nfe=[5],
                  **{**SMALL, "calibration": Calibration(seed=1000, num_samples=32)})
    content, path = optimize(Options(iterations=1, out=str(tmp_path / "g.json"), **common), cfg + ["solver=learned"], log=lambda s: None)
    base = cfg + ["steps=5", "seed=0", "num_samples=32", "batch_size=32", "callback=[]", "schedule=optimized", f"schedule.file={path}"]
    euler, fitted = (run(base + [s]).record["metrics"]["rmse_to_reference"] for s in ("solver=euler", "solver=learned"))
    print("greedy mixture", fitted, "euler", euler)
    assert fitted < 0.5 * euler, (fitted, euler)
    greedy = content["grids"]["5"]
    more, _ = optimize(Options(iterations=8, coef_lr=0.01, out=str(tmp_path / "a.json"), **common), cfg + ["solver=learned"], log=lambda s: None)
    assert more["grids"]["5"]["calibration_rmse_to_teacher"] <= greedy["calibration_rmse_to_teacher"] * (1 + 1e-9)
    val, _ = optimize(Options(iterations=1, validation=0.5, out=str(tmp_path / "v.json"), **common), cfg + ["solver=learned"], log=lambda s: None)
    e_all, e_val = greedy["coefficients"]["e"], val["grids"]["5"]["coefficients"]["e"]
    assert max(abs(a - b) for a, b in zip(e_all, e_val)) > 1e-6, (e_all, e_val)


def test_learned_grid_moves_with_the_coefficients_and_the_run_reproduces_the_fit(tmp_path):
    """``learn_grid``: Adam moves the grid's interior points with the coefficients; the file keeps the grid the kept
    coefficients were fitted on (the run on the calibration seed gives the tool's calibration RMSE), descending and
    below the start. From Euler's coefficients on karras's grid the joint fit ends nearer the teacher than the
    coefficients alone on the fixed grid (measured: calibration RMSE 0.19 against 0.40 after 12 steps)."""
    cfg = ["model=mixture", "dtype=float64", "guidance=[]", "device=cpu", "solver=learned"]
    common = dict(method="learned", init="karras", coef_init="euler", consistent=True, nfe=[4], iterations=12,
                  coef_lr=0.01, lr=0.05, **{**SMALL, "calibration": Calibration(seed=1000, num_samples=16)})
    fixed, _ = optimize(Options(out=str(tmp_path / "f.json"), **common), cfg, log=lambda s: None)
    moved, path = optimize(Options(out=str(tmp_path / "m.json"), learn_grid=True, **common), cfg, log=lambda s: None)
    a, b = fixed["grids"]["4"], moved["grids"]["4"]
    assert max(abs(math.log(x / y)) for x, y in zip(a["sigmas"][1:-1], b["sigmas"][1:-1])) > 1e-3, (a["sigmas"], b["sigmas"])
    assert b["sigmas"][0] == a["sigmas"][0] and all(x > y for x, y in zip(b["sigmas"], b["sigmas"][1:]))
    print("learn_grid", b["calibration_rmse_to_teacher"], "fixed grid", a["calibration_rmse_to_teacher"])
    assert b["calibration_rmse_to_teacher"] < 0.8 * a["calibration_rmse_to_teacher"]
    assert moved["settings"]["learn_grid"] is True and "learn_grid" not in fixed["settings"]
    cal = run(cfg + ["steps=4", "seed=1000", "num_samples=16", "batch_size=16", "callback=[]", "schedule=optimized",
                     f"schedule.file={path}"]).record["metrics"]
    assert math.isclose(cal["rmse_to_reference"], b["calibration_rmse_to_teacher"], rel_tol=1e-3, abs_tol=1e-6)


def test_learned_fit_continues_from_a_files_coefficients(learned_file, tmp_path):
    """coef_init=init: the init file's coefficients are the start (iterations=1 keeps them: the same calibration
    RMSE, the same coefficients); more steps never end worse (the best is kept); init must be such a file."""
    content, path = learned_file
    g = content["grids"]["4"]
    opts = dict(method="learned", init=str(path), coef_init="init", nfe=[4], coef_lr=0.01,
                **{**SMALL, "calibration": Calibration(seed=1000, num_samples=16)})
    same, _ = optimize(Options(iterations=1, out=str(tmp_path / "a.json"), **opts), MIX + ["solver=learned"], log=lambda s: None)
    a = same["grids"]["4"]
    assert a["sigmas"] == g["sigmas"] and a["coefficients"] == g["coefficients"]
    assert math.isclose(a["calibration_rmse_to_teacher"], g["calibration_rmse_to_teacher"], rel_tol=1e-9)
    more, _ = optimize(Options(iterations=10, out=str(tmp_path / "b.json"), **opts), MIX + ["solver=learned"], log=lambda s: None)
    assert more["grids"]["4"]["calibration_rmse_to_teacher"] <= g["calibration_rmse_to_teacher"] * (1 + 1e-9)
    with pytest.raises(ConfigError, match="give init=<file>"):
        optimize(Options(**{**opts, "init": "karras"}, iterations=1, out=str(tmp_path / "c.json")), MIX + ["solver=learned"])
    with pytest.raises(ConfigError, match="holds no 4-step coefficients"):  # a grid file without coefficients
        plain = tmp_path / "plain.json"
        write_schedule_file(plain, {k: v for k, v in read_schedule_file(path).items() if k != "checksum"}
                            | {"grids": {"4": {k: v for k, v in g.items() if k != "coefficients"}}})
        optimize(Options(**{**opts, "init": str(plain)}, iterations=1, out=str(tmp_path / "d.json")), MIX + ["solver=learned"])


def test_a_copied_folder_resumes_a_fit_made_from_a_file_in_it(learned_file, tmp_path):
    """The init file is named by its file name: a study's folder copied elsewhere (from a GPU machine, say) resumes
    the fits made from its files instead of moving them aside and fitting again."""
    import shutil

    _, path = learned_file
    (tmp_path / "a").mkdir()
    shutil.copy(path, tmp_path / "a" / "init.json")
    opts = dict(method="learned", coef_init="init", nfe=[4], iterations=2, coef_lr=0.01, **SMALL)
    first, _ = optimize(Options(init=str(tmp_path / "a" / "init.json"), out=str(tmp_path / "a" / "fit.json"), **opts),
                        MIX + ["solver=learned"], log=lambda s: None)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    said: list[str] = []
    again, _ = optimize(Options(init=str(tmp_path / "b" / "init.json"), out=str(tmp_path / "b" / "fit.json"), **opts),
                        MIX + ["solver=learned"], log=said.append)
    assert any("resuming" in s for s in said) and again["grids"] == first["grids"]
    assert not list((tmp_path / "b").glob("*.replaced-*"))


def test_learned_coefficients_on_an_image_objective(tiny_overrides, tmp_path):
    """objective=image_grad for method=learned (autograd through the decoder too): the file names the objective,
    its calibration RMSE stays the latent RMSE to the teacher (one Adam step keeps Euler's coefficients: equal to
    Euler's own on the same grid, as ld3 with no steps measures it), and more steps never end worse on the objective;
    a model without a decoder is refused."""
    base = dict(nfe=[3], init="karras", fine=8, teacher="unipc", teacher_substeps=2, progress=False, plot=False,
                calibration=Calibration(seed=1000, num_samples=2))
    run_keys = tiny_overrides + ["dtype=float32", "device=cpu"]
    one, _ = optimize(Options(method="learned", objective="image_grad", iterations=1, out=str(tmp_path / "a.json"), **base),
                      run_keys + ["solver=learned"], log=lambda s: None)
    more, _ = optimize(Options(method="learned", objective="image_grad", iterations=4, coef_lr=0.01, out=str(tmp_path / "b.json"),
                               **base), run_keys + ["solver=learned"], log=lambda s: None)
    euler, _ = optimize(Options(method="ld3", iterations=0, out=str(tmp_path / "e.json"), **base), run_keys + ["solver=euler"],
                        log=lambda s: None)
    a, b, e = one["grids"]["3"], more["grids"]["3"], euler["grids"]["3"]
    assert "finite differences" in a["objective_name"] and "learned" in a["objective_name"]
    assert a["sigmas"] == e["sigmas"]
    assert math.isclose(a["calibration_rmse_to_teacher"], e["calibration_rmse_to_teacher"], rel_tol=1e-5)
    assert not math.isclose(a["objective"], a["calibration_rmse_to_teacher"], rel_tol=1e-3)  # a different measure
    assert b["objective"] <= a["objective"] * (1 + 1e-9)
    with pytest.raises(ConfigError, match="no decoder"):
        optimize(Options(method="learned", objective="image", nfe=[3], iterations=1, out=str(tmp_path / "g.json"), init="karras",
                         **{k: v for k, v in SMALL.items()}), MIX + ["solver=learned"], log=lambda s: None)


def test_learned_guidance_terms(tiny_overrides, tmp_path):
    """guidance_terms=true: each step also weighs every guidance difference Δ_k = D_cond − D_uncond so far. The greedy
    fit with them (the plain fit's columns and more) ends nearer the teacher on its calibration samples, and Adam keeps
    no worse; in solver=learned, weights g = c·b at CFG scale w are the plain coefficients at w + c (CFG is linear in D:
    float32, 1e-4); a fit or a run without CFG refuses them, and a plain fit does not continue a file that has them."""
    base = dict(method="learned", nfe=[3], init="karras", coef_init="greedy", consistent=True, fine=8, teacher="unipc",
                teacher_substeps=2, progress=False, plot=False, calibration=Calibration(seed=1000, num_samples=4))
    keys = tiny_overrides + ["dtype=float32", "device=cpu", "solver=learned"]
    plain, plain_path = optimize(Options(iterations=1, out=str(tmp_path / "p.json"), **base), keys, log=lambda s: None)
    terms, path = optimize(Options(iterations=1, guidance_terms=True, out=str(tmp_path / "t.json"), **base), keys, log=lambda s: None)
    more, _ = optimize(Options(iterations=3, coef_lr=0.01, guidance_terms=True, out=str(tmp_path / "a.json"), **base), keys,
                       log=lambda s: None)
    p, t, a = (c["grids"]["3"] for c in (plain, terms, more))
    print("guidance terms: plain", p["calibration_rmse_to_teacher"], "terms", t["calibration_rmse_to_teacher"],
          "adam", a["calibration_rmse_to_teacher"])
    assert [len(row) for row in t["coefficients"]["g"]] == [1, 2, 3] and "g" not in p["coefficients"]
    assert t["calibration_rmse_to_teacher"] < p["calibration_rmse_to_teacher"]
    assert a["calibration_rmse_to_teacher"] <= t["calibration_rmse_to_teacher"] * (1 + 1e-9)

    shifted = read_schedule_file(plain_path)
    c = shifted["grids"]["3"]["coefficients"]
    c["g"] = [[0.75 * v for v in row] for row in c["b"]]
    write_schedule_file(tmp_path / "s.json", shifted)
    sample = keys + ["steps=3", "schedule=optimized", "num_samples=2", "save_images=false", "callback=[]"]
    at_w = run(sample + [f"schedule.file={tmp_path / 's.json'}", "cfg_scale=5.0"]).latents
    at_w_c = run(sample + [f"schedule.file={plain_path}", "cfg_scale=5.75"]).latents
    assert (at_w - at_w_c).abs().max() <= 1e-4 * at_w.abs().max(), (at_w - at_w_c).abs().max()
    with pytest.raises(ConfigError, match="no classifier-free guidance"):
        run(sample + [f"schedule.file={path}", "guidance=[]"])
    with pytest.raises(ConfigError, match="guidance_terms=true weighs"):
        optimize(Options(**{**base, "init": "karras"}, guidance_terms=True, out=str(tmp_path / "m.json")),
                 MIX + ["solver=learned"], log=lambda s: None)
    with pytest.raises(ConfigError, match="continue it with guidance_terms=true"):
        optimize(Options(**{**base, "init": str(path), "coef_init": "init"}, out=str(tmp_path / "c.json")), keys, log=lambda s: None)
    per_sample, _ = optimize(Options(iterations=1, guidance_terms=True, sample_power=1.0, out=str(tmp_path / "r.json"), **base),
                             keys, log=lambda s: None)  # sample_power: kept in the file's settings, and the fit is another
    assert per_sample["settings"]["sample_power"] == 1.0 and "sample_power" not in terms["settings"]
    assert max(abs(u - v) for u, v in zip(flatten(per_sample["grids"]["3"]["coefficients"]["b"]),
                                          flatten(t["coefficients"]["b"]))) > 1e-6
    damaged = tmp_path / "damaged.json"
    damaged.write_text(path.read_text().replace('"sigmas": [', '"sigmas": [1.5e-3, ', 1))
    with pytest.raises(ConfigError, match="damaged"):  # an init file is read before any model evaluation
        optimize(Options(**{**base, "init": str(damaged)}, out=str(tmp_path / "d.json")), keys, log=lambda s: None)
    with pytest.raises(ConfigError, match="learn_grid=, first_sigma= and validation= are method=learned"):
        Options(method="gits", guidance_terms=True).check()


def test_learned_grid_search(tiny_overrides, tmp_path):
    """grid_search=<sweeps> (coef_init=greedy): the grid moves over the fine points to its greedy coefficients' least
    calibration error. The search never ends worse than it starts, its grid lies on the fine points with the last
    nonzero σ under last_sigma, and the file's coefficients are the greedy fit on that grid (their error is the
    search's last cost, 1e-9 relative: the teacher's states at the fine points are the same targets); bad input is one line."""
    fine = 10
    opts = Options(method="learned", nfe=[4], init="karras", coef_init="greedy", consistent=True, guidance_terms=True,
                   iterations=1, fine=fine, teacher="unipc", teacher_substeps=2, grid_search=3, last_sigma=1.0,
                   progress=False, plot=False, calibration=Calibration(seed=1000, num_samples=4), out=str(tmp_path / "g.json"))
    content, _ = optimize(opts, tiny_overrides + ["dtype=float32", "device=cpu", "solver=learned"], log=lambda s: None)
    g = content["grids"]["4"]
    found = g["grid_search"]
    print("grid search:", found, g["sigmas"])
    points = schedule_opt.fine_grid(content["model"]["sigma_max"], content["model"]["sigma_min"], fine)
    assert all(any(math.isclose(v, f, rel_tol=1e-9) for f in points) for v in g["sigmas"])
    assert 0 < g["sigmas"][-2] <= 1.0 and found["sweeps"] >= 1 and found["grids"] >= 2
    assert found["rmse"] <= found["rmse_start"]
    assert math.isclose(g["calibration_rmse_to_teacher"], found["rmse"], rel_tol=1e-9)
    high = read_schedule_file(tmp_path / "g.json")  # an init grid whose last point lies above the cap: moved under it
    high["grids"]["4"]["sigmas"] = [points[0], points[2], points[4], points[6], 0.0]
    write_schedule_file(tmp_path / "high.json", high)
    capped, _ = optimize(replace(opts, init=str(tmp_path / "high.json"), last_sigma=points[7] * 1.001, out=str(tmp_path / "c.json")),
                         tiny_overrides + ["dtype=float32", "device=cpu", "solver=learned"], log=lambda s: None)
    assert capped["grids"]["4"]["sigmas"][-2] <= points[7] * 1.001, capped["grids"]["4"]["sigmas"]
    with pytest.raises(ConfigError, match="grid_search=2: the sweeps"):
        Options(method="learned", grid_search=2).check()  # coef_init=euler
    with pytest.raises(ConfigError, match="last_sigma=0.5 caps"):
        Options(method="learned", coef_init="greedy", last_sigma=0.5).check()


def test_least_squares_with_power_1_is_not_pulled_by_one_far_sample():
    """``least_squares``: p = 2, the least squares over every element (torch.linalg.lstsq on the flattened data,
    1e-9); p = 1, the least sum of per-sample residual norms — 15 samples that follow y = 2·u + 3·v (noise 1e-3) and
    one far off: the p = 2 fit is pulled by it (> 0.3 away), the p = 1 one recovers (2, 3) within 0.01 and its sum of
    norms is the smaller; p = 1.5 lies between them and has the least Σ‖r_i‖^1.5 of the three."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(16, 4, 8, generator=g, dtype=torch.float64), torch.randn(16, 4, 8, generator=g, dtype=torch.float64)
    y = 2 * u + 3 * v + 1e-3 * torch.randn(16, 4, 8, generator=g, dtype=torch.float64)
    y[5] = -8 * u[5] + 20 * torch.randn(4, 8, generator=g, dtype=torch.float64)
    plain, robust = schedule_opt.least_squares([u, v], y), schedule_opt.least_squares([u, v], y, power=1)
    mid = schedule_opt.least_squares([u, v], y, power=1.5)
    direct = torch.linalg.lstsq(torch.stack([u.flatten(), v.flatten()], 1), y.flatten()[:, None]).solution[:, 0]
    assert all(math.isclose(a, float(b), rel_tol=1e-9) for a, b in zip(plain, direct))
    assert abs(plain[0] - 2) + abs(plain[1] - 3) > 0.3, plain
    assert abs(robust[0] - 2) < 0.01 and abs(robust[1] - 3) < 0.01, robust

    def norms(c, p=1.0):
        return float((c[0] * u + c[1] * v - y).flatten(1).norm(dim=1).pow(p).sum())

    assert norms(robust) < norms(plain)
    assert norms(mid, 1.5) < min(norms(robust, 1.5), norms(plain, 1.5))
    assert abs(robust[0] - 2) < abs(mid[0] - 2) < abs(plain[0] - 2)
    with pytest.raises(ConfigError, match="learn_grid=, first_sigma= and validation= are method=learned's"):
        Options(method="gits", sample_power=1).check()
    with pytest.raises(ConfigError, match="sample_power=3: give 1 ≤ p ≤ 2"):
        Options(method="learned", sample_power=3).check()


def test_greedy_fit_resumes_from_a_shared_head(tiny_overrides):
    """greedy_fit's cache: a grid whose head was fitted before starts after it — the same coefficients and final
    state as a fit from scratch (1e-12), with only the evaluations from the first differing point on."""
    s = schedule_opt.Sampler(tiny_overrides + ["dtype=float32", "device=cpu", "solver=learned", "seed=1000", "num_samples=2",
                                               "batch_size=2", "callback=[]"])
    torch.manual_seed(0)
    shape = s.start(s.sigma_max).x.shape
    targets = {v: torch.randn(shape) * v for v in (8.0, 4.0, 3.0, 2.0, 1.0, 0.5)}
    targets[0.0] = torch.randn(shape) * 0.5
    head, other = [s.sigma_max, 8.0, 4.0, 2.0, 1.0, 0.0], [s.sigma_max, 8.0, 4.0, 3.0, 0.5, 0.0]
    cache: dict = {}
    schedule_opt.greedy_fit(s, head, [targets[v] for v in head[1:]], True, None, True, cache)
    n0 = s.nfe
    cached = schedule_opt.greedy_fit(s, other, [targets[v] for v in other[1:]], True, None, True, cache)
    n1 = s.nfe
    fresh = schedule_opt.greedy_fit(s, other, [targets[v] for v in other[1:]], True, None, True)
    assert (n1 - n0) * 5 == (s.nfe - n1) * 2  # 2 of the 5 evaluations: those at [σ_max, 8, 4] kept
    for a, b in zip(cached[:3], fresh[:3]):
        assert all(math.isclose(u, v, rel_tol=1e-12, abs_tol=1e-12) for u, v in zip(flatten(a), flatten(b)))
    assert torch.allclose(cached[3], fresh[3], rtol=0, atol=1e-12)


def test_branched_stashes_share_the_prompts_encoding(tiny_overrides):
    """Each node of a trajectory holds its own copy of the plugins' stash (the optimisers branch from any node), but
    the batch's stacked conditioning is one object for all of them: a copy per node had run a flow teacher (160
    nodes, 96 samples) out of 23 GB."""
    from framework.core.model import _Stacked

    s = schedule_opt.Sampler(tiny_overrides + ["dtype=float32", "device=cpu", "solver=unipc", "seed=1000", "num_samples=2",
                                               "batch_size=2", "callback=[]"])
    nodes = s.trajectory([s.sigma_max, 5.0, 2.0, 1.0, 0.0])
    held = [[v for v in n.stash._data.values() if isinstance(v, _Stacked)] for n in nodes[1:]]
    assert all(len(h) == 1 and h[0] is held[0][0] for h in held) and held[0][0].both
    assert nodes[1].stash is not nodes[2].stash


def flatten(rows) -> list[float]:
    return [float(v) for row in rows for v in (row if isinstance(row, list) else [row])]


def test_learned_guidance_terms_from_infinity(tmp_path):
    """The same on a flow model whose grid starts at σ = ∞ (tiny SD3, the solver's limit step first): the greedy fit
    with guidance terms runs, and its file's weights g = c·b at CFG w are the plain coefficients at w + c (1e-4)."""
    keys = ["model=tiny_sd3", "dtype=float32", "device=cpu", "solver=learned"]
    content, path = optimize(Options(method="learned", nfe=[3], init="oss", coef_init="greedy", consistent=True, guidance_terms=True,
                                     iterations=1, fine=8, teacher="unipc", teacher_substeps=2, progress=False, plot=False,
                                     calibration=Calibration(seed=1000, num_samples=2), out=str(tmp_path / "t.json")),
                             keys, log=lambda s: None)
    g = content["grids"]["3"]
    assert math.isinf(g["sigmas"][0]) and [len(row) for row in g["coefficients"]["g"]] == [1, 2, 3]
    plain, shifted = read_schedule_file(path), read_schedule_file(path)
    del plain["grids"]["3"]["coefficients"]["g"]
    c = shifted["grids"]["3"]["coefficients"]
    c["g"] = [[0.5 * v for v in row] for row in c["b"]]
    write_schedule_file(tmp_path / "p.json", plain)
    write_schedule_file(tmp_path / "s.json", shifted)
    sample = keys + ["steps=3", "schedule=optimized", "num_samples=2", "save_images=false", "callback=[]"]
    at_w = run(sample + [f"schedule.file={tmp_path / 's.json'}", "cfg_scale=5.0"]).latents
    at_w_c = run(sample + [f"schedule.file={tmp_path / 'p.json'}", "cfg_scale=5.5"]).latents
    assert (at_w - at_w_c).abs().max() <= 1e-4 * at_w.abs().max(), (at_w - at_w_c).abs().max()


def test_a_flow_models_own_grid_is_a_start(tmp_path):
    """init=flow_match: the model's own flow-matching grid (from σ = ∞) is the start; 0 iterations leave it."""
    from framework.tools.schedule_opt import stock_grid

    content, _ = optimize(Options(method="ld3", nfe=[4], iterations=0, init="flow_match", out=str(tmp_path / "f.json"),
                                  **SMALL), FLOW + ["solver=euler"], log=lambda s: None)
    model = schedule_opt.Sampler(FLOW + ["solver=euler", "num_samples=1", "batch_size=1", "callback=[]"]).model
    want = stock_grid("flow_match", model, 4)
    g = content["grids"]["4"]["sigmas"]
    assert math.isinf(g[0]) and math.isinf(want[0]) and len(g) == len(want) == 5
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(g[1:], want[1:])), (g, want)
