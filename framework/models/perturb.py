"""Perturbations inside a diffusers network, applied to rows of its batch (framework.core.perturb).

The layers are the network's transformer blocks in the order the network runs them: a UNet's
``BasicTransformerBlock`` modules (down blocks, mid block, up blocks), SD3's ``transformer_blocks``,
Flux's ``transformer_blocks`` then ``single_transformer_blocks``. Inside a chosen block:

- ``identity_attention``: every self-attention module (diffusers' ``Attention`` or an
  ``AttentionModuleMixin`` that is not cross-attention, as diffusers' own layer-skip hook picks them)
  runs with ``scaled_dot_product_attention`` answering the value itself for the chosen rows
  (diffusers' ``skip_attention_scores``: the score matrix is the identity);
- ``blur_attention``: the query projection (``to_q``) of those modules has its output blurred on the
  image grid for the chosen rows: a Gaussian of ``blur_sigma`` tokens with reflected borders, or
  (σ = ∞) every token replaced by the grid's mean (SEG's infinite blur). The grid is the latent's
  aspect at the layer's resolution; in a transformer whose query holds text tokens before the image
  ones (Flux's single blocks) the trailing image tokens (diffusers takes the leading ⌊√L⌋² tokens,
  mostly text there); when the count does not factor, the leading ⌊√L⌋² tokens as a square;
- ``skip_blocks``: the block returns its inputs (hidden states, and the text stream's for joint
  blocks) for the chosen rows — diffusers' ``TransformerBlockSkipHook`` with dropout 1;
- ``drop_text_attention``: the cross-attention modules of the block answer zeros for the chosen rows
  (a UNet); in a transformer with joint attention (SD3's and Flux's blocks: image and text tokens in
  one attention) the image tokens' queries do not attend to the text tokens' keys for the chosen rows
  (``scaled_dot_product_attention`` with a mask over the image-query × text-key block; the text
  queries attend as before). Applied in every layer, the image stream never reads the text.

Attention maps (SAG's mask) are softmax(QKᵀ/√d) of the block's self-attention averaged over heads;
in joint attention (SD3, Flux) the image-to-image block, each row renormalised to sum to 1.

Every change is an instance-level ``forward`` wrapper, installed for one network call and removed
in a ``finally`` (the modules' own ``forward`` comes back even when the call raises). The rows
outside a perturbation's slice are computed exactly as without it.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.nn.functional as F

from framework.core.errors import ConfigError
from framework.core.perturb import PerturbKind, Perturbation
from framework.maths.blur import blur_tokens

_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def transformer_blocks(network: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The network's transformer blocks, named, in the order it runs them."""
    stacks = [s for s in ("transformer_blocks", "single_transformer_blocks") if isinstance(getattr(network, s, None), torch.nn.ModuleList)]
    if stacks:
        return [(f"{s}.{i}", b) for s in stacks for i, b in enumerate(getattr(network, s))]
    from diffusers.models.attention import BasicTransformerBlock

    found = [(n, m) for n, m in network.named_modules() if isinstance(m, BasicTransformerBlock)]
    return sorted(found, key=lambda nm: _ORDER.get(nm[0].split(".")[0], 3))  # stable: module order within a part


def _attentions(block: torch.nn.Module, cross: bool) -> list[torch.nn.Module]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [m for m in block.modules() if isinstance(m, (Attention, AttentionModuleMixin))
            and bool(getattr(m, "is_cross_attention", False)) == cross]


def check(network: torch.nn.Module, perturbation: Perturbation) -> None:
    """Refuse a perturbation whose kind the chosen blocks cannot take (one line)."""
    blocks = transformer_blocks(network)
    for i in perturbation.layers:
        name, block = blocks[i]
        if (perturbation.kind == PerturbKind.drop_text_attention and not _attentions(block, cross=True)
                and not (_joint(network) and _attentions(block, cross=False))):
            raise ConfigError(f"layer {i} ({name}) has no cross-attention to drop: drop_text_attention needs a UNet's "
                              "cross-attention blocks or a joint-attention transformer's (SD3, Flux)")
        if perturbation.kind in (PerturbKind.identity_attention, PerturbKind.blur_attention) and not _attentions(block, cross=False):
            raise ConfigError(f"layer {i} ({name}) has no self-attention: choose a transformer block with one")


