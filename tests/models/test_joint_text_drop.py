"""drop_text_attention on SD3 and Flux (issue 20): in joint attention the image tokens' queries do not
attend to the text tokens' keys, for the perturbed rows only (framework/models/perturb.py).

Exact checks on the tiny pipelines' transformers: applied in every layer, the perturbed row's
velocity does not depend on the text states at all (the image stream never reads them; the pooled
vector and the timestep are held fixed) — changing the text leaves it equal to float32 rounding,
while the unperturbed row, computed as without the perturbation, changes."""
from __future__ import annotations

import pytest
import torch

from framework.core.perturb import Perturbation
from framework.models import perturb
from framework.models import tiny_families as tiny
from framework.models.flux import Flux
from framework.models.reference_loops import pack_latents
from framework.models.sd3 import StableDiffusion3


def network_call(family: str):
    """(network, call(x, text) → output, image tokens) for the tiny SD3 / Flux transformer."""
    pipe = tiny.tiny_pipeline(family)
    net = pipe.transformer
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 8, 8, generator=g)
    if family == "sd3":
        pooled = torch.randn(2, 80, generator=g)
        return net, lambda x_, e_: net(hidden_states=x_, encoder_hidden_states=e_, pooled_projections=pooled,
                                       timestep=torch.full((2,), 500.0), return_dict=False)[0], x, 16
    model = Flux(pipeline=pipe, height=64, width=64)
    txt, img = model.position_ids(12, torch.device("cpu"))
    pooled = torch.randn(2, 32, generator=g)
    return net, lambda x_, e_: net(hidden_states=pack_latents(x_), encoder_hidden_states=e_, pooled_projections=pooled,
                                   timestep=torch.full((2,), 0.5), guidance=torch.full((2,), 3.5), txt_ids=txt, img_ids=img,
                                   return_dict=False)[0], x, 16


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_image_tokens_stop_reading_the_text(family):
    net, call, x, n = network_call(family)
    layers = tuple(range(len(perturb.transformer_blocks(net))))
    plan = [(slice(1, 2), Perturbation("drop_text_attention", layers))]
    g = torch.Generator().manual_seed(6)
    text_a, text_b = torch.randn(2, 12, 96, generator=g), torch.randn(2, 12, 96, generator=g)
    with perturb.perturbed(net, plan, {}, 1.0, n):
        a = call(x, text_a)
    with perturb.perturbed(net, plan, {}, 1.0, n):
        b = call(x, text_b)
    plain_a, plain_b = call(x, text_a), call(x, text_b)
    scale = plain_a.abs().max()
    assert (a[1] - b[1]).abs().max() <= 1e-6 * scale                 # the perturbed row ignores the text
    assert (a[0] - plain_a[0]).abs().max() <= 1e-6 * scale           # the other row is computed as without it
    assert (plain_a[1] - plain_b[1]).abs().max() > 1e-3 * scale      # the text matters without the perturbation
    assert (a[1] - plain_a[1]).abs().max() > 1e-3 * scale            # and the perturbation changes the row


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_models_accept_it_in_every_block(family):
    pipe = tiny.tiny_pipeline(family)
    model = StableDiffusion3(pipeline=pipe) if family == "sd3" else Flux(pipeline=pipe, height=64, width=64)
    for i in range(len(model.perturbation_layers())):
        model.check_perturbation(Perturbation("drop_text_attention", (i,)))
