"""Text embeddings (framework/bases/embeddings.py) and the conditioning plugins: exact references.

References: diffusers' ``pipe.encode_prompt`` (no edit, ≤ 1e-6), re-prompting (a swap of one
single-token word for another equals writing the other word), diffusers' ``load_textual_inversion``
(learned tokens), A1111's weighting arithmetic, save → load round trips in every format.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from framework.entry.api import run
from framework.entry.compose import compose
from framework.bases.embeddings import (
    LearnedTokens,
    TextEmbeddings,
    apply_prompt_weights,
    load_embeddings,
    mix_outputs,
    mix_tokens,
    parse_prompt_weights,
    replace_token,
    save_embeddings,
    scale_positions,
)
from framework.core import engine
from framework.models.base import wrap_model
from framework.core.errors import ConfigError
from plugins.conditioning.position_scale import PositionScale
from plugins.conditioning.prompt_mix import PromptMix
from plugins.conditioning.prompt_weighting import PromptWeighting
from plugins.conditioning.textual_inversion import TextualInversion
from plugins.conditioning.token_mix import TokenMix
from plugins.conditioning.token_swap import TokenSwap

TOL = 1e-6


@pytest.fixture(scope="module")
def bundled():
    from framework.bundled import PIPELINE_DIR
    from framework.models.diffusers_sd import load_pipeline

    return load_pipeline(str(PIPELINE_DIR))


@pytest.fixture(params=["bundled", "tiny"])
def pipe(request, bundled, tiny_pipe):
    return bundled if request.param == "bundled" else tiny_pipe


def words(pipe) -> tuple[str, str]:
    """Two single-token words of the pipeline's vocabulary (the tiny tokenizer is per character)."""
    return ("red", "blue") if len(pipe.tokenizer) > 100 else ("x", "y")


def reference(pipe, prompts):
    with torch.no_grad():
        return pipe.encode_prompt(prompts, "cpu", 1, False)[0]


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Encoding, tokens, tables
# ---------------------------------------------------------------------------------------------
def test_encode_without_edits_is_encode_prompt(pipe):
    prompts = ["a red circle", "", "an orange square above a large blue triangle on a gray background " * 8]
    emb = TextEmbeddings.of(pipe)
    with torch.no_grad():
        assert maxdiff(emb.encode(prompts), reference(pipe, prompts)) <= TOL
        # the general tokenizer path (used for weights and learned tokens) gives the same ids
        general = emb.inputs(prompts, parse_weights=True)
        assert torch.equal(general.ids, emb.inputs(prompts).ids)
        assert maxdiff(emb.encode_inputs(general), reference(pipe, prompts)) <= TOL


def test_tokens_ids_and_tables(bundled):
    emb = TextEmbeddings.of(bundled)
    toks = emb.tokens("a red circle")
    assert [t for _, t in toks] == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert [i for i, _ in toks] == bundled.tokenizer("a red circle").input_ids
    assert "red</w>" in emb.show("a red circle")
    assert emb.token_table.shape == (len(bundled.tokenizer), emb.width)
    assert emb.position_table.shape[0] == 77
    assert emb.token_id("red") == emb.token_id("red</w>")
    assert torch.equal(emb.vector("red"), emb.token_table[emb.token_id("red")])
    assert emb.nearest(emb.vector("blue"), 1)[0][0] == "blue</w>"
    with pytest.raises(ConfigError, match="5 tokens"):
        emb.token_id("striped")


# ---------------------------------------------------------------------------------------------
# Input-embedding edits
# ---------------------------------------------------------------------------------------------
def test_token_swap_equals_writing_the_other_word(pipe):
    a, b = words(pipe)
    emb = TextEmbeddings.of(pipe)
    with torch.no_grad():
        swapped = emb.encode([f"a {a} circle", "a circle"], [TokenSwap(source=a, target=b)])
        assert maxdiff(swapped, reference(pipe, [f"a {b} circle", "a circle"])) <= TOL
        assert maxdiff(swapped, reference(pipe, [f"a {a} circle", "a circle"])) > 1e-3
        by_vector = emb.encode_inputs(replace_token(emb.inputs([f"a {a} circle"]), emb, a, emb.vector(b).clone()))
        assert maxdiff(by_vector, swapped[:1]) <= TOL


