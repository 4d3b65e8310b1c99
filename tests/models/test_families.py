"""SDXL, SD3 and Flux in the engine (issue 20): the adapters, their default grids and the shift every
schedule composes with, every built-in solver, guidance and conditioning plugin on every family (or
its one-line refusal, listed in docs/models.md), the VAE factors, previews and metrics, and bad input
(one line, exit 2, nothing written). Parity with the pipelines: tests/models/test_families_parity.py."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.core.errors import ConfigError
from framework.entry.api import run
from framework.entry.cli import main
from framework.maths.sigmas import flow_sigma
from framework.models import reference_loops as ref
from framework.models import tiny_families as tiny
from framework.models.flux import Flux
from framework.models.sd3 import StableDiffusion3
from framework.models.sdxl import StableDiffusionXL

FAMILIES = ["tiny_sdxl", "tiny_sd3", "tiny_flux"]
CONF = Path(__file__).parents[2] / "conf"
SOLVERS = sorted(p.stem for p in (CONF / "solver").glob("*.yaml"))
GUIDANCE = sorted(p.stem for p in (CONF / "guidance").glob("*.yaml"))
CONDITIONING = sorted(p.stem for p in (CONF / "conditioning").glob("*.yaml"))
MOMENTUM = sorted(p.stem for p in (CONF / "momentum").glob("*.yaml"))
SMALL = ["steps=3", "num_samples=1", "batch_size=1", "prompts=['a x circle']", "save_images=false"]
CFG_FAMILY = {"cfg", "apg", "cfg_rescale", "interval"}   # combine the negative-prompt pass with the prompt's
CFG_FAMILY |= {"apg_mix", "cfg_norm", "cfg_zero_star", "fdg", "mambo_g", "tcfg"}   # the CFG family of issue 23
CFG_FAMILY |= {"autoguidance"}   # issue 23: replaces cfg with a layer-skipped negative-prompt pass
CFG_FAMILY |= {"perp_neg", "dual_cfg"}   # issue 23: replace cfg, with a prompt branch of their own
BEFORE_CFG = {"regional", "timed_prompt"}   # edit the conditional prediction before the CFG combiner
GUIDE_NETWORK = {"autoguidance_model"}   # issue 23: replaces cfg with another network of the family (no negative prompt)

#: (plugin, family) → the one line that refuses it (docs/models.md lists them).
REFUSED = {
    ("diffusers", "tiny_sd3"): "has no flow mode",
    ("diffusers", "tiny_flux"): "has no flow mode",
    ("euler_cfg_pp", "tiny_flux"): "steps to the CFG-guided estimate: add a CFG combiner",   # then: guidance-distilled
    ("dpmpp_2m_cfg_pp", "tiny_flux"): "steps to the CFG-guided estimate: add a CFG combiner",
    ("res_multistep_cfg_pp", "tiny_flux"): "steps to the CFG-guided estimate: add a CFG combiner",
    ("res_multistep_ancestral_cfg_pp", "tiny_flux"): "steps to the CFG-guided estimate: add a CFG combiner",
    ("euler_ancestral_cfg_pp", "tiny_flux"): "steps to the CFG-guided estimate: add a CFG combiner",
    ("dpmpp_2s_ancestral_cfg_pp", "tiny_flux"): "steps to the CFG-guided estimate: add a CFG combiner",
    ("gradient_estimation_cfg_pp", "tiny_flux"): "steps to the CFG-guided estimate: add a CFG combiner",
}
#: Options that make a plugin cheap on a tiny pipeline (or give it its inputs).
SOLVER_OPTIONS = {"reference": ["solver.rtol=1e-1", "solver.atol=1e-1"], "restart": ["solver.restart_steps=2"]}


def network(family: str):
    pipe = tiny.tiny_pipeline(family.removeprefix("tiny_"))
    return getattr(pipe, "unet", None) or pipe.transformer


def counted(family: str, overrides: list[str]):
    """(run result, the network's forward calls during it)."""
    calls = []
    handle = network(family).register_forward_hook(lambda *_: calls.append(1))
    try:
        return run([f"model={family}", *overrides]), len(calls)
    finally:
        handle.remove()


def honest(res, calls: int) -> None:
    """Finite latents and images; NFE counted as the network was called (a CFG pair is one call)."""
    assert torch.isfinite(res.latents).all() and (res.images is None or torch.isfinite(res.images).all())
    m = res.record["metrics"]
    assert m["unet_calls"] == calls and m["nfe"] >= res.schedule.steps - 1, m


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A reference picture (a world scene), an inpainting mask (right half white = generate) and an
    SDXL-format textual inversion file (clip_l 32 wide, clip_g 48 wide: the tiny encoders')."""
    from safetensors.torch import save_file

    from framework.bundled.world import sample_scenes
    from framework.runs.images import to_pil

    folder = tmp_path_factory.mktemp("refs")
    to_pil((sample_scenes(1, seed=3).images[0] + 1) / 2).save(folder / "ref.png")
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1
    to_pil(mask).save(folder / "mask.png")
    gen = torch.Generator().manual_seed(0)
    save_file({"clip_l": torch.randn(2, 32, generator=gen), "clip_g": torch.randn(2, 48, generator=gen)}, str(folder / "spot.safetensors"))
    for family in FAMILIES:  # autoguidance_model's guides: the family's tiny network with other weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            network(family).__class__.from_config(network(family).config).save_pretrained(folder / f"guide_{family}")
    return folder


# ---------------------------------------------------------------------------------------------
# Defaults, grids and the shift
# ---------------------------------------------------------------------------------------------
def test_each_family_has_its_pipelines_defaults():
    """SD3 and Flux sample their pipeline's FlowMatchEuler grid by default; Flux without CFG (its
    guidance is the model input); SDXL like SD 1.x (karras, CFG); a schedule given wins."""
    expected = {"tiny_sdxl": ("karras", ["cfg"]), "tiny_sd3": ("flow_match", ["cfg"]), "tiny_flux": ("flow_match", [])}
    for family, (schedule, guidance) in expected.items():
        res = run([f"model={family}", *SMALL])
        assert res.record["plugins"]["schedule"] == [schedule]
        assert res.record["plugins"].get("guidance", []) == guidance
        assert math.isinf(res.schedule.sigmas[0]) == (schedule == "flow_match")
    assert run(["model=tiny_sd3", "schedule=karras", *SMALL]).record["plugins"]["schedule"] == ["karras"]


def test_flow_models_read_their_schedulers_shift():
    sd3, flux = StableDiffusion3(pipeline=tiny.tiny_pipeline("sd3")), Flux(pipeline=tiny.tiny_pipeline("flux"), height=64, width=64)
    assert sd3.sigma_shift == 3.0 and sd3.mu is None
    assert flux.mu == pytest.approx(ref.calculate_shift(16)) and flux.sigma_shift == pytest.approx(math.exp(flux.mu))
    assert Flux(pipeline=tiny.tiny_pipeline("flux")).mu == pytest.approx(1.15)       # 1024²: 4096 tokens
    assert StableDiffusion3(pipeline=tiny.tiny_pipeline("sd3"), shift=1.5).sigma_shift == 1.5
    # the training table: σ_k = s·u/(1 − u), u = k/1000, its top at t = 1; the σ range its finite ends
    assert sd3.sigma_min == pytest.approx(3 * 0.001 / 0.999) and sd3.sigma_max == pytest.approx(3 * 999)
    assert math.isinf(sd3.train_sigmas[-1]) and sd3.train_sigmas[499] == pytest.approx(3.0)


@pytest.mark.parametrize("schedule", ["karras", "exponential", "polyexponential", "beta", "ays", "simple", "normal",
                                      "sgm_uniform", "ddim_uniform", "kl_optimal", "time_uniform"])
def test_every_schedule_composes_with_the_shift(schedule):
    """A schedule on SD3 (shift 3) is the schedule on the unshifted model times 3 (σ' = 3·σ: the
    shift is a constant factor on σ), through the model's σ range and training table; kl_optimal,
    not scale-equivariant (tan/atan), runs on the shifted range."""
    base = ["model=tiny_sd3", f"schedule={schedule}", "steps=6", "num_samples=1", "batch_size=1", "guidance=[]",
            "save_images=false"]
    shifted, plain = run(base).schedule.sigmas, run(base + ["model.shift=1"]).schedule.sigmas
    assert run(base + ["model.shift=3"]).schedule.sigmas == shifted      # the override equals the config's shift
    if schedule == "kl_optimal":
        assert shifted[0] == pytest.approx(3 * 999) and shifted[-2] == pytest.approx(3 * 0.001 / 0.999)
        return
    assert np.allclose(np.array(shifted), 3 * np.array(plain), rtol=1e-6)
    if schedule in ("simple", "normal", "sgm_uniform"):   # ComfyUI's: the table's top is t = 1
        assert math.isinf(shifted[0])


def test_simple_on_sd3_is_comfyuis():
    """ComfyUI's simple on a flow model: every (T/N)-th entry of the shifted table from its top
    (t = 1), in σ = t/(1 − t)."""
    sig = run(["model=tiny_sd3", "schedule=simple", "steps=4", "guidance=[]", "num_samples=1", "batch_size=1",
               "save_images=false"]).schedule.sigmas
    expected = [3 * flow_sigma((1000 - 250 * i) / 1000) for i in range(4)]
    assert sig[:-1] == pytest.approx(expected, rel=1e-6) and sig[-1] == 0


# ---------------------------------------------------------------------------------------------
# Every plugin on every family
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_runs_on_every_family(solver, family):
    overrides = [f"solver={solver}", *SOLVER_OPTIONS.get(solver, []), *SMALL]
    if (solver, family) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[solver, family]) as e:
            run([f"model={family}", *overrides])
        assert "\n" not in str(e.value)
        return
    res, calls = counted(family, overrides)
    honest(res, calls)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", MOMENTUM)
def test_every_momentum_plugin_runs_on_every_family(name, family):
    """With solver=euler (what momentum composes with); on SD3 and Flux from σ = ∞, whose limit
    step momentum leaves alone."""
    res, calls = counted(family, ["solver=euler", f"momentum=[{name}]", *SMALL])
    honest(res, calls)


def guidance_options(name: str, files: Path) -> list[str]:
    g = f"guidance.{name}"
    return {
        "clip_text": [f"{g}.text=a blue square"],
        "image_match": [f"{g}.image={files / 'ref.png'}"],
        "style": [f"{g}.image={files / 'ref.png'}", f"{g}.every=1"],
        "img2img": [f"{g}.image={files / 'ref.png'}", f"{g}.strength=0.5"],
        "inpaint": [f"{g}.image={files / 'ref.png'}", f"{g}.mask={files / 'mask.png'}"],
        "user_loss": [f"{g}.fn=tests.bases.test_loss_guidance:guided_mean_loss", f"{g}.scale=100"],
        "color_loss": [f"{g}.every=1", f"{g}.sigma_hi=null"],
        "palette": [f"{g}.sigma_hi=null"],
        "slg": [f"{g}.start=0", f"{g}.stop=1"],   # its default window (0.01–0.2) holds no step of 3
        "perp_neg": [f"{g}.negative=a red circle"],
        "dual_cfg": [f"{g}.prompt2=a red circle"],
        "timed_prompt": [f"{g}.prompt=a red circle"],
        "regional": [f"{g}.regions=[{{prompt: a red circle, box: [0, 0, 0.5, 1]}}]"],
    }.get(name, [])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", GUIDANCE)
def test_every_guidance_plugin_runs_on_every_family(name, family, files):
    """After CFG on SDXL and SD3; alone on Flux, whose CFG-family plugins need model.true_cfg=true
    (without it: one line)."""
    options = guidance_options(name, files)
    if name in GUIDE_NETWORK:  # alone on every family, with a guide of the family
        chain, extra, options = [name], [], [f"guidance.{name}.guide={files / f'guide_{family}'}"]
    elif family == "tiny_flux" and name in CFG_FAMILY:
        with pytest.raises(ConfigError, match="is guidance-distilled"):
            run([f"model={family}", f"guidance=[{name}]", *guidance_options(name, files), *SMALL])
        chain, extra = [name], ["model.true_cfg=true"]
    else:
        chain = [name] if name in CFG_FAMILY or family == "tiny_flux" else [name, "cfg"] if name in BEFORE_CFG else ["cfg", name]
        extra = []
    plain = run([f"model={family}", f"guidance=[{','.join(c for c in chain if c != name)}]", *extra, *SMALL])
    res, calls = counted(family, [f"guidance=[{','.join(chain)}]", *options, *extra, *SMALL])
    honest(res, calls + int(res.record["metrics"].get("guide_inputs", 0)))   # + the guide network's calls
    assert (res.latents - plain.latents).abs().max() > 1e-6      # the plugin acted


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", CONDITIONING)
def test_every_conditioning_plugin_runs_on_every_family(name, family, files):
    c = f"conditioning.{name}"
    options = {
        "token_swap": [f"{c}.source=x", f"{c}.target=y"],
        "token_mix": [f"{c}.token=x", f"{c}.tokens=[x,y]"],
        "prompt_mix": [f"{c}.prompt=a square"],
        "textual_inversion": [f"{c}.path={files / 'spot.safetensors'}", f"{c}.token='<spot>'"],
    }.get(name, [])
    prompts = ["prompts=['a <spot> (circle:1.5)']"] if name == "textual_inversion" else ["prompts=['a x (circle:1.5)']"]
    if (name, family) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[name, family]):
            run([f"model={family}", f"conditioning=[{name}]", *options, *SMALL, *prompts])
        return
    plain = run([f"model={family}", *SMALL, *prompts])
    edited = run([f"model={family}", f"conditioning=[{name}]", *options, *SMALL, *prompts])
    assert torch.isfinite(edited.latents).all()
    assert (edited.latents - plain.latents).abs().max() > 1e-6