def _joint(network: torch.nn.Module) -> bool:
    """Whether the network's blocks attend to image and text tokens jointly (SD3, Flux)."""
    return isinstance(getattr(network, "transformer_blocks", None), torch.nn.ModuleList)


def _rows(t: torch.Tensor, rows: slice, new: torch.Tensor) -> torch.Tensor:
    """``t`` with its rows ``rows`` replaced by ``new`` (a new tensor; ``t`` untouched)."""
    return torch.cat([t[:rows.start], new.to(t.dtype), t[rows.stop:]])


@contextlib.contextmanager
def _wrapped(module: torch.nn.Module, wrapper: Callable[..., Any]) -> Iterator[None]:
    """``module.forward`` replaced by ``wrapper(original, *args, **kwargs)`` inside the context."""
    had = "forward" in module.__dict__
    saved = module.__dict__.get("forward")
    original = module.forward
    module.forward = lambda *a, **k: wrapper(original, *a, **k)  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had:
            module.forward = saved  # type: ignore[method-assign]
        else:
            del module.forward


class _SDPA(torch.overrides.TorchFunctionMode):
    """Inside one attention module: ``scaled_dot_product_attention`` of self-attention (query and
    value of the same length) answers the value for ``rows`` (identity scores), and/or records the
    attention probabilities averaged over heads (``store``)."""

    def __init__(self, rows: slice | None, store: list[torch.Tensor] | None):
        super().__init__()
        self.rows, self.store = rows, store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q = kwargs.get("query", args[0] if args else None)
        k = kwargs.get("key", args[1] if len(args) > 1 else None)
        v = kwargs.get("value", args[2] if len(args) > 2 else None)
        out = func(*args, **kwargs)
        if q is None or v is None or q.shape[-2] != v.shape[-2]:
            return out
        if self.store is not None:
            scale = kwargs.get("scale") or 1 / math.sqrt(q.shape[-1])
            self.store.append(torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1).mean(dim=1))
        return out if self.rows is None else _rows(out, self.rows, v[self.rows])


class _NoText(torch.overrides.TorchFunctionMode):
    """Inside one joint-attention module: ``scaled_dot_product_attention`` over image + text tokens
    (more keys than ``image_tokens``) is recomputed for ``rows`` with the image queries' text keys
    masked out (the image tokens first in SD3's joint sequence, last in Flux's)."""

    def __init__(self, rows: slice, image_tokens: int, text_first: bool):
        super().__init__()
        self.rows, self.n, self.text_first = rows, image_tokens, text_first

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask")
        given = {**dict(zip(names, args)), **kwargs}
        q, k = given["query"], given["key"]
        L, n = k.shape[-2], self.n
        if L <= n or q.shape[-2] != L:
            return out
        image = torch.zeros(L, dtype=torch.bool, device=q.device)
        if self.text_first:
            image[L - n:] = True
        else:
            image[:n] = True
        allowed = ~(image[:, None] & ~image[None, :])          # [query, key]: no image query → text key
        mask = given.get("attn_mask")
        if mask is not None and mask.dim() == 4 and mask.shape[0] == q.shape[0]:
            mask = mask[self.rows]
        if mask is None:
            combined = allowed
        elif mask.dtype == torch.bool:
            combined = mask & allowed
        else:
            combined = mask + torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill(~allowed, float("-inf"))
        rest = {key: v for key, v in given.items() if key not in names}
        new = func(q[self.rows], k[self.rows], given["value"][self.rows], attn_mask=combined, **rest)
        return _rows(out, self.rows, new)