def test_token_mix_is_the_weighted_sum_of_embeddings(bundled):
    emb = TextEmbeddings.of(bundled)
    inputs = emb.inputs(["a red circle"])
    mixed = mix_tokens(inputs, emb, "red", {"red": 0.5, "blue": 0.5})
    pos = emb.token_id("red")
    assert torch.allclose(mixed.token_embeds[0, 2], (emb.vector("red") + emb.vector("blue")) / 2, atol=1e-7)
    assert torch.equal(mixed.token_embeds[0, 3:], inputs.token_embeds[0, 3:]) and inputs.ids[0, 2] == pos
    with torch.no_grad():
        identity = emb.encode(["a red circle"], [TokenMix(token="red", tokens=["red"], weights=[1.0])])
        assert maxdiff(identity, reference(bundled, ["a red circle"])) <= TOL
        all_blue = emb.encode(["a red circle"], [TokenMix(token="red", tokens=["blue"], weights=[1.0])])
        assert maxdiff(all_blue, reference(bundled, ["a blue circle"])) <= TOL


def test_position_scale(pipe):
    emb = TextEmbeddings.of(pipe)
    inputs = emb.inputs(["a red circle"])
    half = scale_positions(inputs, 0.5, start=1, end=4)
    assert torch.equal(half.position_embeds[0, 1:4], inputs.position_embeds[0, 1:4] * 0.5)
    assert torch.equal(half.position_embeds[0, 4:], inputs.position_embeds[0, 4:])
    assert torch.equal(half.position_embeds[0, 0], inputs.position_embeds[0, 0])
    with torch.no_grad():
        assert maxdiff(emb.encode(["a red circle"], [PositionScale(scale=1.0)]), reference(pipe, ["a red circle"])) <= TOL
        assert maxdiff(emb.encode(["a red circle"], [PositionScale(scale=0.0)]), reference(pipe, ["a red circle"])) > 1e-3
    with pytest.raises(ConfigError, match="outside"):
        scale_positions(inputs, 0.5, start=5, end=3)