@pytest.mark.parametrize("family,cls", [("sdxl", StableDiffusionXL), ("sd3", StableDiffusion3)])
def test_a_token_swap_equals_writing_the_other_word(family, cls):
    """On every CLIP encoder (SDXL: both; SD3 without T5, which reads the text): swapping x → y
    gives the conditioning of the prompt written with y, states and pooled embeddings."""
    from plugins.conditioning.token_swap import TokenSwap

    kw = {"use_t5": False} if family == "sd3" else {}
    model = cls(pipeline=tiny.tiny_pipeline(family), **kw)
    model.setup(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        swapped = model.encode_edited(["a x circle"], [TokenSwap(source="x", target="y")])
        written = model.encode_prompts(["a y circle"])
    assert swapped.keys() == written.keys()
    for k in swapped:
        assert (swapped[k] - written[k]).abs().max() <= 1e-5, k


def test_sdxl_empty_prompt_is_zeros_and_sd3_without_t5_is_the_pipelines():
    sdxl = StableDiffusionXL(pipeline=tiny.tiny_pipeline("sdxl"))
    sdxl.setup(torch.device("cpu"), torch.float32)
    sd3 = StableDiffusion3(pipeline=tiny.tiny_pipeline("sd3"), use_t5=False)
    sd3.setup(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        empty = sdxl.encode_prompts(["", "a x"])
        mine = sd3.encode_prompts(["a x circle"])
        states, pooled = ref.sd3_text(tiny.tiny_pipeline("sd3", with_t5=False), ["a x circle"], 256)
    assert not empty["encoder_hidden_states"][0].any() and not empty["text_embeds"][0].any()
    assert empty["encoder_hidden_states"][1].any() and empty["time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]
    assert torch.equal(mine["encoder_hidden_states"], states) and torch.equal(mine["pooled_projections"], pooled)


def test_flux_guidance_is_a_model_input_and_cfg_needs_true_cfg():
    base = ["model=tiny_flux", *SMALL]
    a, b = run(base).latents, run(base + ["model.flux_guidance=7"]).latents
    assert (a - b).abs().max() > 1e-6
    with pytest.raises(ConfigError, match="guidance-distilled") as e:
        run(base + ["guidance=[cfg]"])
    assert "model.true_cfg=true" in str(e.value) and "\n" not in str(e.value)
    res = run(base + ["guidance=[cfg]", "model.true_cfg=true", "cfg_scale=1"])   # scale 1: no second pass
    assert torch.equal(res.latents, a)


# ---------------------------------------------------------------------------------------------
# VAE factors, previews, metrics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_16_channel_vae_scaling_and_shift(family):
    """decode(z) is the VAE's decode of z/scaling + shift, as the pipelines decode; encode_images
    returns (mean − shift)·scaling, their inverse."""
    pipe = tiny.tiny_pipeline(family)
    model = StableDiffusion3(pipeline=pipe) if family == "sd3" else Flux(pipeline=pipe, height=64, width=64)
    model.setup(torch.device("cpu"), torch.float32)
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    vae, c = pipe.vae, pipe.vae.config
    assert model.shift_factor == c.shift_factor != 0 and model.scaling_factor == c.scaling_factor
    with torch.no_grad():
        expected = (vae.decode(z / c.scaling_factor + c.shift_factor).sample / 2 + 0.5).clamp(0, 1)
        assert torch.equal(model.decode(z), expected)
        pixels = model.decode(z)
        mean = vae.encode(pixels * 2 - 1).latent_dist.mean
        assert torch.allclose(model.encode_images(pixels), (mean - c.shift_factor) * c.scaling_factor)


@pytest.mark.parametrize("family", FAMILIES)
def test_previews_and_metrics_on_every_family(family, tmp_path):
    res = run([f"model={family}", "callback=[nan_guard,preview]", "metrics=[prompt_accuracy,clip_score]", "steps=3",
               "num_samples=2", "batch_size=2", "prompts=[a red circle]"], output_dir=tmp_path)
    assert (tmp_path / "preview.png").exists()
    m = res.record["metrics"]
    accuracy = [v for k, v in m.items() if k.startswith("prompt_accuracy_") and not k.endswith("_n")]
    assert math.isfinite(m["clip_score"]) and accuracy and all(0 <= v <= 1 for v in accuracy)


def test_ancestral_noise_is_right_for_a_flow_model():
    """euler_ancestral from σ = ∞ on the Gaussian N(m, s²)'s flow twin: each step x' = D + σ_down·(x − D)/σ
    + σ_up·z is linear in x, so the samples' variance follows v' = (a + (σ_down/σ)(1 − a))²·v + σ_up²,
    a = s²/(s² + σ²), from v₁ = σ₁² (the step from ∞); the fresh noise is right when the samples
    have that variance (16,384 values: ±1.1%)."""
    from framework.maths.sigmas import ancestral_split

    m, s = 0.3, 0.5
    res = run(["model=gaussian", "model.parametrization=flow", f"model.std={s}", f"model.mean={m}", "solver=euler_ancestral",
               "schedule=flow_match", "steps=8", "num_samples=1024", "batch_size=1024", "dtype=float64"])
    sig = res.schedule.sigmas
    assert math.isinf(sig[0])
    v = sig[1] ** 2
    for a_sigma, b_sigma in zip(sig[1:], sig[2:]):
        down, up = ancestral_split(a_sigma, b_sigma)
        a = s * s / (s * s + a_sigma * a_sigma)
        v = (a + down / a_sigma * (1 - a)) ** 2 * v + up * up
    assert res.latents.var().item() == pytest.approx(v, rel=0.05) and res.latents.mean().item() == pytest.approx(m, abs=0.02)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An SD3 folder saved without T5, a Flux folder whose scheduler has an unknown shift mode."""
    root = tmp_path_factory.mktemp("families")
    no_t5 = tiny.save_tiny(tiny.tiny_pipeline("sd3", with_t5=False), root / "sd3_no_t5")
    flux = tiny.save_tiny(tiny.tiny_pipeline("flux"), root / "flux_bad_shift")
    config = flux / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "time_shift_type": "cubic"}))
    return {"sd3_no_t5": no_t5, "flux_bad_shift": flux}


@pytest.mark.parametrize("case", ["sd15_as_sd3", "missing_t5", "unknown_shift", "sdxl_needs_a_folder"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, folders, tiny_dir, capsys, tmp_path):
    argv, expected = {
        "sd15_as_sd3": ([f"model=sd3", f"model.path={tiny_dir}"], "is a StableDiffusionPipeline folder, not StableDiffusion3Pipeline: use model=sd15"),
        "missing_t5": ([f"model=sd3", f"model.path={folders['sd3_no_t5']}"], "has no T5 encoder (text_encoder_3): set model.use_t5=false"),
        "unknown_shift": ([f"model=flux", f"model.path={folders['flux_bad_shift']}", "model.height=64", "model.width=64"],
                          "time_shift_type 'cubic' is not a flow shift mode: use exponential or linear"),
        "sdxl_needs_a_folder": ([f"model=sdxl", f"model.path={tmp_path / 'nothing'}"], "no such folder"),
    }[case]
    code = main([*argv, "steps=2", "num_samples=1", "batch_size=1", f"hydra.run.dir={tmp_path}/run"])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0]
    assert not (tmp_path / "run").exists()


def test_an_sd3_folder_without_t5_runs_with_use_t5_false(folders):
    res = run(["model=sd3", f"model.path={folders['sd3_no_t5']}", "model.use_t5=false", *SMALL])
    expected = run(["model=tiny_sd3", "model.use_t5=false", *SMALL])
    assert torch.equal(res.latents, expected.latents)


def test_a_folder_of_another_family_names_the_right_model(folders):
    with pytest.raises(ConfigError, match="is a FluxPipeline folder, not StableDiffusionXLPipeline: use model=flux"):
        StableDiffusionXL(path=str(folders["flux_bad_shift"]))
    copy = folders["flux_bad_shift"].parent / "incomplete"
    shutil.copytree(folders["sd3_no_t5"], copy)
    shutil.rmtree(copy / "transformer")
    with pytest.raises(Exception, match="lacks transformer/"):
        StableDiffusion3(path=str(copy), use_t5=False)
