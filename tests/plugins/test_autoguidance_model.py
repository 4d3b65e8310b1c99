"""True autoguidance with a separately trained guide network (guidance=autoguidance_model).

- the combination D = D_guide + w·(D_main − D_guide) against a hand computation with the two tiny
  UNets called directly (diffusers, ε-prediction: D = x − σ·ε(x·c_in, t)), and its counts;
- end to end on the tiny model: w = 1 is the plain conditional run, w = 0 the guide's own
  conditional run, a guide that is the main network itself changes nothing at any w, a pipeline
  folder and a network folder give the same guide, the step window skips the guide's calls;
- bad input → one line, exit 2, nothing written;
- slow: the shipped guide of the bundled model loads and a 4-step run works.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from framework.core.state import Batch, Conditioning, Prediction, Stash
from framework.models.base import vp_scale
from framework.models.guide import load_guide
from plugins.guidance.autoguidance_model import AutoGuidanceModel

BASE = ["model=tiny_random", "steps=3", "num_samples=2", "batch_size=2", "save_images=false"]


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def tiny_unet(**changes):
    """The tiny pipeline's UNet layout (framework/models/tiny.py) with some config changed."""
    from diffusers import UNet2DConditionModel

    config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(3)
    return UNet2DConditionModel(**{**config, **changes})


@pytest.fixture(scope="module")
def guides(tmp_path_factory):
    """Guide folders: another tiny UNet (seed 1) as a network folder and inside a pipeline folder,
    the main model's own UNet, the main pipeline with the other UNet (the guide as a main model),
    and incompatible ones."""
    import json
    import shutil

    from framework.models.tiny import PIPELINES, build_tiny_pipeline

    root = tmp_path_factory.mktemp("guides")
    other = build_tiny_pipeline(seed=1)
    other.unet.save_pretrained(root / "unet1")
    other.save_pretrained(root / "pipe1")
    main = PIPELINES.get((0, "epsilon"), lambda: build_tiny_pipeline(0, "epsilon"))  # model=tiny_random's
    main.unet.save_pretrained(root / "self")
    type(main)(**{**main.components, "unet": other.unet}).save_pretrained(root / "main_with_unet1")
    tiny_unet(cross_attention_dim=16).save_pretrained(root / "wide16")
    tiny_unet(in_channels=3, out_channels=3).save_pretrained(root / "channels3")
    shutil.copytree(root / "pipe1", root / "vpred")
    config = root / "vpred" / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    (root / "empty").mkdir()
    return root


def run_tiny(*overrides):
    from framework.entry.api import run

    return run([*BASE, *overrides])


def guided(folder, *overrides):
    return run_tiny("guidance=[autoguidance_model]", f"guidance.autoguidance_model.guide={folder}", *overrides)