# ---------------------------------------------------------------------------------------------
# Output embeddings: prompt mix and prompt weighting
# ---------------------------------------------------------------------------------------------
def test_prompt_mix_interpolates_output_embeddings(bundled):
    emb = TextEmbeddings.of(bundled)
    with torch.no_grad():
        red, blue = reference(bundled, ["a red circle"]), reference(bundled, ["a blue circle"])
        mixed = emb.encode(["a red circle"], [PromptMix(prompt="a blue circle", weight=0.25)])
        assert maxdiff(mixed, 0.75 * red + 0.25 * blue) <= TOL
        assert maxdiff(mix_outputs(red, blue, 1.0), blue) <= TOL
        # the second prompt gets the other edits too (here: blue → red makes both prompts equal)
        both = emb.encode(["a red circle"], [PromptMix(prompt="a blue circle"), TokenSwap(source="blue", target="red")])
        assert maxdiff(both, red) <= TOL


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("a red circle", [("a red circle", 1.0)]),
        ("a (red:1.3) circle", [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]),
        ("((red)) [blue]", [("red", 1.21), (" ", 1.0), ("blue", 1 / 1.1)]),
        ("a ((red):0.5) x", [("a ", 1.0), ("red", 0.55), (" x", 1.0)]),
        (r"a \(red\) circle", [("a (red) circle", 1.0)]),
        ("a (red circle", [("a ", 1.0), ("red circle", 1.1)]),
        ("a red) circle", [("a red) circle", 1.0)]),
        ("time: 3 (x:0.7)", [("time: 3 ", 1.0), ("x", 0.7)]),
    ],
)
def test_parse_prompt_weights(prompt, expected):
    got = parse_prompt_weights(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_prompt_weighting_scales_the_token_and_keeps_the_mean(pipe):
    a, _ = words(pipe)
    emb = TextEmbeddings.of(pipe)
    with torch.no_grad():
        plain = reference(pipe, [f"a {a} circle"])
        assert maxdiff(emb.encode([f"(a {a} circle:1)"], [PromptWeighting()]), plain) <= TOL
        raw = emb.encode([f"a ({a}:1.5) circle"], [PromptWeighting(normalize=False)])
        i = [t for _, t in emb.tokens(f"a {a} circle")].index(f"{a}</w>")
        assert maxdiff(raw[0, i], 1.5 * plain[0, i]) <= TOL
        others = torch.ones(raw.shape[1], dtype=torch.bool)
        others[i] = False
        assert maxdiff(raw[0, others], plain[0, others]) <= TOL
        normed = emb.encode([f"a ({a}:1.5) circle"], [PromptWeighting()])
        assert abs(normed.mean().item() - plain.mean().item()) <= TOL
        assert maxdiff(normed, raw * plain.mean() / raw.mean()) <= TOL
    w = torch.ones(1, 77)
    w[0, 2] = 2.0
    h = torch.randn(1, 77, 8)
    assert torch.allclose(apply_prompt_weights(h, w).mean(), h.mean(), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Textual inversion: formats, round trips, parity with diffusers
# ---------------------------------------------------------------------------------------------
FILES = [("learned_embeds.safetensors", "diffusers"), ("learned_embeds.bin", "diffusers"),
         ("striped.pt", "a1111"), ("striped.safetensors", "a1111")]


@pytest.mark.parametrize("name,fmt", FILES, ids=[f"{f}-{n}" for n, f in FILES])
@pytest.mark.parametrize("n_vectors", [1, 3])
def test_embedding_file_round_trip_gives_identical_conditioning(tmp_path, tiny_pipe, name, fmt, n_vectors):
    emb = TextEmbeddings.of(tiny_pipe)
    vecs = torch.randn(n_vectors, emb.width, generator=torch.Generator().manual_seed(n_vectors))
    path = save_embeddings(tmp_path / name, {"striped": vecs}, format=fmt)
    loaded = load_embeddings(path, token="<striped>")
    assert list(loaded) == ["<striped>"] and torch.equal(loaded["<striped>"], vecs)
    prompts = ["a <striped> circle", "<striped>, <striped> and a square"]
    with torch.no_grad():
        direct = emb.encode(prompts, [LearnedTokens({"<striped>": vecs})])
        from_file = emb.encode(prompts, [TextualInversion(path=str(path), token="<striped>")])
    assert torch.equal(direct, from_file)
    if fmt == "diffusers":  # the file's own token name survives
        assert list(load_embeddings(path)) == ["striped"]


@pytest.mark.parametrize("n_vectors", [1, 2])
def test_learned_tokens_match_diffusers_load_textual_inversion(tmp_path, tiny_pipe, n_vectors):
    vecs = torch.randn(n_vectors, TextEmbeddings.of(tiny_pipe).width, generator=torch.Generator().manual_seed(7))
    path = save_embeddings(tmp_path / "learned_embeds.safetensors", {"<cat-toy>": vecs})
    ref_pipe = copy.deepcopy(tiny_pipe)
    ref_pipe.load_textual_inversion(str(path))
    prompts = ["a <cat-toy> on a mat", "two <cat-toy> <cat-toy>", "no token"]
    with torch.no_grad():
        ours = TextEmbeddings.of(tiny_pipe).encode(prompts, [TextualInversion(path=str(path))])
        theirs = ref_pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    assert maxdiff(ours, theirs) <= TOL
    assert len(tiny_pipe.tokenizer) < len(ref_pipe.tokenizer)  # ours left the shared tokenizer alone


def test_embedding_file_errors(tmp_path, tiny_pipe):
    with pytest.raises(ConfigError, match="does not exist"):
        load_embeddings(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="no learned_embeds"):
        load_embeddings(tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="cannot read"):
        load_embeddings(tmp_path / "bad.pt")
    wide = save_embeddings(tmp_path / "wide.safetensors", {"<w>": torch.zeros(1, 999)})
    with pytest.raises(ConfigError, match="width 999"):
        TextualInversion(path=str(wide)).new_tokens(TextEmbeddings.of(tiny_pipe))
    with pytest.raises(ConfigError, match="one token"):
        save_embeddings(tmp_path / "two.pt", {"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, format="a1111")


# ---------------------------------------------------------------------------------------------
# Plugins inside runs: config, CFG's negative prompts, chains, errors
# ---------------------------------------------------------------------------------------------
def encode_run(overrides: list[str], prompts: list[str]):
    """The conditioning a run samples with (the engine's own ``condition``)."""
    cfg, choices = compose(overrides)
    r = engine.open_run(cfg, choices, wrap_model)
    with torch.no_grad():
        return engine.condition(r, prompts)


def test_token_swap_from_config_edits_prompts_and_negative_prompts(tiny_overrides, tiny_pipe):
    base = tiny_overrides + ["conditioning=[token_swap]", "conditioning.token_swap.source=x", "conditioning.token_swap.target=y",
                             "negative_prompt=x"]
    cond = encode_run(base, ["a x circle"])
    assert maxdiff(cond.tensors["encoder_hidden_states"], reference(tiny_pipe, ["a y circle"])) <= TOL
    assert maxdiff(cond.uncond["encoder_hidden_states"], reference(tiny_pipe, ["y"])) <= TOL
    cond_only = encode_run(base + ["conditioning.token_swap.apply_to=cond"], ["a x circle"])
    assert maxdiff(cond_only.uncond["encoder_hidden_states"], reference(tiny_pipe, ["x"])) <= TOL


def test_chain_of_plugins_applies_all_in_config_order(tiny_overrides, tiny_pipe):
    over = tiny_overrides + ["conditioning=[token_swap,prompt_weighting,position_scale]", "conditioning.token_swap.source=x",
                             "conditioning.token_swap.target=y", "conditioning.position_scale.scale=1.0", "cfg_scale=1.0"]
    cond = encode_run(over, ["a (x:1.2) circle"])
    emb = TextEmbeddings.of(tiny_pipe)
    with torch.no_grad():
        expected = emb.encode(["a (y:1.2) circle"], [PromptWeighting()])
    assert maxdiff(cond.tensors["encoder_hidden_states"], expected) <= TOL
    assert cond.uncond is None


@pytest.mark.parametrize("name", ["token_swap", "token_mix", "position_scale", "prompt_mix", "prompt_weighting"])
def test_every_plugin_runs_from_config_and_changes_the_samples(tiny_overrides, name):
    base = tiny_overrides + ["steps=2", "num_samples=1", "batch_size=1", "prompts=['a x (circle:1.5)']"]
    extra = {
        "token_swap": ["conditioning.token_swap.source=x", "conditioning.token_swap.target=y"],
        "token_mix": ["conditioning.token_mix.token=x", "conditioning.token_mix.tokens=[x,y]"],
        "prompt_mix": ["conditioning.prompt_mix.prompt=a square"],
    }.get(name, [])
    plain = run(base).latents
    edited = run(base + [f"conditioning=[{name}]"] + extra)
    assert maxdiff(edited.latents, plain) > 1e-6


def test_swap_run_equals_run_with_the_other_word(tiny_overrides):
    base = tiny_overrides + ["steps=3", "num_samples=2", "batch_size=2"]
    swapped = run(base + ["prompts=[a x circle]", "conditioning=[token_swap]", "conditioning.token_swap.source=x",
                          "conditioning.token_swap.target=y"]).latents
    assert maxdiff(swapped, run(base + ["prompts=[a y circle]"]).latents) <= 1e-5


def test_textual_inversion_from_config(tmp_path, tiny_overrides, tiny_pipe):
    vecs = torch.randn(2, TextEmbeddings.of(tiny_pipe).width, generator=torch.Generator().manual_seed(3))
    path = save_embeddings(tmp_path / "learned_embeds.safetensors", {"<s>": vecs})
    over = tiny_overrides + ["conditioning=[textual_inversion]", f"conditioning.textual_inversion.path={tmp_path}",
                             "negative_prompt='<s>'"]
    cond = encode_run(over, ["a <s> circle"])
    with torch.no_grad():
        emb = TextEmbeddings.of(tiny_pipe)
        assert maxdiff(cond.tensors["encoder_hidden_states"], emb.encode(["a <s> circle"], [LearnedTokens({"<s>": vecs})])) <= TOL
        assert maxdiff(cond.uncond["encoder_hidden_states"], emb.encode(["<s>"], [LearnedTokens({"<s>": vecs})])) <= TOL
    assert path.exists()


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["conditioning=[textual_inversion]"], "path is empty"),
        (["conditioning=[prompt_mix]"], "prompt is empty"),
        (["conditioning=[token_mix]", "conditioning.token_mix.weights=[1.0]"], "one weight per token"),
        (["conditioning=[token_swap]", "conditioning.token_swap.source=xyz"], "3 tokens"),
        (["conditioning=[token_swap]", "conditioning.token_swap.apply_to=all"], "apply_to"),
    ],
)
def test_clear_errors(tiny_overrides, overrides, match):
    with pytest.raises(ConfigError, match=match):
        run(tiny_overrides + ["steps=1", "num_samples=1", "batch_size=1"] + overrides)


def test_edit_plugins_need_a_text_model():
    with pytest.raises(ConfigError, match="no CLIP text encoder"):
        run(["model=gaussian", "conditioning=[token_swap]", "steps=1", "num_samples=1", "batch_size=1"])


# ---------------------------------------------------------------------------------------------
# Training: python -m experiments.textual_inversion
# ---------------------------------------------------------------------------------------------
def ti_config(**over):
    from omegaconf import OmegaConf

    from experiments.embeddings_study.__main__ import TI_DIR
    from experiments.harness import Experiment

    return OmegaConf.merge(Experiment.compose(TI_DIR, []).cfg, over)


def test_striped_scene_captions_place_the_token_before_the_colour_or_after_the_shape():
    """token_place=colour: "a <striped> red circle …"; shape: "a red circle <striped> …" (the causal text
    tower then leaves the caption's colour and shape rows as they were); the prompts follow the captions."""
    from experiments.textual_inversion.__main__ import striped_scenes, with_token
    from framework.bundled.world import COLOURS, SHAPES
    from framework.plugin import ConfigError

    _, before = striped_scenes(6, 3, "<s>")
    images, after = striped_scenes(6, 3, "<s>", "shape")
    assert images.shape[0] == 6 and all(c.count("<s>") == 1 for c in before + after)
    for b, a in zip(before, after):
        assert b.replace("<s> ", "") == a.replace(" <s>", "")  # the same caption, the token moved
        assert any(f"<s> {c}" in b for c in COLOURS) and any(f"{s} <s>" in a for s in SHAPES)
    assert with_token("red", "circle", "<s>") == "a <s> red circle"
    assert with_token("red", "circle", "<s>", "shape") == "a red circle <s>"
    with pytest.raises(ConfigError, match="token_place"):
        striped_scenes(2, 0, "<s>", "end")


@pytest.mark.slow  # loads the bundled model and draws scenes (~15 s of CPU); the tiny-folder test below covers training
def test_textual_inversion_fast_run_on_striped_scenes(tmp_path):
    from experiments.textual_inversion.__main__ import load_pipe, train

    out = tmp_path / "ti"
    summary = train(ti_config(fast=True, out=str(out)))
    learned = load_embeddings(out / "learned_embeds.safetensors")
    assert list(learned) == ["<striped>"] and learned["<striped>"].shape == (4, 128)  # num_vectors: 4
    start = TextEmbeddings.of(load_pipe("bundled"))
    assert not torch.equal(learned["<striped>"][0], start.vector("shape"))  # the vector moved
    assert (out / "checkpoints" / "learned_embeds-4.safetensors").exists() and (out / "train_images.png").exists()
    assert summary["steps"] == 4 and summary["resumed_from"] == 0
    again = train(ti_config(fast=True, out=str(out)))
    assert again["resumed_from"] == 4
    assert torch.equal(load_embeddings(out / "learned_embeds.safetensors")["<striped>"], learned["<striped>"])


def test_textual_inversion_on_the_flow_model_trains_both_encoders_token(tmp_path):
    """model=bundled_flow (an SD3 pipeline): the rectified-flow loss trains the token, and the file
    it writes acts in a flow run through conditioning=[textual_inversion] (both CLIP encoders)."""
    from experiments.textual_inversion.__main__ import load_pipe, train

    out = tmp_path / "ti"
    summary = train(ti_config(fast=True, model="bundled_flow", out=str(out)))
    learned = load_embeddings(out / "learned_embeds.safetensors")["<striped>"]
    assert learned.shape == (4, 128) and summary["steps"] == 4 and math.isfinite(summary["loss_last_20"])
    assert not torch.equal(learned[0], TextEmbeddings.of(load_pipe("bundled_flow")).vector("shape"))
    base = ["model=bundled_flow", "steps=2", "num_samples=1", "batch_size=1", "save_images=false",
            "prompts=['a <striped> red circle']"]
    use = ["conditioning=[textual_inversion]", f"conditioning.textual_inversion.path='{out / 'learned_embeds.safetensors'}'"]
    with_token, as_text = run(base + use, output_dir=tmp_path / "a"), run(base, output_dir=tmp_path / "b")
    assert (with_token.latents - as_text.latents).abs().max() > 1e-3  # the token's vectors, not its characters


def test_custom_diffusion_trains_only_the_text_key_values_and_the_token(tmp_path):
    """train_kv=true on the flow model (Custom Diffusion): the written pipeline differs from the
    shipped one in the context stream's add_k_proj/add_v_proj only, resumes from its checkpoints,
    and runs through the engine as model=sd3 with the token (experiments.bundled_flow.asked)."""
    from safetensors.torch import load_file

    from experiments.textual_inversion.__main__ import load_pipe, text_kv_layers, train
    from framework.bundled import PIPELINE_DIR, WEIGHTS_DIR

    out = tmp_path / "cd"
    summary = train(ti_config(fast=True, model="bundled_flow", out=str(out), train_kv=True, token_place="shape"))
    blocks = len(load_pipe("bundled_flow").transformer.transformer_blocks)
    assert summary["train_kv"] and summary["prior_images"] == 4 and summary["kv_parameters"] == blocks * 2 * (128 * 128 + 128)
    folder = out / "pipeline" / "transformer"
    new = load_file(str(next(folder.glob("*.safetensors"))))
    old = load_file(str(next((WEIGHTS_DIR / "flow" / "transformer").glob("*.safetensors"))))
    assert set(new) == set(old)
    changed = {k for k in old if not torch.allclose(new[k].float(), old[k].float(), atol=1e-6)}
    assert changed and all(".attn.add_k_proj." in k or ".attn.add_v_proj." in k for k in changed), sorted(changed)[:4]
    assert train(ti_config(fast=True, model="bundled_flow", out=str(out), train_kv=True))["resumed_from"] == 4
    unet_kv = text_kv_layers(load_pipe("bundled"))  # a UNet's: its cross-attention key/values, and only those change
    assert unet_kv and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in unet_kv)
    train(ti_config(fast=True, out=str(tmp_path / "vp"), train_kv=True))
    new, old = (load_file(str(next(d.glob("*.safetensors")))) for d in (tmp_path / "vp" / "pipeline" / "unet",
                                                                              PIPELINE_DIR / "unet"))
    changed = {k for k in old if not torch.allclose(new[k].float(), old[k].float(), atol=1e-6)}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed), sorted(changed)[:4]
    from experiments.bundled_flow.asked import main as asked

    res = asked([f"token={out / 'learned_embeds.safetensors'}", f"pipeline={out / 'pipeline'}", "n=2"])
    assert res["example_prompt"].count("<striped>") == 1 and 0 <= res["asked"]["striped"] <= 1
    assert math.isfinite(res["plain"]["fd_clip"])


