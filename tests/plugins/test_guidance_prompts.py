"""Prompts as branches (Branch.text; perp_neg, dual_cfg, regional, timed_prompt).

- a branch's prompt: its tensors are the model's encoding of that prompt (the branch equals the
  network on them alone, ≤ 1e-5), encoded once per batch, stacked with the CFG pair in one call;
- the counts are honest (network calls and inputs counted by a hook on the network itself);
- each combination rule against its reference written out here: Perp-Neg's paper formula (per
  sample) and ComfyUI's ``perp_neg`` (batch of one); ComfyUI's Guider_DualCFG regular and nested;
  MultiDiffusion's masked average; exact box coverage; the timed window;
- a region mask of all ones is plain CFG with that prompt, and so is a timed prompt over the whole run;
- bad input → one line, exit 2, nothing written.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from framework.core.errors import ConfigError
from framework.core.perturb import Branch, Perturbation
from framework.core.state import Batch, Prediction, Schedule
from plugins.guidance.dual_cfg import dual_cfg
from tests.core.test_network_hook import sd  # noqa: F401  (the tiny SD model, a prompt pair and a state)
from plugins.guidance.perp_neg import PerpNeg, perp_neg
from plugins.guidance.regional import Regional, box_mask
from plugins.guidance.timed_prompt import TimedPrompt


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# the branch's prompt, in the adapter's predict (tiny SD UNet)
# ---------------------------------------------------------------------------------------------
def predict(model, cond, x, branches=(), batch=None, sigma=3.0):
    run = SimpleNamespace(branches=list(branches), uncond_pass=True, attention_maps={})
    batch = batch or Batch(indices=[0, 1], cond=cond, noise=None)
    state = SimpleNamespace(run=run, batch=batch, schedule=Schedule((sigma, 0.0)), index=0)
    with torch.no_grad():
        return model.predict(state=state, x=x, sigma=sigma, cond=cond), batch


def test_the_branch_prompt_is_the_models_encoding_once_per_batch(sd, monkeypatch):
    model, cond, x = sd
    texts = []
    encode = model.encode_prompts
    monkeypatch.setattr(model, "encode_prompts", lambda prompts: texts.append(list(prompts)) or encode(prompts))
    branches = [Branch("g", None, text="a green triangle"), Branch("y", None, text="a yellow star")]
    pred, batch = predict(model, cond, x, branches)
    pred2, batch = predict(model, cond, x, branches, batch=batch)  # the batch's second evaluation
    assert texts == [["a green triangle"] * 2 + ["a yellow star"] * 2]  # one call, at the first evaluation
    assert (batch.unet_calls, batch.network_inputs) == (2, 8)  # one call of [uncond; cond; g; y] each time
    with torch.no_grad():
        for name, text in (("g", "a green triangle"), ("y", "a yellow star")):
            alone = model.denoise_batch(x, 3.0, None, encode([text] * 2))
            assert rel(pred.branches[name], alone) <= 1e-5
            assert rel(pred2.branches[name], alone) <= 1e-5
        assert rel(pred.cond_denoised, model.denoise_batch(x, 3.0, None, cond.tensors)) <= 1e-5
        assert rel(pred.uncond_denoised, model.denoise_batch(x, 3.0, None, cond.uncond)) <= 1e-5
    assert rel(pred.branches["g"], pred.cond_denoised) > 1e-3  # the prompt matters


def test_a_prompt_branch_joins_the_call_even_when_the_adapter_cannot_perturb_slices(sd, monkeypatch):
    model, cond, x = sd
    monkeypatch.setattr(model, "perturbs_slices", False)
    p = Perturbation("identity_attention", (1,))
    pred, batch = predict(model, cond, x, [Branch("g", None, text="a green triangle"), Branch("pag", p)])
    assert (batch.unet_calls, batch.network_inputs) == (2, 4)  # [uncond; cond; g], then the perturbed one
    with torch.no_grad(), model.perturbed([(slice(0, 2), p)], {}):
        alone = model.denoise_batch(x, 3.0, None, cond.tensors)
    assert rel(pred.branches["pag"], alone) <= 1e-5


def test_a_prompt_branch_may_also_be_perturbed(sd):
    model, cond, x = sd
    p = Perturbation("skip_blocks", (1,))
    pred, batch = predict(model, cond, x, [Branch("gp", p, text="a green triangle")])
    assert (batch.unet_calls, batch.network_inputs) == (1, 3)
    with torch.no_grad(), model.perturbed([(slice(0, 2), p)], {}):
        alone = model.denoise_batch(x, 3.0, None, model.encode_prompts(["a green triangle"] * 2))
    assert rel(pred.branches["gp"], alone) <= 1e-5


def test_request_branch_checks_its_arguments():
    from framework.core.run import Run

    run = Run.__new__(Run)
    run.branches, run.needs_uncond = [], False
    run.model = SimpleNamespace(is_conditional=False, check_perturbation=lambda p: None)
    with pytest.raises(ConfigError, match="needs a perturbation or a prompt"):
        run.request_branch("b")
    with pytest.raises(ConfigError, match="takes no prompts"):
        run.request_branch("b", text="a cat")
    run.model.is_conditional = True
    with pytest.raises(ConfigError, match="leave prompt='cond'"):
        run.request_branch("b", text="a cat", prompt="uncond")
    run.request_branch("b", text="a cat")
    assert run.branches[0].text == "a cat" and run.branches[0].perturbation is None


# ---------------------------------------------------------------------------------------------
# the rules vs their references
# ---------------------------------------------------------------------------------------------
def preds(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(4)]


def paper_perp_neg(pos, neg, nocond, w_pos, w_neg):
    """Armandpour et al. 2023, eq. 6–7, one sample at a time (flattened vectors)."""
    out = []
    for p, n, u in zip(pos, neg, nocond):
        ep, en = (p - u).flatten(), (n - u).flatten()
        perp = en - (en @ ep) / (ep @ ep) * ep
        out.append(u + w_pos * (p - u) - w_neg * perp.reshape(p.shape))
    return torch.stack(out)


def comfy_perp_neg(noise_pred_pos, noise_pred_neg, noise_pred_nocond, neg_scale, cond_scale):
    """ComfyUI's comfy_extras/nodes_perpneg.py perp_neg, written out (projection over the whole tensor)."""
    pos = noise_pred_pos - noise_pred_nocond
    neg = noise_pred_neg - noise_pred_nocond
    perp = neg - (torch.mul(neg, pos).sum() / torch.norm(pos) ** 2) * pos
    return noise_pred_nocond + cond_scale * (pos - perp * neg_scale)