def _skip(block: torch.nn.Module, rows: slice) -> Callable[..., Any]:
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        meta = TransformerBlockRegistry.get(type(block))
    except (ValueError, KeyError):
        meta = None

    def forward(original, *args, **kwargs):
        out = original(*args, **kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(out, torch.Tensor):
            return _rows(out, rows, hidden[rows])
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        out = list(out)
        h_at = 0 if meta is None else meta.return_hidden_states_index
        out[h_at] = _rows(out[h_at], rows, hidden[rows])
        e_at = None if meta is None else meta.return_encoder_hidden_states_index
        if e_at is not None and out[e_at] is not None and text is not None:
            out[e_at] = _rows(out[e_at], rows, text[rows])
        return tuple(out)
    return forward


def _identity(rows: slice) -> Callable[..., Any]:
    def forward(original, *args, **kwargs):
        with _SDPA(rows, None):
            return original(*args, **kwargs)
    return forward


def _blur(rows: slice, sigma: float, aspect: float, image_tokens: int | None) -> Callable[..., Any]:
    def forward(original, *args, **kwargs):
        out = original(*args, **kwargs)
        return _rows(out, rows, blur_tokens(out[rows], sigma, aspect, image_tokens))
    return forward


def _zeros(rows: slice) -> Callable[..., Any]:
    def forward(original, *args, **kwargs):
        out = original(*args, **kwargs)
        return _rows(out, rows, torch.zeros_like(out[rows]))
    return forward


def _no_text(rows: slice, image_tokens: int, text_first: bool) -> Callable[..., Any]:
    def forward(original, *args, **kwargs):
        with _NoText(rows, image_tokens, text_first):
            return original(*args, **kwargs)
    return forward


def _capture(store: list[torch.Tensor]) -> Callable[..., Any]:
    def forward(original, *args, **kwargs):
        with _SDPA(None, store):
            return original(*args, **kwargs)
    return forward


@contextlib.contextmanager
def perturbed(network: torch.nn.Module, plan: list[tuple[slice, Perturbation]], maps: dict[str, int],
              aspect: float, image_tokens: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The context of one perturbed network call: ``plan``'s perturbations on their rows, the
    self-attention maps of ``maps`` (name → layer) captured into the yielded dict. ``aspect`` is the
    latent's h/w; ``image_tokens`` a transformer's image token count (None: a UNet, whose
    attention sees image tokens only)."""
    blocks = [b for _, b in transformer_blocks(network)]
    text_first = type(network).__name__.startswith("Flux")  # Flux's joint attention: [text; image]
    captured: dict[str, torch.Tensor] = {}
    stores: dict[str, list[torch.Tensor]] = {}
    with contextlib.ExitStack() as stack:
        for rows, p in plan:
            for i in p.layers:
                block = blocks[i]
                if p.kind == PerturbKind.skip_blocks:
                    stack.enter_context(_wrapped(block, _skip(block, rows)))
                elif p.kind == PerturbKind.identity_attention:
                    for attn in _attentions(block, cross=False):
                        stack.enter_context(_wrapped(attn, _identity(rows)))
                elif p.kind == PerturbKind.blur_attention:
                    for attn in _attentions(block, cross=False):
                        stack.enter_context(_wrapped(attn.to_q, _blur(rows, p.blur_sigma, aspect, image_tokens)))
                elif _attentions(block, cross=True) or image_tokens is None:
                    for attn in _attentions(block, cross=True):
                        stack.enter_context(_wrapped(attn, _zeros(rows)))
                else:   # joint attention (SD3, Flux): image queries do not read the text keys
                    for attn in _attentions(block, cross=False):
                        stack.enter_context(_wrapped(attn, _no_text(rows, image_tokens, text_first)))
        for name, layer in maps.items():
            attn = _attentions(blocks[layer], cross=False)[0]
            stores[name] = []
            stack.enter_context(_wrapped(attn, _capture(stores[name])))
        yield captured
        for name, store in stores.items():
            if store:  # joint attention holds the text's tokens too (after the image's in SD3, before in Flux):
                m = store[0]  # its image-to-image block, each row renormalised to sum to 1 like a self-attention map
                if image_tokens is not None and image_tokens < m.shape[-1]:
                    n = image_tokens
                    m = m[:, -n:, -n:] if text_first else m[:, :n, :n]
                    m = m / m.sum(dim=-1, keepdim=True)
                captured[name] = m