@pytest.mark.slow  # 1–3 min of CPU: 200 training steps and 256 bundled generations
def test_textual_inversion_learns_the_striped_concept(tmp_path):
    """Issue 7's acceptance on the shipped model, with the experiment's defaults (training seed 0):
    the judge finds stripes far more often with the learned token than without it. Measured on
    bundled v2: 37/128 vs 1/128 (docs/embeddings.md; training seeds 0–7 give 16–34 %)."""
    import experiments.embeddings_study.__main__ as study_mod
    from experiments.harness import Experiment
    from experiments.textual_inversion.__main__ import train

    summary = train(ti_config(out=str(tmp_path / "ti"), threads=2))
    cfg = Experiment.compose(study_mod.HERE, []).cfg
    study = study_mod.Study(cfg, tmp_path / "runs")  # 8 samples per prompt, 20 steps, seed 0: the docs' setting
    plain = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in study.shapes]
    use = ["conditioning=[textual_inversion]", f"conditioning.textual_inversion.path='{summary['file']}'"]
    with_token = study.generate("learned", [p.replace("a ", "a <striped> ", 1) for p in plain], use)
    without = study.generate("plain", plain)
    hits, base = round(with_token["striped"] * with_token["n"]), round(without["striped"] * without["n"])
    assert with_token["n"] == 128 and hits >= 20 and hits >= 5 * max(base, 1), (hits, base)