def test_perp_neg_is_the_papers_rule_and_comfyuis():
    c, u, n, _ = preds()
    s, w = 7.5, 2.0
    assert rel(perp_neg(c, u, n, s, w), paper_perp_neg(c, n, u, s, w)) <= 1e-12
    # ComfyUI (batch of one): w = cfg·neg_scale
    c1, u1, n1 = c[:1], u[:1], n[:1]
    assert rel(perp_neg(c1, u1, n1, s, w), comfy_perp_neg(c1, n1, u1, w / s, s)) <= 1e-12
    # a negative along the prompt's direction is ignored; one perpendicular to it acts in full
    assert rel(perp_neg(c, u, u + 3 * (c - u), s, w), u + s * (c - u)) <= 1e-12
    dc = (c - u).flatten(1)
    other = torch.randn_like(dc)
    ortho = (other - ((other * dc).sum(1, keepdim=True) / (dc * dc).sum(1, keepdim=True)) * dc).reshape(c.shape)
    assert rel(perp_neg(c, u, u + ortho, s, w), u + s * (c - u) - w * ortho) <= 1e-12


def test_perp_neg_guidance_hook():
    c, u, n, x = preds()
    plugin = PerpNeg(negative="a dog", neg_scale=1.5)
    pred = Prediction(x=x, sigma=2.0, denoised=c, cond_denoised=c, uncond_denoised=u, branches={"perp_neg": n})
    st = SimpleNamespace(run=SimpleNamespace(settings=SimpleNamespace(cfg_scale=6.0)))
    assert rel(plugin.guidance(state=st, pred=pred).denoised, paper_perp_neg(c, n, u, 6.0, 1.5)) <= 1e-12
    # in ε = (x − D)/σ: the paper's rule on the noise predictions gives the same D
    eps = [(x - d) / 2.0 for d in (c, n, u)]
    assert rel(plugin.guidance(state=st, pred=pred).denoised, x - 2.0 * paper_perp_neg(*eps, 6.0, 1.5)) <= 1e-12


