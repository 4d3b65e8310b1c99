"""Text edits on T5 (issue 20): token swap, token mix, prompt weighting and prompt mix act on the T5
encoder of SD3 and Flux as on their CLIP encoders, chosen by each edit's ``encoders`` option (all,
clip, t5); position_scale and textual_inversion stay CLIP-only; bad choices are one line, exit 2.

References are exact: a swap on T5 equals encoding the swapped prompt (the pieces align), weight 1
is the identity, weights and mixes follow their formulas on the pipeline's own T5 states."""
from __future__ import annotations

import pytest
import torch

from framework.bases.embeddings import T5Embeddings, apply_prompt_weights
from framework.core.errors import ConfigError
from framework.entry.api import run
from framework.entry.cli import main
from framework.models import tiny_families as tiny
from framework.models.flux import Flux
from framework.models.sd3 import StableDiffusion3
from plugins.conditioning.prompt_mix import PromptMix
from plugins.conditioning.prompt_weighting import PromptWeighting
from plugins.conditioning.token_mix import TokenMix
from plugins.conditioning.token_swap import TokenSwap

SMALL = ["steps=3", "num_samples=1", "batch_size=1", "save_images=false"]
CLIP_ROWS = 77   # SD3: CLIP's rows come first in encoder_hidden_states, T5's after them


@pytest.fixture(scope="module")
def models():
    sd3 = StableDiffusion3(pipeline=tiny.tiny_pipeline("sd3"))
    flux = Flux(pipeline=tiny.tiny_pipeline("flux"), height=64, width=64)
    for m in (sd3, flux):
        m.setup(torch.device("cpu"), torch.float32)
    return {"sd3": sd3, "flux": flux}