def test_textual_inversion_trains_on_an_image_folder_saves_and_resumes(tmp_path, tiny_dir):
    from PIL import Image

    from experiments.textual_inversion.__main__ import train

    pics = tmp_path / "pics"
    pics.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (40, 30), colour).save(pics / f"{i}.png")
    (pics / "1.txt").write_text("a photo of {token}")
    summary = train(ti_config(fast=True, out=str(tmp_path / "out"), images=str(pics), model=str(tiny_dir),
                              placeholder_token="<toy>", initializer_token="a", num_vectors=2))
    assert summary["captions"] == ["a <toy>", "a photo of <toy>"] and summary["steps"] == 4
    learned = load_embeddings(tmp_path / "out" / "learned_embeds.safetensors")["<toy>"]
    assert learned.shape == (2, 32) and not torch.equal(learned[0], learned[1])  # both vectors moved from 'a'
    assert (tmp_path / "out" / "checkpoints" / "learned_embeds-4.safetensors").exists()
    from experiments.textual_inversion.__main__ import main  # the command line, in process: resumes

    record = main(["fast=true", f"out={tmp_path / 'out'}", f"images={pics}", f"model={tiny_dir}", "placeholder_token='<toy>'",
                   "initializer_token=a", "num_vectors=2"])
    again = record["results"]
    assert again["resumed_from"] == 4 and record["experiment"] == "textual_inversion"
    assert json.loads((tmp_path / "out" / "train.json").read_text())["results"]["steps"] == 4
    assert torch.equal(load_embeddings(tmp_path / "out" / "learned_embeds.safetensors")["<toy>"], learned)
    with pytest.raises(ConfigError, match="no images"):
        (tmp_path / "empty").mkdir()
        train(ti_config(fast=True, out=str(tmp_path / "o2"), images=str(tmp_path / "empty"), model=str(tiny_dir),
                              initializer_token="a"))


@pytest.mark.slow  # ~25 s of CPU: bundled-model runs scored by the judge
def test_embeddings_study_fast_run(tmp_path):
    import experiments.embeddings_study.__main__ as study_mod

    record = study_mod.main(["fast=true", "studies=[swap]", f"out={tmp_path / 'docs'}", f"runs={tmp_path / 'runs'}"])
    results = record["results"]
    swapped, blue = results["swap"]["prompt red, swap red→blue"], results["swap"]["prompt blue"]
    assert swapped["rate"] == blue["rate"] and swapped["image_mean_B"] == pytest.approx(blue["image_mean_B"], abs=1e-5)
    assert (tmp_path / "docs" / "swap.png").exists() and "swap red→blue" in (tmp_path / "docs" / "results.md").read_text()
    # accuracy against the prompt's own words: for "a blue …" the colour part is the judge's blue rate
    assert blue["asked"]["colour"] == pytest.approx(blue["rate"]["blue"]) and 0 <= blue["asked"]["shape"] <= 1
    assert "colour / shape as asked" in (tmp_path / "docs" / "results.md").read_text()