def comfy_dual_cfg(out, cfg1, cfg2, nested):
    """ComfyUI's Guider_DualCFG.predict_noise on out = [negative, middle (cond2), positive (cond1)],
    with cfg_function(cond, uncond, scale) = uncond + scale·(cond − uncond)."""
    def cfg_function(cond, uncond, scale):
        return uncond + scale * (cond - uncond)

    if nested:
        pred_text = cfg_function(out[2], out[1], cfg1)
        return out[0] + cfg2 * (pred_text - out[0])
    return cfg_function(out[1], out[0], cfg2) + (out[2] - out[1]) * cfg1


@pytest.mark.parametrize("style", ["regular", "nested"])
def test_dual_cfg_is_comfyuis(style):
    d1, d2, dn, _ = preds()
    s1, s2 = 3.0, 5.5  # cfg_conds, cfg_cond2_negative
    ours = dual_cfg(d1, d2, dn, scale=s2, scale1=s1, style=style)
    assert rel(ours, comfy_dual_cfg([dn, d2, d1], s1, s2, style == "nested")) <= 1e-12
    # both styles are plain CFG with the prompt when the two prompts agree (and s1 = 1 nested)
    assert rel(dual_cfg(d1, d1, dn, s2, s1, style), dn + s2 * (d1 - dn)) <= 1e-12


def test_box_coverage_is_exact():
    m = box_mask((0.1, 0.25, 0.5, 1.0), 4, 8)[0, 0]  # 4 rows, 8 columns
    cols = torch.tensor([0.2, 1, 1, 1, 0, 0, 0, 0])  # x: 0.8 … 4.0 cells
    rows = torch.tensor([0.0, 1, 1, 1])  # y: 1.0 … 4.0 cells
    assert torch.allclose(m, rows[:, None] * cols[None, :], atol=1e-6)
    assert torch.allclose(box_mask((0, 0, 1, 1), 3, 5), torch.ones(1, 1, 3, 5))


def test_regional_is_the_masked_average():
    base, d1, d2, x = preds(b=2)
    plugin = Regional(regions=[{"prompt": "a", "box": [0, 0, 0.5, 1]}, {"prompt": "b", "box": [0.25, 0, 1, 0.5]}])
    plugin.masks = [box_mask((0, 0, 0.5, 1), 8, 8), box_mask((0.25, 0, 1, 0.5), 8, 8)]
    u = torch.zeros_like(base)
    pred = Prediction(x=x, sigma=1.0, denoised=base, cond_denoised=base, uncond_denoised=u,
                      branches={"regional0": d1, "regional1": d2})
    out = plugin.guidance(state=None, pred=pred)
    # written out, cell by cell: weights m1, m2 and background max(0, 1 − m1 − m2)
    expect = torch.empty_like(base)
    for i in range(8):
        for j in range(8):
            m1, m2 = float(j < 4), float(j >= 2 and i < 4)
            m0 = max(0.0, 1 - m1 - m2)
            expect[..., i, j] = (m0 * base[..., i, j] + m1 * d1[..., i, j] + m2 * d2[..., i, j]) / (m0 + m1 + m2)
    assert rel(out.cond_denoised, expect) <= 1e-6 and out.denoised is out.cond_denoised
    assert out.uncond_denoised is u


