"""The hook inside the network (framework.core.perturb, Model.predict's branches, framework.models.perturb).

- a perturbation acts on exactly the rows (branches) that asked for it: the CFG pair's rows are what
  they are without it (≤ 1e-5), the branch equals the network perturbed alone (≤ 1e-5) and differs
  from the unperturbed one;
- nothing is left behind on the network, also when the call raises;
- the counts are honest (network calls and inputs counted by a hook on the network itself);
- the row hooks agree with diffusers' own hooks (layer skip, attention-score skip, SEG) on the same
  tiny UNet / SD3 / Flux networks (≤ 1e-5 relative);
- bad input: a layer that does not exist, a model without attention, a text drop without cross-attention.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from framework.core.errors import ConfigError
from framework.core.perturb import Branch, Perturbation
from framework.core.state import Batch, Conditioning, Schedule
from framework.models import perturb


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def leftovers(net: torch.nn.Module) -> list[str]:
    """Modules carrying an instance-level forward (a wrapper not removed)."""
    return [n for n, m in net.named_modules() if "forward" in m.__dict__]


# ---------------------------------------------------------------------------------------------
# the adapter's predict, on the tiny SD UNet
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd():
    from framework.models.tiny import TinyRandom

    model = TinyRandom()
    model.setup(torch.device("cpu"), torch.float32)
    prompts = ["a red circle", "a blue square"]
    cond = Conditioning(prompts=prompts, tensors=model.encode_prompts(prompts), uncond=model.encode_prompts(["", ""]))
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0)) * 3
    return model, cond, x


def predict(model, cond, x, branches=(), uncond_pass=True, maps=None, sigma=3.0):
    run = SimpleNamespace(branches=list(branches), uncond_pass=uncond_pass, attention_maps=maps or {})
    batch = Batch(indices=[0, 1], cond=cond, noise=None)
    state = SimpleNamespace(run=run, batch=batch, schedule=Schedule((sigma, 0.0)), index=0)
    with torch.no_grad():
        return model.predict(state=state, x=x, sigma=sigma, cond=cond), batch


@pytest.mark.parametrize("kind", ["identity_attention", "blur_attention", "skip_blocks", "drop_text_attention"])
def test_the_perturbation_acts_on_its_branch_only(sd, kind):
    model, cond, x = sd
    p = Perturbation(kind, (0, 1), blur_sigma=1.0)
    plain, b0 = predict(model, cond, x)
    pred, b1 = predict(model, cond, x, [Branch("p", p)])
    assert (b0.unet_calls, b0.network_inputs, b1.unet_calls, b1.network_inputs) == (1, 2, 1, 3)
    assert rel(pred.cond_denoised, plain.cond_denoised) <= 1e-5
    assert rel(pred.uncond_denoised, plain.uncond_denoised) <= 1e-5
    # the branch alone: the conditional rows through the perturbed network
    t = torch.tensor(float(model.timestep_of(3.0, None)))
    with torch.no_grad(), model.perturbed([(slice(0, 2), p)], {}):
        alone = model.denoise_batch(x, 3.0, None, cond.tensors)
    assert rel(pred.branches["p"], alone) <= 1e-5
    assert rel(pred.branches["p"], plain.cond_denoised) > 1e-3  # the perturbation does something
    assert leftovers(model.unet) == []
    del t


def test_a_separate_call_when_the_adapter_cannot_perturb_slices(sd, monkeypatch):
    model, cond, x = sd
    branch = Branch("pag", Perturbation("identity_attention", (1,)))
    one, b1 = predict(model, cond, x, [branch])
    monkeypatch.setattr(model, "perturbs_slices", False)
    two, b2 = predict(model, cond, x, [branch])
    assert (b1.unet_calls, b2.unet_calls, b1.network_inputs, b2.network_inputs) == (1, 2, 3, 3)
    for a, b in ((one.branches["pag"], two.branches["pag"]), (one.cond_denoised, two.cond_denoised),
                 (one.uncond_denoised, two.uncond_denoised)):
        assert rel(a, b) <= 1e-5


def test_a_branch_on_the_negative_prompt_replaces_the_unconditional_pass(sd):
    model, cond, x = sd
    branch = Branch("ag", Perturbation("skip_blocks", (1,)), prompt="uncond")
    pred, batch = predict(model, cond, x, [branch], uncond_pass=False)
    assert pred.uncond_denoised is None and batch.network_inputs == 2
    with torch.no_grad(), model.perturbed([(slice(0, 2), branch.perturbation)], {}):
        alone = model.denoise_batch(x, 3.0, None, cond.uncond)
    assert rel(pred.branches["ag"], alone) <= 1e-5


def test_inactive_branches_cost_nothing(sd):
    model, cond, x = sd
    off = Branch("p", Perturbation("identity_attention", (1,)), when=lambda state, sigma: sigma < 1.0)
    pred, batch = predict(model, cond, x, [off])
    assert pred.branches == {} and (batch.unet_calls, batch.network_inputs) == (1, 2)


def test_nothing_is_left_behind_when_the_call_raises(sd):
    model, cond, x = sd
    victim = model.unet.up_blocks[1].attentions[1].proj_out

    def boom(*a, **k):
        raise RuntimeError("injected failure inside the network")

    kinds = [Perturbation("identity_attention", (0, 1, 2, 3)), Perturbation("skip_blocks", (0, 3)),
             Perturbation("blur_attention", (1,)), Perturbation("drop_text_attention", (2,))]
    victim.forward = boom
    try:
        with pytest.raises(RuntimeError, match="injected"):
            predict(model, cond, x, [Branch(f"b{i}", p) for i, p in enumerate(kinds)], maps={"m": 1})
        assert leftovers(model.unet) == [n for n, m in model.unet.named_modules() if m is victim]
    finally:
        del victim.forward
    assert leftovers(model.unet) == []
    plain, _ = predict(model, cond, x)
    again, _ = predict(model, cond, x)
    assert rel(again.cond_denoised, plain.cond_denoised) <= 1e-6  # the network works as before


def test_attention_maps_are_the_softmax_of_the_layer(sd):
    model, cond, x = sd
    pred, _ = predict(model, cond, x, maps={"m": 1})
    cond_map = pred.attention["m"]["cond"]
    assert cond_map.shape[0] == 2 and cond_map.shape[-1] == cond_map.shape[-2]
    assert torch.allclose(cond_map.sum(-1), torch.ones_like(cond_map.sum(-1)), atol=1e-5)  # rows of a softmax
    assert rel(pred.attention["m"]["uncond"], cond_map) > 1e-4  # two different prompts, two maps


# ---------------------------------------------------------------------------------------------
# honest counts, through the engine
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance,calls,inputs", [
    ("[cfg]", 1, 2), ("[cfg,pag]", 1, 3), ("[pag]", 1, 2), ("[cfg,seg]", 1, 3), ("[cfg,sag]", 2, 3), ("[autoguidance]", 1, 2),
])
def test_calls_and_inputs_are_counted_honestly(guidance, calls, inputs):
    from framework.entry.api import run
    from framework.models.tiny import TinyRandom

    model = TinyRandom()
    seen = {"calls": 0, "rows": 0}

    def count(module, args, kwargs):
        seen["calls"] += 1
        seen["rows"] += (args[0] if args else kwargs["sample"]).shape[0]

    handle = model.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        res = run(["model=tiny_random", f"guidance={guidance}", "steps=3", "num_samples=2", "save_images=false"], model=model)
    finally:
        handle.remove()
    m = res.record["metrics"]
    assert (m["unet_calls"], m["network_inputs"], m["nfe_pairs"]) == (3 * calls, 3 * inputs, 1.5 * inputs)
    assert seen == {"calls": 3 * calls, "rows": 3 * inputs * 2}  # 2 samples a row each
    assert "CFG pair" in res.record["nfe_convention"]
    assert leftovers(model.unet) == []


# ---------------------------------------------------------------------------------------------
# the row hooks vs diffusers' own hooks, same tiny networks
# ---------------------------------------------------------------------------------------------
def _unet():
    from framework.models.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline(seed=1).unet.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    ehs = torch.randn(3, 77, 32, generator=g)
    return unet, lambda x_, e_: unet(x_, torch.tensor(500.0), encoder_hidden_states=e_, return_dict=False)[0], (x, ehs)


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(2)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
                                num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
                                pooled_projection_dim=80, pos_embed_max_size=16).eval()
    g = torch.Generator().manual_seed(2)
    x, ehs, pooled = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 12, 96, generator=g), torch.randn(3, 80, generator=g)

    def call(x_, e_):
        n = x_.shape[0]
        return net(hidden_states=x_, encoder_hidden_states=e_, pooled_projections=pooled[:n] if n == 3 else pooled[-n:],
                   timestep=torch.full((n,), 500.0), return_dict=False)[0]
    return net, call, (x, ehs)


def _flux():
    from diffusers import FluxTransformer2DModel

    from framework.models.reference_loops import latent_image_ids

    torch.manual_seed(3)
    net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=96, pooled_projection_dim=32,
                                 guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    g = torch.Generator().manual_seed(3)
    x, ehs, pooled = torch.randn(3, 16, 64, generator=g), torch.randn(3, 12, 96, generator=g), torch.randn(3, 32, generator=g)
    img_ids, txt_ids = latent_image_ids(8, 8), torch.zeros(12, 3)

    def call(x_, e_):
        n = x_.shape[0]
        return net(hidden_states=x_, encoder_hidden_states=e_, pooled_projections=pooled[-n:], timestep=torch.full((n,), 0.5),
                   guidance=torch.full((n,), 3.5), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
    return net, call, (x, ehs)


NETS = {"unet": _unet, "sd3": _sd3, "flux": _flux}
#: (net, my layer index, diffusers' fqn and index of the same block)
SITES = {"unet": (1, "mid_block.attentions.0.transformer_blocks", 0), "sd3": (1, "transformer_blocks", 1),
         "flux": (3, "single_transformer_blocks", 1)}


def _theirs(net, call, inputs, fqn, index, kind):
    """diffusers' hook on the network, the last row evaluated alone, the hook removed."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.layer_skip import LayerSkipConfig, _apply_layer_skip_hook
    from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig, _apply_smoothed_energy_guidance_hook

    if kind == "blur_attention":  # diffusers 0.42 takes the mean below its threshold: our σ = ∞
        _apply_smoothed_energy_guidance_hook(net, SmoothedEnergyGuidanceConfig([index], fqn=fqn), 1.0, name="theirs")
    else:
        skip_all = kind == "skip_blocks"
        _apply_layer_skip_hook(net, LayerSkipConfig([index], fqn=fqn, skip_attention=skip_all, skip_ff=skip_all,
                                                    skip_attention_scores=not skip_all), name="theirs")
    try:
        with torch.no_grad():
            return call(inputs[0][2:], inputs[1][2:])
    finally:
        HookRegistry.check_if_exists_or_initialize(net).remove_hook("theirs", recurse=True)