def t5_part(family: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    states = tensors["encoder_hidden_states"]
    return states[:, CLIP_ROWS:] if family == "sd3" else states


def t5_of(family: str) -> tuple[object, object]:
    pipe = tiny.tiny_pipeline(family)
    return (pipe.text_encoder_3, pipe.tokenizer_3) if family == "sd3" else (pipe.text_encoder_2, pipe.tokenizer_2)


def pipeline_t5(family: str, prompts: list[str]) -> torch.Tensor:
    """The pipeline's T5 states: ids padded to max_sequence_length, last hidden state."""
    encoder, tokenizer = t5_of(family)
    length = 256 if family == "sd3" else 512
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    return encoder(ids)[0]


def biggest(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_a_token_swap_on_clip_and_t5_equals_writing_the_other_word(family, models):
    """x → y on every encoder (the default, encoders=all): every conditioning tensor is that of the
    prompt written with y (T5's pieces ▁x and ▁y sit at the same position)."""
    m = models[family]
    swapped = m.encode_edited(["a x circle"], [TokenSwap(source="x", target="y")])
    assert biggest(swapped, m.encode_prompts(["a y circle"])) <= 1e-6


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_encoders_choose_clip_or_t5(family, models):
    m = models[family]
    plain, written = m.encode_prompts(["a x circle"]), m.encode_prompts(["a y circle"])
    clip_only = m.encode_edited(["a x circle"], [TokenSwap(source="x", target="y", encoders="clip")])
    t5_only = m.encode_edited(["a x circle"], [TokenSwap(source="x", target="y", encoders="t5")])
    # T5 reads the text where the edit is CLIP-only, and the edited pieces where it is T5-only
    assert torch.equal(t5_part(family, clip_only), t5_part(family, plain))
    assert (t5_part(family, t5_only) - t5_part(family, written)).abs().max() <= 1e-6
    assert torch.equal(clip_only["pooled_projections"], written["pooled_projections"])
    assert torch.equal(t5_only["pooled_projections"], plain["pooled_projections"])
    if family == "sd3":   # CLIP's states too
        assert torch.equal(clip_only["encoder_hidden_states"][:, :CLIP_ROWS], written["encoder_hidden_states"][:, :CLIP_ROWS])
        assert torch.equal(t5_only["encoder_hidden_states"][:, :CLIP_ROWS], plain["encoder_hidden_states"][:, :CLIP_ROWS])


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_prompt_weights_on_t5(family, models):
    """Weight 1 is the identity; (x:1.5) multiplies T5's row of ▁x by 1.5, then the prompt's mean
    is restored (A1111's normalisation), on the pipeline's own T5 states."""
    m = models[family]
    assert biggest(m.encode_edited(["a (x:1) circle"], [PromptWeighting()]), m.encode_prompts(["a x circle"])) <= 1e-6
    states = pipeline_t5(family, ["a x circle"])
    encoder, tokenizer = t5_of(family)
    ids = tokenizer(["a x circle"], padding="max_length", max_length=states.shape[1], return_tensors="pt").input_ids
    weights = torch.where(ids == tokenizer.convert_tokens_to_ids("▁x"), 1.5, 1.0)
    assert int((weights == 1.5).sum()) == 1
    expected = apply_prompt_weights(states, weights)
    got = t5_part(family, m.encode_edited(["a (x:1.5) circle"], [PromptWeighting()]))
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
    clip_only = m.encode_edited(["a (x:1.5) circle"], [PromptWeighting(encoders="clip")])
    assert torch.equal(t5_part(family, clip_only), states)   # T5 reads "a x circle", unweighted


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_token_mix_and_prompt_mix_on_t5(family, models):
    """A mix of input embeddings at ▁x's position (T5's encoder on those inputs_embeds); a prompt
    mix of T5's states of the two prompts, token by token."""
    m = models[family]
    encoder, tokenizer = t5_of(family)
    length = 256 if family == "sd3" else 512
    ids = tokenizer(["a x circle"], padding="max_length", max_length=length, return_tensors="pt").input_ids
    table = encoder.get_input_embeddings().weight
    e = table[ids]
    at = ids == tokenizer.convert_tokens_to_ids("▁x")
    mixed = 0.25 * table[tokenizer.convert_tokens_to_ids("▁y")] + 0.5 * table[tokenizer.convert_tokens_to_ids("▁z")]
    expected = encoder(inputs_embeds=torch.where(at[..., None], mixed, e))[0]
    got = t5_part(family, m.encode_edited(["a x circle"], [TokenMix(token="x", tokens=["y", "z"], weights=[0.25, 0.5])]))
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
    a, b = pipeline_t5(family, ["a x circle"]), pipeline_t5(family, ["a square"])
    got = t5_part(family, m.encode_edited(["a x circle"], [PromptMix(prompt="a square", weight=0.3)]))
    assert (got - torch.lerp(a, b, 0.3)).abs().max() <= 1e-6 * a.abs().max()


def test_a_t5_swap_in_a_flux_run_equals_the_written_prompt():
    """model=tiny_flux: swapping x → y on CLIP-L and T5 samples exactly the prompt written with y."""
    swapped = run(["model=tiny_flux", "conditioning=[token_swap]", "conditioning.token_swap.source=x",
                   "conditioning.token_swap.target=y", "prompts=['a x circle']", *SMALL])
    written = run(["model=tiny_flux", "prompts=['a y circle']", *SMALL])
    plain = run(["model=tiny_flux", "prompts=['a x circle']", *SMALL])
    assert torch.equal(swapped.latents, written.latents) and (swapped.latents - plain.latents).abs().max() > 1e-4


def test_t5_tokens_and_refusals():
    pipe = tiny.tiny_pipeline("sd3")
    t5 = T5Embeddings(pipe.text_encoder_3, pipe.tokenizer_3, 256)
    assert t5.token_id("x") == pipe.tokenizer_3.convert_tokens_to_ids("▁x")
    with pytest.raises(ConfigError, match="^T5: 'circle' is .* tokens .*encoders=clip"):
        t5.token_id("circle")            # the tiny T5 spells words in letters
    with pytest.raises(ConfigError, match="T5 has no position embeddings"):
        _ = t5.position_table
    with pytest.raises(ConfigError, match="textual inversion applies to the CLIP encoders"):
        t5.inputs(["a <spot>"], {"<spot>": torch.zeros(1, 96)})


@pytest.mark.parametrize("case", ["t5_on_sdxl", "t5_without_t5", "position_scale_on_t5", "textual_inversion_on_t5",
                                  "clip_states_on_flux"])
def test_bad_encoder_choices_are_one_line_exit_2(case, capsys, tmp_path):
    argv, expected = {
        "t5_on_sdxl": (["model=tiny_sdxl", "conditioning=[token_swap]", "conditioning.token_swap.encoders=t5"],
                       "conditioning token_swap.encoders=t5, but model TinySDXL has no T5 encoder (encoders: clip): set "
                       "conditioning.token_swap.encoders=clip (or all)"),
        "t5_without_t5": (["model=tiny_sd3", "model.use_t5=false", "conditioning=[prompt_weighting]",
                           "conditioning.prompt_weighting.encoders=t5"], "has no T5 encoder"),
        "position_scale_on_t5": (["model=tiny_sd3", "conditioning=[position_scale]", "conditioning.position_scale.encoders=all"],
                                 "conditioning position_scale cannot edit T5 (T5 has no position embeddings"),
        "textual_inversion_on_t5": (["model=tiny_flux", "conditioning=[textual_inversion]",
                                     "conditioning.textual_inversion.encoders=t5", "conditioning.textual_inversion.path=x.pt"],
                                    "cannot edit T5 (textual inversion vectors are CLIP token embeddings)"),
        "clip_states_on_flux": (["model=tiny_flux", "conditioning=[prompt_mix]", "conditioning.prompt_mix.prompt=a square",
                                 "conditioning.prompt_mix.encoders=clip"],
                                "edits CLIP's hidden states, which model=flux does not use (it reads CLIP's pooled vector "
                                "and T5's states): set encoders=all or t5"),
    }[case]
    code = main([*argv, "steps=2", "num_samples=1", "batch_size=1", f"hydra.run.dir={tmp_path}/run"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["token_swap", "token_mix", "prompt_weighting", "prompt_mix"])
def test_every_t5_edit_changes_a_flux_run_through_t5_alone(name):
    """encoders=t5 on Flux: the CLIP pooled vector is the plain prompt's, so any change is T5's."""
    c = f"conditioning.{name}"
    options = {"token_swap": [f"{c}.source=x", f"{c}.target=y"], "token_mix": [f"{c}.token=x", f"{c}.tokens=[x,y]"],
               "prompt_mix": [f"{c}.prompt=a square"]}.get(name, [])
    base = ["model=tiny_flux", "prompts=['a x (circle:1.5)']", *SMALL]
    plain = run(base)
    edited = run([*base, f"conditioning=[{name}]", f"{c}.encoders=t5", *options])
    assert torch.isfinite(edited.latents).all() and (edited.latents - plain.latents).abs().max() > 1e-6