def test_the_timed_window():
    t = TimedPrompt(prompt="a", sigma_lo=1.0, sigma_hi=5.0, start=0.0, stop=0.5)
    st = lambda i: SimpleNamespace(index=i, schedule=SimpleNamespace(steps=10))  # noqa: E731
    assert [t.active(st(i), 3.0) for i in (0, 4, 5, 9)] == [True, True, False, False]
    assert [t.active(st(0), s) for s in (1.0, 1.01, 5.0, 5.01)] == [False, True, True, False]


# ---------------------------------------------------------------------------------------------
# end to end on the tiny model: counts, and the equivalences with plain CFG
# ---------------------------------------------------------------------------------------------
def run_tiny(*overrides, steps=4, model=None):
    from framework.entry.api import run

    return run(["model=tiny_random", f"steps={steps}", "num_samples=2", "save_images=false", *overrides], model=model)


@pytest.mark.parametrize("overrides,inputs", [
    (["guidance=[perp_neg]", "guidance.perp_neg.negative=a blue square"], 3 * 4),
    (["guidance=[dual_cfg]", "guidance.dual_cfg.prompt2=a blue square"], 3 * 4),
    (["guidance=[regional,cfg]", "guidance.regional.regions=[{prompt: a, box: [0, 0, 0.5, 1]}, {prompt: b, box: [0.5, 0, 1, 1]}]"], 4 * 4),
    (["guidance=[timed_prompt,cfg]", "guidance.timed_prompt.prompt=a blue square"], 3 * 2 + 2 * 2),  # stop 0.5: 2 of 4 steps
])
def test_calls_and_inputs_are_counted_honestly(overrides, inputs):
    from framework.models.tiny import TinyRandom

    model = TinyRandom()
    seen = {"calls": 0, "rows": 0}

    def count(module, args, kwargs):
        seen["calls"] += 1
        seen["rows"] += (args[0] if args else kwargs["sample"]).shape[0]

    handle = model.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        res = run_tiny(*overrides, model=model)
    finally:
        handle.remove()
    m = res.record["metrics"]
    assert (m["unet_calls"], m["network_inputs"], m["nfe_pairs"]) == (4, inputs, inputs / 2)
    assert seen == {"calls": 4, "rows": inputs * 2}


def test_all_ones_region_timed_prompt_throughout_and_dual_cfg_scale_0_are_cfg_with_that_prompt(tmp_path):
    from PIL import Image

    white = tmp_path / "all.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(white)
    plain = run_tiny("guidance=[cfg]", "prompts=[a blue square]")
    box = run_tiny("guidance=[regional,cfg]", "guidance.regional.regions=[{prompt: a blue square, box: [0, 0, 1, 1]}]")
    mask = run_tiny("guidance=[regional,cfg]", f"guidance.regional.regions=[{{prompt: a blue square, mask: '{white}'}}]")
    timed = run_tiny("guidance=[timed_prompt,cfg]", "guidance.timed_prompt.prompt=a blue square", "guidance.timed_prompt.stop=1")
    dual = run_tiny("guidance=[dual_cfg]", "guidance.dual_cfg.prompt2=a blue square", "guidance.dual_cfg.scale=0")
    other = run_tiny("guidance=[cfg]")
    for r in (box, mask, timed, dual):  # measured: 1.07e-6 each (the 3-input call vs the 2-input one)
        assert rel(r.latents, plain.latents) <= 1e-5
    assert rel(other.latents, plain.latents) > 1e-3  # the prompt matters


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("masks")
    Image.fromarray(np.full((32, 48), 255, np.uint8)).save(d / "small.png")
    (d / "junk.png").write_bytes(b"not an image")
    return d