@pytest.fixture
def joint_processor_known():
    """diffusers 0.42's layer-skip hook looks up the attention processor's "skip output" function even
    for ``skip_attention_scores`` (where it is never called), and SD3's JointAttnProcessor2_0 is not in
    its registry: registered here for the test (the function raises if called), removed afterwards."""
    from diffusers.hooks._helpers import AttentionProcessorMetadata, AttentionProcessorRegistry
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    def never(*args, **kwargs):
        raise AssertionError("not used with skip_attention_scores")

    AttentionProcessorRegistry._register()
    added = JointAttnProcessor2_0 not in AttentionProcessorRegistry._registry
    if added:
        AttentionProcessorRegistry.register(JointAttnProcessor2_0, AttentionProcessorMetadata(never))
    yield
    if added:
        AttentionProcessorRegistry._registry.pop(JointAttnProcessor2_0)


def _removed(net, call, inputs, fqn, index):
    """The last row through the network with the block taken out of its list: skipping it."""
    blocks = net.get_submodule(fqn)
    saved = list(blocks)
    parent, _, name = fqn.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, name, torch.nn.ModuleList(b for i, b in enumerate(saved) if i != index))
    try:
        with torch.no_grad():
            return call(inputs[0][2:], inputs[1][2:])
    finally:
        setattr(net.get_submodule(parent) if parent else net, name, blocks)