# ---------------------------------------------------------------------------------------------
# the formula, by hand
# ---------------------------------------------------------------------------------------------
def test_formula_against_a_hand_computation(guides):
    """One evaluation at σ = 2.5, t = 600 with w = 3: the plugin's D against the two UNets called
    directly (≤ 1e-6 relative), and the guide's call counted (1 call, 1 input, 1 guide input)."""
    from diffusers import UNet2DConditionModel

    from framework.models.tiny import TinyRandom

    model = TinyRandom()
    model.setup(torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * 2.5
    cond = Conditioning(prompts=["a red circle", "a blue square"],
                        tensors=model.encode_prompts(["a red circle", "a blue square"]))
    sigma, t, w = 2.5, 600.0, 3.0
    with torch.no_grad():
        hidden = cond.tensors["encoder_hidden_states"]
        c_in = vp_scale(sigma)
        eps_main = model.unet(x * c_in, torch.tensor(t), encoder_hidden_states=hidden).sample
        other = UNet2DConditionModel.from_pretrained(guides / "unet1")
        eps_guide = other(x * c_in, torch.tensor(t), encoder_hidden_states=hidden).sample
        d_main, d_guide = x - sigma * eps_main, x - sigma * eps_guide
        expected = d_guide + w * (d_main - d_guide)

        plugin = AutoGuidanceModel(guide=str(guides / "unet1"), scale=w)
        run = SimpleNamespace(model=model, stash=Stash(), settings=SimpleNamespace(cfg_scale=7.0),
                              plugins=SimpleNamespace(by_group=lambda group: []))
        plugin.configure(run=run)
        batch = Batch(indices=[0, 1], cond=cond, noise=None)
        state = SimpleNamespace(run=run, batch=batch, index=0,
                                schedule=SimpleNamespace(steps=10, timestep=lambda s: t))
        pred = Prediction(x=x, sigma=sigma, denoised=d_main)
        got = plugin.guidance(state=state, pred=pred).denoised
    assert rel(got, expected) <= 1e-6
    assert rel(d_guide, d_main) > 0.1  # two different networks
    assert (batch.unet_calls, batch.network_inputs, run.stash.get(plugin, dict)["guide"].inputs(batch)) == (1, 1, 1)


def test_the_guide_uses_the_models_arithmetic(guides):
    """load_guide on the main model's own weights gives the main adapter's D exactly (ε and the
    timestep map shared), at a σ off any grid."""
    from framework.models.tiny import TinyRandom

    model = TinyRandom()
    model.setup(torch.device("cpu"), torch.float32)
    guide = load_guide(model, str(guides / "self"))
    assert guide.network is not model.unet and guide.parameters() == sum(p.numel() for p in model.unet.parameters())
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    tensors = model.encode_prompts(["a green triangle"])
    state = SimpleNamespace(batch=Batch(indices=[0], cond=Conditioning(["a green triangle"], tensors), noise=None),
                            schedule=SimpleNamespace(timestep=lambda s: None))
    with torch.no_grad():
        mine = guide.denoise(state, x, 1.7)
        theirs = model.denoise_batch(x, 1.7, None, tensors)
    # float32 rounding only: two copies of the weights may take different kernel paths (3.2e-7 measured on a loaded
    # 2-core machine); σ 1.71 instead of 1.7 moves D by 2.4e-2
    assert rel(mine, theirs) <= 2e-6


# ---------------------------------------------------------------------------------------------
# end to end on the tiny model
# ---------------------------------------------------------------------------------------------
def test_scale_one_is_the_main_models_conditional_run(guides):
    plain = run_tiny("guidance=[]")
    one = guided(guides / "unet1", "guidance.autoguidance_model.scale=1")
    assert rel(one.latents, plain.latents) <= 1e-6


def test_scale_zero_is_the_guides_conditional_run(guides):
    """w = 0: the guide alone, i.e. the main pipeline with the guide's UNet in place of its own."""
    zero = guided(guides / "unet1", "guidance.autoguidance_model.scale=0")
    alone = run_tiny("model=sd15", f"model.path={guides / 'main_with_unet1'}", "guidance=[]")
    assert rel(zero.latents, alone.latents) <= 1e-6


@pytest.mark.parametrize("scale", [0.0, 3.7])
def test_the_main_network_as_its_own_guide_changes_nothing(guides, scale):
    plain = run_tiny("guidance=[]")
    same = guided(guides / "self", f"guidance.autoguidance_model.scale={scale}")
    assert rel(same.latents, plain.latents) <= 1e-6


def test_a_pipeline_folder_is_the_same_guide_as_its_network_folder(guides):
    by_unet = guided(guides / "unet1")
    by_pipe = guided(guides / "pipe1")
    assert rel(by_pipe.latents, by_unet.latents) <= 2e-6  # the same weights from two folders: float32 rounding only


def test_the_record_counts_the_guides_inputs_and_the_window_skips_them(guides):
    """3 steps: 3 main + 3 guide inputs, 6 calls, 3 CFG-pair NFE; from start=0.5 on (steps i ≥ ⌊0.5·3⌋ = 1) 2."""
    whole = guided(guides / "unet1")
    m = whole.record["metrics"]
    assert (m["nfe"], m["unet_calls"], m["network_inputs"], m["nfe_pairs"], m["guide_inputs"]) == (3, 6, 6, 3, 3)
    late = guided(guides / "unet1", "guidance.autoguidance_model.start=0.5")
    m = late.record["metrics"]
    assert (m["unet_calls"], m["network_inputs"], m["guide_inputs"]) == (5, 5, 2)
    assert rel(late.latents, whole.latents) > 1e-4


def test_scale_null_reads_cfg_scale(guides):
    by_null = guided(guides / "unet1", "cfg_scale=2.5")
    by_scale = guided(guides / "unet1", "guidance.autoguidance_model.scale=2.5")
    assert rel(by_null.latents, by_scale.latents) <= 1e-7


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guide,extra,expected", [
    ("{root}/missing", [], "no such folder"),
    ("{root}/empty", [], "is not a diffusers network or pipeline folder"),
    ("{root}/wide16", [], "its cross_attention_dim is 16, the model's 32"),
    ("{root}/channels3", [], "its in_channels is 3, the model's 4"),
    ("{root}/vpred", [], "predicts v_prediction, the model epsilon"),
    ("bundled", [], "its cross_attention_dim is 128, the model's 32"),
    ("{root}/unet1", ["guidance=[cfg,autoguidance_model]"], "autoguidance_model replaces the CFG combiner: remove cfg"),
    ("{root}/unet1", ["guidance.autoguidance_model.start=0.6", "guidance.autoguidance_model.stop=0.2"],
     "need 0 ≤ start < stop ≤ 1"),
])
def test_bad_input_one_line_exit_2(capsys, guides, tmp_path, guide, extra, expected):
    from framework.entry.cli import main

    guidance = [e for e in extra if e.startswith("guidance=")] or ["guidance=[autoguidance_model]"]
    rest = [e for e in extra if not e.startswith("guidance=")]
    argv = ["model=tiny_random", *guidance, f"guidance.autoguidance_model.guide={guide.format(root=guides)}", *rest]
    code = main([*argv, f"hydra.run.dir={tmp_path}/r"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "r").exists()


def test_an_unconditional_model_is_refused():
    from framework.core.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a text-conditioned model"):
        run_tiny("model=gaussian", "guidance=[autoguidance_model]")


# ---------------------------------------------------------------------------------------------
# the shipped guide
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_shipped_guide_loads_and_a_four_step_run_works():
    from framework.entry.api import run
    from framework.models.guide import bundled_guide_dir

    folder = bundled_guide_dir()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 3e6, size
    common = ["model=bundled", "steps=4", "num_samples=2", "save_images=false", "prompts=[a red circle,a blue square]"]
    ag = run([*common, "guidance=[autoguidance_model]"])
    plain = run([*common, "guidance=[]"])
    m = ag.record["metrics"]
    assert (m["unet_calls"], m["network_inputs"], m["nfe_pairs"], m["guide_inputs"]) == (8, 8, 4, 4)
    assert "guide_inputs" in ag.record["nfe_convention"]
    assert torch.isfinite(ag.images).all() and rel(ag.latents, plain.latents) > 1e-3
    from framework.models.bundled import Bundled

    model = Bundled()  # the guide is the smaller network
    assert load_guide(model, "bundled").parameters() < 0.5 * sum(p.numel() for p in model.unet.parameters())