@pytest.mark.parametrize("argv,expected", [
    (["guidance=[regional,cfg]", "guidance.regional.regions=[{prompt: a, mask: '{d}/small.png'}]"], "is 48×32 pixels"),
    (["guidance=[regional,cfg]", "guidance.regional.regions=[{prompt: a, mask: '{d}/junk.png'}]"], "is not an image"),
    (["guidance=[regional,cfg]", "guidance.regional.regions=[{prompt: a, mask: '{d}/none.png'}]"], "not found"),
    (["guidance=[regional,cfg]", "guidance.regional.regions=[{prompt: a, box: [0, 0, 1.5, 1]}]"], "is outside the image"),
    (["guidance=[regional,cfg]", "guidance.regional.regions=[{prompt: a, box: [0.5, 0, 0.2, 1]}]"], "is outside the image"),
    (["guidance=[regional,cfg]", "guidance.regional.regions=[{box: [0, 0, 1, 1]}]"], "regions[0].prompt is missing"),
    (["guidance=[regional,cfg]", "guidance.regional.regions=[{prompt: a}]"], "needs exactly one of box"),
    (["guidance=[cfg,regional]", "guidance.regional.regions=[{prompt: a, box: [0, 0, 1, 1]}]"], "write guidance=[regional,cfg]"),
    (["guidance=[perp_neg]"], "negative"),
    (["guidance=[dual_cfg]"], "prompt2"),
    (["guidance=[timed_prompt,cfg]"], "prompt"),
    (["guidance=[perp_neg,cfg]", "guidance.perp_neg.negative=a"], "remove cfg"),
    (["guidance=[timed_prompt,cfg]", "guidance.timed_prompt.prompt=a", "guidance.timed_prompt.sigma_lo=3",
      "guidance.timed_prompt.sigma_hi=2"], "sigma_lo < sigma_hi"),
])
def test_bad_input_one_line_exit_2(capsys, argv, expected, tmp_path, masks):
    from framework.entry.cli import main

    argv = [a.replace("{d}", str(masks)) for a in argv]
    code = main(["model=tiny_random", *argv, f"hydra.run.dir={tmp_path}/r"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "r").exists()


def test_a_prompt_branch_on_an_unconditional_model_is_refused(capsys, tmp_path):
    from framework.entry.cli import main

    code = main(["model=gaussian", "guidance=[perp_neg]", "guidance.perp_neg.negative=a", f"hydra.run.dir={tmp_path}/r"])
    err = capsys.readouterr().err
    assert code == 2 and "takes no prompts" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_sd3", "tiny_flux"])
def test_the_families_take_prompt_branches(model):
    """SDXL's UNet (pooled text and time ids), SD3's and Flux's transformers: a prompt branch is
    encoded, stacked, counted, and a region of all ones is CFG with its prompt (≤ 1e-5)."""
    from framework.entry.api import run

    common = [f"model={model}", "steps=2", "num_samples=1", "save_images=false"]
    if model == "tiny_flux":  # guidance-distilled: a region without CFG first, then true CFG
        alone = run([*common, "guidance=[]", "prompts=[a blue square]"])
        region = run([*common, "guidance=[regional]", "guidance.regional.regions=[{prompt: a blue square, box: [0, 0, 1, 1]}]"])
        assert (region.record["metrics"]["unet_calls"], region.record["metrics"]["network_inputs"]) == (2, 4)
        assert rel(region.latents, alone.latents) <= 1e-5
        common.append("model.true_cfg=true")
    plain = run([*common, "guidance=[cfg]", "prompts=[a blue square]"])
    region = run([*common, "guidance=[regional,cfg]", "guidance.regional.regions=[{prompt: a blue square, box: [0, 0, 1, 1]}]"])
    perp = run([*common, "guidance=[perp_neg]", "guidance.perp_neg.negative=a blue square"])
    for r in (region, perp):
        assert (r.record["metrics"]["unet_calls"], r.record["metrics"]["network_inputs"]) == (2, 6)
    assert rel(region.latents, plain.latents) <= 1e-5