@pytest.mark.parametrize("family", ["unet", "sd3", "flux"])
@pytest.mark.parametrize("kind", ["identity_attention", "skip_blocks", "blur_attention"])
def test_row_hooks_agree_with_diffusers_hooks(family, kind, joint_processor_known):
    """Reference: diffusers' own hook — except where diffusers 0.42 cannot run it: its block-skip
    hook returns (hidden, text) whatever the block's order, which breaks SD3's and Flux's blocks
    (they return (text, hidden)), so there the block is taken out of its list instead; and Flux's
    attention modules lack the ``is_cross_attention`` its attention hooks read (set to False here,
    the value it means)."""
    net, call, inputs = NETS[family]()
    mine_index, fqn, index = SITES[family]
    p = Perturbation(kind, (mine_index,), blur_sigma=math.inf)
    assert perturb.transformer_blocks(net)[mine_index][1] is net.get_submodule(fqn)[index]
    with torch.no_grad():
        plain = call(*inputs)
        with perturb.perturbed(net, [(slice(2, 3), p)], {}, 1.0):
            mine = call(*inputs)
    assert leftovers(net) == []
    if kind == "skip_blocks":
        removed = _removed(net, call, inputs, fqn, index)
        assert rel(mine[2:], removed) <= 1e-5, f"{family} {kind}: {rel(mine[2:], removed):.2e}"
    if kind == "skip_blocks" and family != "unet":
        theirs = removed
    else:
        for m in net.modules():
            if type(m).__name__ == "FluxAttention" and not hasattr(m, "is_cross_attention"):
                m.is_cross_attention = False
        theirs = _theirs(net, call, inputs, fqn, index, kind)
    assert rel(mine[2:], theirs) <= 1e-5, f"{family} {kind}: {rel(mine[2:], theirs):.2e}"
    assert rel(mine[:2], plain[:2]) <= 1e-5  # the other rows untouched
    assert rel(theirs, plain[2:]) > 1e-4  # and the perturbation changes the output


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_a_layer_that_does_not_exist_names_the_valid_range(sd):
    model, _, _ = sd
    with pytest.raises(ConfigError, match=r"layer 7 does not exist: model TinyRandom has layers 0–3"):
        model.check_perturbation(Perturbation("identity_attention", (1, 7)))


