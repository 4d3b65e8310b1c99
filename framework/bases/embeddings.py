"""Text embeddings of CLIP-conditioned models: inspect, edit, mix and learn them.

Stable Diffusion's text encoder (transformers' ``CLIPTextModel``) turns a prompt into the UNet's
``encoder_hidden_states`` in four stages, and every stage can be edited here:

1. **tokens** — the tokenizer gives ids, padded to 77 (``<|startoftext|> … <|endoftext|> pad…``);
2. **input embeddings** — row ``id`` of the token table plus row ``position`` of the position
   table (:class:`TokenInputs` holds both, per sample);
3. **the transformer** — :meth:`TextEmbeddings.encode_inputs` runs the encoder's own forward pass on
   custom token and position embeddings (a forward hook substitutes them for the embedding
   layer's output, so attention masks and the final layer norm are exactly the model's);
4. **output embeddings** — ``[batch, 77, width]``, what the UNet attends to: mixed
   (:func:`mix_outputs`) or scaled per token by prompt weights (:func:`apply_prompt_weights`).

With no edit, :meth:`TextEmbeddings.encode` equals diffusers' ``pipe.encode_prompt`` (tested to
≤ 1e-6). Edits are :class:`TextEdit` objects applied in order: the conditioning plugins
(``plugins/conditioning``) are such objects, so they work inside a run and in your own code::

    >>> from framework.bases.embeddings import TextEmbeddings
    >>> from plugins.conditioning.token_swap import TokenSwap
    >>> emb = TextEmbeddings.of(pipe)              # a StableDiffusionPipeline or a samplerlab model
    >>> print(emb.show("a red circle"))            # positions, ids and tokens
    >>> hidden = emb.encode(["a red circle"], [TokenSwap(source="red", target="blue")])

Textual inversion files (diffusers ``learned_embeds.safetensors``/``.bin``, A1111 ``.pt`` and
``.safetensors``) are read by :func:`load_embeddings` and written by :func:`save_embeddings`. A
learned token is never added to the tokenizer or the embedding table (the loaded pipeline is shared
between runs): its name is found in the prompt text and its vectors are placed in the input
embeddings at those positions, which gives the same conditioning as diffusers'
``load_textual_inversion`` (tested).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from framework.bases.options import ApplyTo, TextEncoders
from framework.core.errors import ConfigError
from framework.core.markers import hookimpl
from framework.core.run import Run
from framework.core.state import Conditioning

#: A1111's multiplier of one pair of round brackets (square brackets divide by it).
BRACKET_WEIGHT = 1.1


# ---------------------------------------------------------------------------------------------
# Inputs of the text transformer
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenInputs:
    """The text transformer's inputs for a batch of prompts (L = the tokenizer's max length).

    ``ids`` [B, L]: token ids (a learned token's positions hold the start-of-text id, which only
    matters for pooled outputs); ``token_embeds``/``position_embeds`` [B, L, D]: the two summands
    of the input embedding; ``weights`` [B, L]: prompt weights (1 where none); ``new_tokens``
    [B, L] bool: positions holding learned (textual inversion) vectors. Edits return new objects
    (``dataclasses.replace``); tensors are never modified in place.
    """

    ids: torch.Tensor
    token_embeds: torch.Tensor
    position_embeds: torch.Tensor
    weights: torch.Tensor
    new_tokens: torch.Tensor

    def positions_of(self, token_id: int) -> torch.Tensor:
        """Bool mask [B, L] of the vocabulary token ``token_id`` (learned-token slots excluded)."""
        return (self.ids == token_id) & ~self.new_tokens


class TextEdit:
    """An edit of the text encoding, applied by :meth:`TextEmbeddings.encode` (in list order).

    Override what you need: :meth:`new_tokens` (textual inversion), :meth:`edit_inputs` (token
    and position embeddings), :meth:`edit_outputs` (the encoder's output); ``parses_weights``
    makes the tokenizer read A1111 weight syntax. ``apply_to`` chooses the prompts (``cond``),
    the negative prompts (``uncond``, when CFG is on) or ``both``.
    """

    parses_weights: bool = False
    apply_to: ApplyTo = ApplyTo.both
    #: The text encoders the edit applies to on a model with CLIP and T5 encoders (SD3, Flux):
    #: ``all``, ``clip`` or ``t5`` (:func:`for_encoder`); a one-CLIP model has only ``clip``.
    encoders: TextEncoders = TextEncoders.all
    #: Why the edit cannot act on T5 (None: it can); such an edit applies to CLIP only.
    not_on_t5: str | None = None

    def new_tokens(self, emb: TextEmbeddings) -> dict[str, torch.Tensor]:
        """Learned tokens to recognise in the prompt text: name → vectors [n, D]."""
        return {}

    def edit_inputs(self, inputs: TokenInputs, emb: TextEmbeddings) -> TokenInputs:
        return inputs

    def edit_outputs(
        self, hidden: torch.Tensor, inputs: TokenInputs, emb: TextEmbeddings, edits: Sequence[TextEdit]
    ) -> torch.Tensor:
        """Edit the encoder's output [B, L, D]; ``edits`` is the whole list being applied."""
        return hidden


class LearnedTokens(TextEdit):
    """New tokens given as tensors {name: vectors [n, D]} (textual inversion in memory; the
    tensors may require grad: training optimises them through :meth:`TextEmbeddings.encode`)."""

    encoders = TextEncoders.clip
    not_on_t5 = "textual inversion vectors are CLIP token embeddings"

    def __init__(self, tokens: Mapping[str, torch.Tensor], apply_to: ApplyTo = ApplyTo.both):
        self.tokens, self.apply_to = dict(tokens), apply_to

    def new_tokens(self, emb: TextEmbeddings) -> dict[str, torch.Tensor]:
        return self.tokens


class TextEmbeddings:
    """A CLIP text encoder and its tokenizer: tokens, embedding tables, encoding with edits."""

    #: The encoder kind an edit's ``encoders`` option names (:func:`for_encoder`).
    kind = "clip"

    def __init__(self, text_encoder: Any, tokenizer: Any):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        # transformers ≥ 5 puts the embeddings on CLIPTextModel itself, older ones on .text_model
        self._body = getattr(text_encoder, "text_model", text_encoder)
        if not hasattr(self._body, "embeddings") or not hasattr(self._body.embeddings, "token_embedding"):
            raise ConfigError(f"{type(text_encoder).__name__} is not a CLIP text encoder: token edits need CLIPTextModel")
        self.max_length = int(tokenizer.model_max_length)

    @classmethod
    def of(cls, obj: Any) -> TextEmbeddings:
        """From anything with ``text_encoder`` and ``tokenizer`` (a diffusers pipeline, a samplerlab model)."""
        te, tok = getattr(obj, "text_encoder", None), getattr(obj, "tokenizer", None)
        if te is None or tok is None:
            raise ConfigError(
                f"{type(obj).__name__} has no CLIP text encoder and tokenizer: text-embedding edits need a "
                "Stable Diffusion-style model (model=bundled, sd15, sd21 or a diffusers folder)"
            )
        return cls(te, tok)

    # -- tables --------------------------------------------------------------------------------
    @property
    def token_table(self) -> torch.Tensor:
        """The token embedding table [vocab, D] (the model's parameter: do not edit in place)."""
        return self._body.embeddings.token_embedding.weight

    @property
    def position_table(self) -> torch.Tensor:
        """The position embedding table [max positions, D]."""
        return self._body.embeddings.position_embedding.weight

    @property
    def width(self) -> int:
        return int(self.token_table.shape[1])

    # -- tokens --------------------------------------------------------------------------------
    def tokens(self, prompt: str) -> list[tuple[int, str]]:
        """(id, token) of a prompt up to and including end-of-text, as the model sees it."""
        ids = self.tokenizer(prompt, truncation=True, max_length=self.max_length).input_ids
        return list(zip(ids, self.tokenizer.convert_ids_to_tokens(ids)))

    def show(self, prompt: str) -> str:
        """A table of a prompt's positions, ids and tokens."""
        rows = [f"{'pos':>3} {'id':>6}  token"]
        rows += [f"{i:>3} {tid:>6}  {tok}" for i, (tid, tok) in enumerate(self.tokens(prompt))]
        return "\n".join(rows)

    def token_id(self, word: str) -> int:
        """The id of ``word`` when it is one token (a word such as ``red`` or a vocabulary entry
        such as ``red</w>``); a clear error otherwise."""
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) == 1:
            return int(ids[0])
        vocab = self.tokenizer.get_vocab()
        if word in vocab:
            return int(vocab[word])
        if len(ids) != 1:
            pieces = " ".join(self.tokenizer.convert_ids_to_tokens(ids)) or "nothing"
            raise ConfigError(
                f"'{word}' is {len(ids)} tokens ({pieces}) for this tokenizer: token edits need a single-token word"
            )
        return int(ids[0])

    def vector(self, token: str | int | torch.Tensor) -> torch.Tensor:
        """A token's input embedding [D] (by word or id); a tensor [D] passes through."""
        if isinstance(token, torch.Tensor):
            if token.shape != (self.width,):
                raise ConfigError(f"an embedding vector must have shape ({self.width},), got {tuple(token.shape)}")
            return token.to(self.token_table)
        tid = token if isinstance(token, int) else self.token_id(token)
        return self.token_table[tid]

    def nearest(self, vector: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` vocabulary tokens whose embeddings are closest to ``vector`` (cosine similarity)."""
        sims = torch.nn.functional.cosine_similarity(self.token_table.detach(), vector.detach().to(self.token_table)[None], dim=1)
        top = sims.topk(min(k, sims.numel()))
        return [(self.tokenizer.convert_ids_to_tokens(int(i)), float(s)) for s, i in zip(top.values, top.indices)]

    # -- inputs --------------------------------------------------------------------------------
    def _ids_and_weights(
        self, prompt: str, new_tokens: Mapping[str, torch.Tensor], parse_weights: bool
    ) -> tuple[list[int], list[float], list[torch.Tensor | None]]:
        """Ids (with start/end, unpadded), per-token weights and the learned vector of each slot."""
        chunks = parse_prompt_weights(prompt) if parse_weights else [(prompt, 1.0)]
        pattern = re.compile("|".join(re.escape(t) for t in sorted(new_tokens, key=len, reverse=True))) if new_tokens else None
        ids: list[int] = []
        weights: list[float] = []
        slots: list[torch.Tensor | None] = []
        for text, w in chunks:
            pieces = pattern.split(text) if pattern else [text]
            names = pattern.findall(text) if pattern else []
            for i, piece in enumerate(pieces):
                piece_ids = self.tokenizer(piece, add_special_tokens=False).input_ids if piece.strip() else []
                ids += piece_ids
                weights += [w] * len(piece_ids)
                slots += [None] * len(piece_ids)
                if i < len(names):
                    vecs = new_tokens[names[i]]
                    ids += [self.tokenizer.bos_token_id] * len(vecs)
                    weights += [w] * len(vecs)
                    slots += list(vecs)
        keep = self.max_length - 2  # the tokenizer's truncation: start + 75 tokens + end
        ids, weights, slots = ids[:keep], weights[:keep], slots[:keep]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        return [bos, *ids, eos], [1.0, *weights, 1.0], [None, *slots, None]

    def inputs(
        self,
        prompts: Sequence[str],
        new_tokens: Mapping[str, torch.Tensor] | None = None,
        parse_weights: bool = False,
    ) -> TokenInputs:
        """Token and position embeddings of ``prompts``; ``new_tokens`` are learned tokens (name →
        vectors [n, D]) found in the text; ``parse_weights`` reads A1111 weights and strips their
        syntax. Without either, the ids are exactly the tokenizer's (padded to max length)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, e.g. ['a red circle']")
        new_tokens = {k: v.reshape(-1, self.width) for k, v in (new_tokens or {}).items()}
        device, table = self.token_table.device, self.token_table
        n, L = len(prompts), self.max_length
        slots_mask = torch.zeros(n, L, dtype=torch.bool, device=device)
        weights = torch.ones(n, L, dtype=table.dtype, device=device)
        if not new_tokens and not parse_weights:
            tok = self.tokenizer(list(prompts), padding="max_length", max_length=L, truncation=True, return_tensors="pt")
            ids = tok.input_ids.to(device)
            token_embeds = self._body.embeddings.token_embedding(ids)
        else:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            ids = torch.full((n, L), int(pad), dtype=torch.long, device=device)
            rows = []
            for b, prompt in enumerate(prompts):
                row_ids, row_w, row_slots = self._ids_and_weights(prompt, new_tokens, parse_weights)
                ids[b, : len(row_ids)] = torch.tensor(row_ids, device=device)
                weights[b, : len(row_w)] = torch.tensor(row_w, dtype=table.dtype, device=device)
                rows.append(row_slots)
            token_embeds = self._body.embeddings.token_embedding(ids)
            learned = [(b, i, v) for b, row in enumerate(rows) for i, v in enumerate(row) if v is not None]
            if learned:
                b_idx = torch.tensor([b for b, _, _ in learned], device=device)
                i_idx = torch.tensor([i for _, i, _ in learned], device=device)
                vecs = torch.stack([v.to(device=device, dtype=table.dtype) for _, _, v in learned])
                token_embeds = token_embeds.index_put((b_idx, i_idx), vecs)
                slots_mask[b_idx, i_idx] = True
        positions = self._body.embeddings.position_embedding.weight[:L]
        return TokenInputs(ids, token_embeds, positions.expand(n, L, -1), weights, slots_mask)

    # -- encoding ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _substitute_embeddings(self, embeds: torch.Tensor) -> Iterator[None]:
        def hook(module: Any, args: Any, kwargs: Any, output: torch.Tensor) -> torch.Tensor:
            return embeds.to(output.dtype)

        handle = self._body.embeddings.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def encode_inputs(self, inputs: TokenInputs) -> torch.Tensor:
        """The text transformer's last hidden state [B, L, D] from (edited) input embeddings.

        Runs the encoder's own forward pass with its embedding layer's output replaced by
        ``token_embeds + position_embeds``; differentiable (textual inversion trains through it).
        """
        with self._substitute_embeddings(inputs.token_embeds + inputs.position_embeds):
            out = self.text_encoder(inputs.ids)
        return out[0]

    def encode(self, prompts: Sequence[str], edits: Iterable[TextEdit] = ()) -> torch.Tensor:
        """``encoder_hidden_states`` [B, L, D] of ``prompts`` with ``edits`` applied in order.

        Token edits (new tokens, input embeddings) act before the transformer, in list order;
        output edits after it, in list order. With no edit this is the model's own encoding
        (``pipe.encode_prompt``'s first output).
        """
        edits = list(edits)
        inputs = self.edited_inputs(prompts, edits)
        hidden = self.encode_inputs(inputs)
        for e in edits:
            hidden = e.edit_outputs(hidden, inputs, self, edits)
        return hidden

    def edited_inputs(self, prompts: Sequence[str], edits: Sequence[TextEdit]) -> TokenInputs:
        """The transformer's inputs of ``prompts`` with the token edits of ``edits`` applied (learned
        tokens, weight syntax, then each ``edit_inputs`` in list order): the first half of :meth:`encode`."""
        new: dict[str, torch.Tensor] = {}
        for e in edits:
            new.update(e.new_tokens(self))
        inputs = self.inputs(prompts, new, parse_weights=any(e.parses_weights for e in edits))
        for e in edits:
            inputs = e.edit_inputs(inputs, self)
        return inputs


class _ReadsWeights(TextEdit):
    """Stands in for an edit that parses A1111 weights but does not apply to an encoder: that encoder
    still reads the prompt text with the weight syntax removed."""

    parses_weights = True


def for_encoder(edits: Sequence[TextEdit], kind: str) -> list[TextEdit]:
    """The edits of ``edits`` that apply to an encoder of ``kind`` (``clip`` or ``t5``) by their
    ``encoders`` option, in order; one that does not apply but parses weights leaves a stand-in, so
    every encoder reads the same text."""
    out: list[TextEdit] = []
    for e in edits:
        if e.encoders in (TextEncoders.all, kind):
            out.append(e)
        elif e.parses_weights:
            out.append(_ReadsWeights())
    return out


class T5Embeddings(TextEmbeddings):
    """A T5 encoder (SD3's third, Flux's second) and its tokenizer, with the same edits as CLIP's.

    T5 has a token table (the encoder's input embeddings, no scaling) and no position table (its
    attention carries relative position biases): :class:`TokenInputs` hold zeros as position
    embeddings and position edits are refused. Prompts are padded to ``max_length`` (the model's
    ``max_sequence_length``) and end with ``</s>``, as the pipelines tokenise them; prompt weights
    come from the characters each token spans (the text is tokenised whole, so T5 reads exactly the
    text the pipeline would); learned tokens (textual inversion) are CLIP's only. A word is a token
    when SentencePiece makes it one piece (``red`` → ``▁red``, the word-initial piece).
    """

    kind = "t5"

    def __init__(self, text_encoder: Any, tokenizer: Any, max_length: int):
        if not hasattr(text_encoder, "get_input_embeddings"):
            raise ConfigError(f"{type(text_encoder).__name__} is not a T5 encoder: T5 token edits need T5EncoderModel")
        self.text_encoder, self.tokenizer, self.max_length = text_encoder, tokenizer, int(max_length)

    @property
    def token_table(self) -> torch.Tensor:
        return self.text_encoder.get_input_embeddings().weight

    @property
    def position_table(self) -> torch.Tensor:
        raise ConfigError("T5 has no position embeddings (its attention has relative position biases): position edits "
                          "apply to the CLIP encoders (encoders=clip)")

    def token_id(self, word: str) -> int:
        try:
            return super().token_id(word)
        except ConfigError as e:
            raise ConfigError(f"T5: {e} (or set the edit's encoders=clip to edit the CLIP encoders only)") from None

    def inputs(self, prompts: Sequence[str], new_tokens: Mapping[str, torch.Tensor] | None = None,
               parse_weights: bool = False) -> TokenInputs:
        if new_tokens:
            raise ConfigError(f"learned tokens ({', '.join(new_tokens)}) are CLIP token embeddings: textual inversion "
                              "applies to the CLIP encoders (encoders=clip)")
        texts, char_weights = [], []
        for prompt in prompts:
            chunks = parse_prompt_weights(prompt) if parse_weights else [(prompt, 1.0)]
            texts.append("".join(text for text, _ in chunks))
            char_weights.append([w for text, w in chunks for _ in text])
        tok = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_offsets_mapping=parse_weights, return_tensors="pt")
        table = self.token_table
        ids = tok.input_ids.to(table.device)
        weights = torch.ones(ids.shape, dtype=table.dtype, device=table.device)
        if parse_weights:
            for b, (text, cw) in enumerate(zip(texts, char_weights)):
                for k, (start, end) in enumerate(tok.offset_mapping[b].tolist()):
                    chars = [i for i in range(start, end) if not text[i].isspace()]
                    if chars:
                        weights[b, k] = cw[chars[0]]
        token_embeds = table[ids]
        return TokenInputs(ids=ids, token_embeds=token_embeds, position_embeds=torch.zeros_like(token_embeds),
                           weights=weights, new_tokens=torch.zeros(ids.shape, dtype=torch.bool, device=ids.device))

    def encode_inputs(self, inputs: TokenInputs) -> torch.Tensor:
        """T5's last hidden state [B, L, D] from (edited) input embeddings (``inputs_embeds``; the
        same numbers as from the ids when nothing is edited)."""
        return self.text_encoder(inputs_embeds=inputs.token_embeds + inputs.position_embeds)[0]


# ---------------------------------------------------------------------------------------------
# Edits of input embeddings (pure functions; the plugins call them)
# ---------------------------------------------------------------------------------------------
def replace_token(inputs: TokenInputs, emb: TextEmbeddings, source: str | int, target: str | int | torch.Tensor) -> TokenInputs:
    """Every occurrence of the token ``source`` gets the input embedding of ``target`` (a token or
    a vector [D]); positions and everything else are unchanged."""
    return mix_tokens(inputs, emb, source, {target: 1.0} if not isinstance(target, torch.Tensor) else [(target, 1.0)])


def mix_tokens(
    inputs: TokenInputs,
    emb: TextEmbeddings,
    source: str | int,
    weights: Mapping[Any, float] | Sequence[tuple[Any, float]],
) -> TokenInputs:
    """Every occurrence of ``source`` gets Σ wᵢ·e(tokenᵢ): a weighted sum of token embeddings
    (tokens by word or id, or vectors [D]). Weights are used as given (not renormalised)."""
    pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    if not pairs:
        raise ConfigError("mix_tokens needs at least one (token, weight) pair, e.g. {red: 0.5, blue: 0.5}")
    sid = source if isinstance(source, int) else emb.token_id(source)
    mixed = sum(float(w) * emb.vector(t) for t, w in pairs)
    mask = inputs.positions_of(sid)
    token_embeds = torch.where(mask[..., None], mixed.to(inputs.token_embeds), inputs.token_embeds)
    return replace(inputs, token_embeds=token_embeds)


def scale_positions(inputs: TokenInputs, scale: float, start: int = 0, end: int | None = None) -> TokenInputs:
    """Multiply the position embeddings of positions ``start:end`` by ``scale`` (0 removes the
    position information there; 1 is the identity)."""
    L = inputs.position_embeds.shape[1]
    if not 0 <= start < L or (end is not None and not start < end <= L):
        raise ConfigError(f"position range {start}:{end} is outside 0:{L} (or empty)")
    factor = torch.ones(L, dtype=inputs.position_embeds.dtype, device=inputs.position_embeds.device)
    factor[start:end] = scale
    return replace(inputs, position_embeds=inputs.position_embeds * factor[:, None])


# ---------------------------------------------------------------------------------------------
# Output embeddings
# ---------------------------------------------------------------------------------------------
def mix_outputs(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 − w)·a + w·b: interpolate two prompts' output embeddings (w = 0 gives a, 1 gives b)."""
    if a.shape != b.shape:
        raise ConfigError(f"cannot mix output embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.lerp(a, b.to(a), weight)


def parse_prompt_weights(prompt: str) -> list[tuple[str, float]]:
    """A1111 emphasis syntax → [(text, weight)] with the syntax removed.

    ``(text)`` multiplies by 1.1, ``[text]`` divides by 1.1, ``(text:1.3)`` multiplies by 1.3;
    nesting multiplies; ``\\(``, ``\\)``, ``\\[``, ``\\]`` are literal brackets; a bracket left open
    applies to the end of the prompt; an unmatched closing bracket is kept as text.
    """
    tokens = re.findall(r"\\[()\[\]\\]|\(|\[|:\s*[-+]?\d*\.?\d+\s*\)|\)|\]|[^\\()\[\]:]+|:|\\", prompt)
    out: list[list[Any]] = []  # [text, weight]
    opened: list[tuple[int, str]] = []  # (index into out where the bracket opened, bracket)

    def close(kind: str, factor: float) -> None:
        start, _ = opened.pop()
        for chunk in out[start:]:
            chunk[1] *= factor

    for tok in tokens:
        if tok.startswith("\\") and len(tok) == 2:
            out.append([tok[1], 1.0])
        elif tok in ("(", "["):
            opened.append((len(out), tok))
        elif tok.startswith(":") and tok.endswith(")") and opened and opened[-1][1] == "(":
            close("(", float(tok[1:-1]))
        elif tok == ")" and opened and opened[-1][1] == "(":
            close("(", BRACKET_WEIGHT)
        elif tok == "]" and opened and opened[-1][1] == "[":
            close("[", 1 / BRACKET_WEIGHT)
        else:
            out.append([tok, 1.0])
    while opened:  # left open: applies to the end (A1111's behaviour)
        close(opened[-1][1], BRACKET_WEIGHT if opened[-1][1] == "(" else 1 / BRACKET_WEIGHT)
    merged: list[tuple[str, float]] = []
    for text, w in out:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + text, w)
        else:
            merged.append((text, w))
    return merged or [("", 1.0)]


def apply_prompt_weights(hidden: torch.Tensor, weights: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """A1111's emphasis: multiply each token's output embedding by its weight, then (``normalize``)
    rescale each prompt's embedding so its mean over all tokens and channels is unchanged.

    A1111 takes that mean over the whole batch; here it is per prompt, so a sample's conditioning
    does not depend on the other prompts of its batch (identical for a batch of one).
    """
    scaled = hidden * weights[..., None].to(hidden)
    if not normalize:
        return scaled
    before = hidden.mean(dim=(1, 2), keepdim=True)
    after = scaled.mean(dim=(1, 2), keepdim=True)
    return scaled * (before / after)


# ---------------------------------------------------------------------------------------------
# Textual inversion files
# ---------------------------------------------------------------------------------------------
FORMATS = ("diffusers", "a1111")


def load_embeddings(path: str | Path, token: str | None = None) -> dict[str, torch.Tensor]:
    """Learned embeddings from a file: {token: vectors [n, D]}.

    Formats: diffusers ``learned_embeds.safetensors`` / ``.bin`` ({token: [D] or [n, D]}), A1111
    ``.pt`` ({"string_to_param": {"*": [n, D]}, "name": …}) and ``.safetensors`` ({"emb_params":
    [n, D]}, named after the file). A folder is searched for ``learned_embeds.safetensors`` then
    ``learned_embeds.bin``. Pickles are read with ``torch.load(weights_only=True)`` only. ``token``
    renames a single embedding.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        found = [p / n for n in ("learned_embeds.safetensors", "learned_embeds.bin") if (p / n).exists()]
        if not found:
            raise ConfigError(f"no learned_embeds.safetensors or learned_embeds.bin in '{p}': give the embedding file itself")
        p = found[0]
    if not p.is_file():
        raise ConfigError(f"embedding file '{p}' does not exist: give a .safetensors, .bin or .pt file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(p))
        else:
            data = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot read embedding file '{p}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    found_tokens: dict[str, torch.Tensor]
    if isinstance(data, torch.Tensor):
        found_tokens = {token or p.stem: data}
    elif isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        found_tokens = {str(data.get("name") or p.stem): next(iter(params.values()))}
    elif isinstance(data, dict) and "emb_params" in data:
        found_tokens = {p.stem: data["emb_params"]}
    elif isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        found_tokens = dict(data)
    else:
        raise ConfigError(f"'{p}' is not a textual-inversion embedding (diffusers {{token: tensor}} or A1111 string_to_param/emb_params)")
    if token is not None:
        if len(found_tokens) != 1:
            raise ConfigError(f"'{p}' holds {len(found_tokens)} embeddings; token= can rename only one")
        found_tokens = {token: next(iter(found_tokens.values()))}
    out = {}
    for name, vec in found_tokens.items():
        if vec.dim() not in (1, 2):
            raise ConfigError(f"embedding '{name}' in '{p}' has shape {tuple(vec.shape)}: expected [D] or [n, D]")
        out[name] = vec.detach().float().reshape(-1, vec.shape[-1])
    return out


def save_embeddings(path: str | Path, embeddings: Mapping[str, torch.Tensor], format: str = "diffusers") -> Path:
    """Write learned embeddings {token: [n, D]}; ``format`` diffusers ({token: [n, D]}, in a
    .safetensors or .bin file — diffusers' ``load_textual_inversion`` reads both) or a1111 (one
    token: ``.pt`` with string_to_param, or ``.safetensors`` with emb_params)."""
    p = Path(path)
    if format not in FORMATS:
        raise ConfigError(f"embedding format '{format}' is not one of {', '.join(FORMATS)}")
    if p.suffix not in (".safetensors", ".bin", ".pt"):
        raise ConfigError(f"save embeddings to a .safetensors, .bin or .pt file, not '{p.name}'")
    tensors = {k: v.detach().float().cpu().reshape(-1, v.shape[-1]).contiguous() for k, v in embeddings.items()}
    if format == "a1111":
        if len(tensors) != 1:
            raise ConfigError("an A1111 embedding file holds one token: save one embedding per file")
        ((name, vec),) = tensors.items()
        if p.suffix == ".safetensors":
            data: Any = {"emb_params": vec}
        else:
            data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": name, "step": 0}
    else:
        data = tensors
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(data, str(p))
    else:
        torch.save(data, str(p))
    return p


# ---------------------------------------------------------------------------------------------
# The conditioning hook of edit plugins
# ---------------------------------------------------------------------------------------------
def run_edits(run: Run, plugin: TextEdit) -> list[TextEdit] | None:
    """The edit plugins of the run's ``conditioning`` list (config order), or None when
    ``plugin`` is listed but is not the last of them (the last one encodes for all)."""
    chain = [e.obj for e in run.plugins.by_group("conditioning") if isinstance(e.obj, TextEdit)]
    if not any(e is plugin for e in chain):
        return [plugin]  # called from user code, outside its run's list
    return chain if chain[-1] is plugin else None


def reencode(run: Run, cond: Conditioning, plugin: TextEdit) -> Conditioning:
    """The ``conditioning`` hook of every edit plugin: the last edit plugin of the list encodes
    the batch's prompts with all of them (``apply_to`` cond or both), and the negative prompts,
    when CFG is on, with those whose ``apply_to`` is uncond or both; earlier ones pass ``cond``
    through. Keys other than ``encoder_hidden_states`` pass through (a model with an
    ``encode_edited(prompts, edits)`` method makes the keys it returns instead)."""
    edits = run_edits(run, plugin)
    if edits is None:
        return cond
    # a model with several text encoders (SDXL, SD3, Flux) encodes with the edits itself: every
    # conditioning tensor it makes (states, pooled embeddings) comes from the edited encoders
    encode = getattr(run.model, "encode_edited", None) or (lambda prompts, chosen: clip_states(run.model, prompts, chosen))
    tensors = {**cond.tensors, **encode(cond.prompts, [e for e in edits if e.apply_to != "uncond"])}
    uncond = cond.uncond
    if uncond is not None and cond.negative_prompts is not None:
        uncond = {**uncond, **encode(cond.negative_prompts, [e for e in edits if e.apply_to != "cond"])}
    return replace(cond, tensors=tensors, uncond=uncond)


def clip_states(model: Any, prompts: Sequence[str], edits: Sequence[TextEdit]) -> dict[str, torch.Tensor]:
    """``encoder_hidden_states`` of a one-CLIP model (Stable Diffusion 1.x/2.x) with ``edits``."""
    emb = TextEmbeddings.of(model)
    dtype = getattr(model, "dtype", None) or emb.token_table.dtype
    return {"encoder_hidden_states": emb.encode(prompts, for_encoder(edits, "clip")).to(dtype)}




class EditPlugin(TextEdit):
    """Base of the ``conditioning`` plugins that edit the text encoding: ``configure`` checks the
    edit (``check``, then the shared checks), ``conditioning`` re-encodes with every edit plugin of
    the list (:func:`reencode`). A plugin overrides only the :class:`TextEdit` methods it needs."""

    def check(self, run: Run) -> None:
        """Plugin-specific checks made in ``configure`` (before sampling)."""

    @hookimpl
    def configure(self, run):
        TextEmbeddings.of(run.model)  # a CLIP text model (a clear error otherwise)
        name = next((e.name for e in run.plugins.by_group("conditioning") if e.obj is self), type(self).__name__)
        kinds = tuple(getattr(run.model, "text_encoder_kinds", ("clip",)))
        if self.encoders != TextEncoders.clip and self.not_on_t5 is not None:
            raise ConfigError(f"conditioning {name} cannot edit T5 ({self.not_on_t5}): set conditioning.{name}.encoders=clip")
        if self.encoders == TextEncoders.t5 and "t5" not in kinds:
            raise ConfigError(f"conditioning {name}.encoders=t5, but model {type(run.model).__name__} has no T5 encoder "
                              f"(encoders: {', '.join(kinds)}): set conditioning.{name}.encoders=clip (or all)")
        self.check(run)

    @hookimpl
    def conditioning(self, run, cond):
        return reencode(run, cond, self)