def test_a_model_without_attention_is_refused():
    from framework.models.analytic import Gaussian
    from framework.models.base import wrap_model

    model = wrap_model(Gaussian())
    with pytest.raises(ConfigError, match="has no attention layers to perturb"):
        model.check_perturbation(Perturbation("skip_blocks", (0,)))


def test_text_drop_needs_cross_or_joint_attention():
    """SD3's joint blocks take it (image queries stop reading text keys: tests/models/test_joint_text_drop.py);
    a block with neither cross- nor joint attention does not."""
    from diffusers.models.attention import BasicTransformerBlock

    net, _, _ = _sd3()
    perturb.check(net, Perturbation("drop_text_attention", (0,)))
    with pytest.raises(ConfigError, match="no cross-attention to drop"):
        perturb.check(torch.nn.Sequential(BasicTransformerBlock(8, 2, 4)), Perturbation("drop_text_attention", (0,)))


@pytest.mark.parametrize("args,match", [
    (dict(kind="nope", layers=(0,)), "unknown perturbation 'nope'"),
    (dict(kind="skip_blocks", layers=()), "non-empty list"),
    (dict(kind="blur_attention", layers=(0,), blur_sigma=0.0), "blur_sigma must be > 0"),
])
def test_perturbation_fields_are_checked(args, match):
    with pytest.raises(ConfigError, match=match):
        Perturbation(**args)


def test_nothing_is_left_behind_when_a_step_raises(monkeypatch):
    """A solver that evaluates (with the PAG branch and a SAG map) and then fails: the run stops with
    the solver named, and the network carries no wrapper."""
    from framework.core.errors import PluginError
    from framework.core.markers import hookimpl
    from framework.entry.api import run
    from framework.models.tiny import TinyRandom
    from plugins.solver.euler import Euler

    def failing(self, state, denoise):
        denoise(state.x * 0.9, state.sigma)
        raise RuntimeError("solver failure after an evaluation")

    monkeypatch.setattr(Euler, "step", hookimpl(failing))
    model = TinyRandom()
    with pytest.raises(PluginError, match="solver failure"):
        run(["model=tiny_random", "guidance=[cfg,pag,sag]", "steps=3", "num_samples=1", "save_images=false"], model=model)
    assert leftovers(model.unet) == []


def test_a_resumed_run_reports_the_same_counts(tmp_path):
    """The batch files keep the input count, so a run read back from its folder reports it too."""
    from framework.entry.api import run

    args = ["model=tiny_random", "guidance=[cfg,pag]", "steps=2", "num_samples=2", "batch_size=1"]
    first = run(args, output_dir=tmp_path / "r")
    again = run([*args, "num_samples=3"], output_dir=tmp_path / "r2")  # a fresh folder: 3 batches sampled
    (tmp_path / "r2" / "record.json").unlink()  # unfinished: the next call resumes its batches
    resumed = run([*args, "num_samples=3"], output_dir=tmp_path / "r2")
    assert resumed.resumed == [0, 1, 2]
    for res in (first, again, resumed):
        assert (res.record["metrics"]["network_inputs"], res.record["metrics"]["nfe_pairs"]) == (6, 3)
