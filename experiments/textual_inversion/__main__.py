"""Textual inversion (Gal et al. 2022): learn a new token's embedding from a few images.

    python -m experiments.textual_inversion                      # the bundled model, the striped concept
    python -m experiments.textual_inversion model=bundled_flow out=outputs/ti_flow
    python -m experiments.textual_inversion images=my_photos "placeholder_token='<my-toy>'" initializer_token=toy \\
        model=/path/to/sd15-folder steps=3000 lr=5e-4 device=cuda
    python -m experiments.textual_inversion fast=true out=/tmp/ti # smoke run (seconds)

Only the new token's vectors are trained (the UNet, VAE, text encoder and the tokenizer are frozen
and untouched): the denoising loss of the model's own parametrisation (ε or v) at uniformly drawn
timesteps (``timesteps=[lo, hi]`` limits them; the default ``auto`` keeps σ ≈ 0.83–5.1, where a
texture such as the stripes is decided: [300, 800] for the VP model; null draws all, as the paper does), on the images' VAE latents (posterior
means), with captions that contain the token. For a flow-matching model (``model=bundled_flow``,
an SD3 pipeline: both CLIP encoders get the token) the loss is the rectified-flow one,
‖v(x_t, t) − (ε − x0)‖² at x_t = (1 − t)·x0 + t·ε, with ``timesteps`` in its units, 1000·t
(``auto``: [454, 836], the same σ range).
The token is placed in the input embeddings by :mod:`framework.bases.embeddings` (no tokenizer edit).
Without ``images`` the bundled world draws ``num_images`` scenes whose main shape is *striped* —
the concept the bundled model saw in training but never had a word for — captioned by the world
with the token before the colour ("a small <striped> red circle on the left").

``train_kv=true`` is Custom Diffusion (Kumari et al. 2023): the key/value projections that read the
text (:func:`text_kv_layers`) train too, at ``lr_kv``, with prior preservation on bundled-world scenes
without the concept (their own captions, weight ``prior_weight``); the adapted model is written whole
to ``<out>/pipeline`` (a pipeline folder: run it with ``model=sd3 model.path=… model.use_t5=false``
and the token), and the key/values are checkpointed beside the token's vectors.

Writes ``<out>/learned_embeds.safetensors`` (diffusers format: ``pipe.load_textual_inversion``
reads it, and so does ``conditioning=[textual_inversion]``), checkpoints every
``checkpoint_every`` steps in ``<out>/checkpoints`` (a rerun resumes from the last one; the
optimiser's moments restart), ``train_images.png`` and ``train.json`` (losses, seconds).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from experiments.harness import Experiment, entry, resolve_device, save_grid
from framework.bases.embeddings import LearnedTokens, TextEmbeddings, load_embeddings, save_embeddings
from framework.plugin import ConfigError, pixel_size

HERE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_pipe(model: str) -> Any:
    from framework.models.diffusers_sd import load_pipeline

    if model == "bundled_flow":
        from framework.models.bundled_flow import BundledFlow

        return BundledFlow().pipe
    if model == "bundled":
        from framework.bundled import PIPELINE_DIR

        model = str(PIPELINE_DIR)
    return load_pipeline(model)


TOKEN_PLACES = ("colour", "shape")


def striped_scenes(n: int, seed: int, token: str, place: str = "colour") -> tuple[torch.Tensor, list[str]]:
    """``n`` bundled-world scenes with a striped main shape ([-1, 1]) and captions naming ``token``:
    before the colour word ("a small <striped> red circle", ``place=colour``) or after the shape word
    ("a small red circle <striped>", ``place=shape``)."""
    scenes = single_shape_scenes(n, seed, concept_rate=1.0)
    return scenes.images, [place_token(cap, lab, token, place) for cap, lab in zip(scenes.captions, scenes.labels)]


def single_shape_scenes(n: int, seed: int, concept_rate: float) -> Any:
    """Bundled-world scenes of one shape each, a share ``concept_rate`` of them striped, some caption words omitted."""
    from framework.bundled.world import sample_scenes

    return sample_scenes(n, seed, concept_rate=concept_rate, two_shape_rate=0.0, omit_rate=0.3)


def place_token(caption: str, label: Any, token: str, place: str = "colour") -> str:
    """A world caption with ``token`` before its main shape's colour word or after its shape word."""
    if place not in TOKEN_PLACES:
        raise ConfigError(f"token_place={place}: choose colour (before the colour word) or shape (after the shape word)")
    if place == "colour":
        return re.sub(rf"\b{label.main.colour}\b", f"{token} {label.main.colour}", caption, count=1)
    return re.sub(rf"\b{label.main.shape}\b", f"{label.main.shape} {token}", caption, count=1)


def with_token(colour: str, shape: str, token: str, place: str = "colour") -> str:
    """The prompt 'a <colour> <shape>' with ``token`` where :func:`striped_scenes` puts it."""
    return f"a {token} {colour} {shape}" if place == "colour" else f"a {colour} {shape} {token}"


def folder_images(folder: Path, size: tuple[int, int], token: str, templates: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Images of a folder resized to ``size`` in [-1, 1]; a ``<name>.txt`` beside an image is its
    caption (``{token}`` is replaced by the token), else the templates take turns."""
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}': set images= to a folder of pictures")
    images, captions = [], []
    for i, f in enumerate(files):
        img = Image.open(f).convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
        images.append(torch.tensor(list(img.getdata()), dtype=torch.float32).view(size[0], size[1], 3).permute(2, 0, 1))
        txt = f.with_suffix(".txt")
        caption = txt.read_text().strip() if txt.exists() else templates[i % len(templates)]
        if "{token}" not in caption and token not in caption:
            raise ConfigError(f"caption of {f.name} does not contain {{token}} or {token}: add it so the token is learned")
        captions.append(caption.replace("{token}", token))
    return torch.stack(images) / 127.5 - 1, captions


def adapter_of(pipe: Any, device: torch.device | str = "cpu") -> Any:
    """The samplerlab model over ``pipe`` (float32 on ``device``): its latents and, for a flow
    pipeline, its conditioning and network call."""
    from framework.models.diffusers_sd import StableDiffusion
    from framework.models.sd3 import StableDiffusion3

    adapter = StableDiffusion3(pipeline=pipe, use_t5=False) if hasattr(pipe, "transformer") else StableDiffusion(pipeline=pipe)
    adapter.setup(torch.device(device), torch.float32)
    return adapter


def model_loss(pipe: Any, adapter: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prompts: list[str],
               edits: list) -> torch.Tensor:
    """The model's training objective at integer timesteps ``t``: the ε (or v) prediction's MSE for a
    UNet pipeline; for a flow pipeline the velocity's, ‖v(x_t, 1000·t) − (ε − x0)‖², x_t = (1 − t)·x0 + t·ε."""
    if hasattr(pipe, "transformer"):
        tt = (t.float() / int(pipe.scheduler.config.num_train_timesteps)).view(-1, 1, 1, 1)
        pred = adapter.network_velocity((1 - tt) * x0 + tt * noise, t.float(), adapter.encode_edited(prompts, edits))
        return torch.nn.functional.mse_loss(pred, noise - x0)
    a = pipe.scheduler.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
    eps = pipe.scheduler.config.get("prediction_type", "epsilon") == "epsilon"
    target = noise if eps else a.sqrt() * noise - (1 - a).sqrt() * x0
    hidden = TextEmbeddings.of(pipe).encode(prompts, edits)
    pred = pipe.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=hidden).sample
    return torch.nn.functional.mse_loss(pred, target)


@torch.no_grad()
def denoising_loss(pipe: Any, captions: list[str], images: torch.Tensor, edits: list = (), seed: int = 0,
                   repeats: int = 4) -> float:
    """Mean denoising loss (the training objective) of ``images`` under ``captions``, at fixed
    noise and uniformly drawn timesteps (``repeats`` draws per image): lower means the captions
    explain the images better. Used to check a learned token on held-out images."""
    adapter = adapter_of(pipe, pipe.device)
    gen = torch.Generator().manual_seed(seed)
    x0 = adapter.encode_images((images + 1) / 2)
    n = int(pipe.scheduler.config.num_train_timesteps)
    total = 0.0
    for _ in range(repeats):
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = torch.randint(0, n, (len(x0),), generator=gen).to(x0.device)
        total += float(model_loss(pipe, adapter, x0, noise, t, captions, list(edits)))
    return total / repeats


def text_kv_layers(pipe: Any) -> dict[str, torch.nn.Linear]:
    """The key/value projections that read the text, by name in the network: a UNet's cross-attention
    (``attn2.to_k``/``to_v``), an SD3 transformer's context stream (``attn.add_k_proj``/``add_v_proj``)."""
    net = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    ends = ("attn.add_k_proj", "attn.add_v_proj") if hasattr(pipe, "transformer") else ("attn2.to_k", "attn2.to_v")
    layers = {n: m for n, m in net.named_modules() if n.endswith(ends) and isinstance(m, torch.nn.Linear)}
    if not layers:
        raise ConfigError(f"train_kv=true: {type(net).__name__} has no text key/value projections ({', '.join(ends)})")
    return layers


def kv_state(layers: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().contiguous() for n, m in layers.items() for k, v in m.state_dict().items()}


def latest_checkpoint(folder: Path) -> tuple[int, Path] | None:
    found = [(int(m.group(1)), p) for p in folder.glob("learned_embeds-*.safetensors")
             if (m := re.fullmatch(r"learned_embeds-(\d+)\.safetensors", p.name))]
    return max(found) if found else None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the token; returns a summary (:func:`run` writes it to ``<out>/train.json``)."""
    torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out)
    steps = 4 if cfg.fast else int(cfg.steps)
    n_images = 4 if cfg.fast else int(cfg.num_images)
    batch = min(2 if cfg.fast else int(cfg.batch_size), n_images)
    token = str(cfg.placeholder_token)
    device = resolve_device(cfg.device)
    pipe = load_pipe(str(cfg.model))
    pipe.to(device)
    flow = hasattr(pipe, "transformer")  # an SD3 pipeline: the rectified-flow objective
    for part in (pipe.transformer if flow else pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if part is not None:
            part.requires_grad_(False)
    emb = TextEmbeddings.of(pipe)
    if token in pipe.tokenizer.get_vocab() or any(token in t for t in ("<|startoftext|>", "<|endoftext|>")):
        raise ConfigError(f"placeholder_token '{token}' is already a token of this tokenizer: choose a new one, e.g. '<my-concept>'")

    adapter = adapter_of(pipe, device)
    size = pixel_size(adapter)
    if cfg.images:
        images, captions = folder_images(Path(cfg.images), size, token, list(cfg.templates))
    else:
        images, captions = striped_scenes(n_images, 10_000 + int(cfg.seed), token, str(cfg.get("token_place", "colour")))
    save_grid((images[:16] + 1) / 2, out / "train_images.png", nrow=8)

    def encode(x: torch.Tensor) -> torch.Tensor:  # the posterior means, scaled (and shifted) as the model's latents
        with torch.no_grad():
            return torch.cat([adapter.encode_images((x[i:i + 64] + 1) / 2) for i in range(0, len(x), 64)])

    latents = encode(images)
    kv = text_kv_layers(pipe) if cfg.get("train_kv") else {}
    prior_latents, prior_captions, prior_weight = None, [], float(cfg.get("prior_weight", 0.0))
    if kv and not cfg.images and int(cfg.prior_images) > 0 and prior_weight > 0:  # the world without the concept
        prior = single_shape_scenes(4 if cfg.fast else int(cfg.prior_images), 20_000 + int(cfg.seed), concept_rate=0.0)
        prior_latents, prior_captions = encode(prior.images), prior.captions

    ckpt_dir = out / "checkpoints"
    start = 0
    init = emb.vector(str(cfg.initializer_token)).detach().clone().repeat(int(cfg.num_vectors), 1)
    last = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if last is not None:
        start, path = last
        init = load_embeddings(path, token=token)[token].to(init)
        print(f"resuming from {path} (step {start})")
    if kv and last is not None and (ckpt_dir / f"kv-{start}.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(ckpt_dir / f"kv-{start}.safetensors"))
        for n, m in kv.items():
            m.load_state_dict({k: state[f"{n}.{k}"].to(device) for k in m.state_dict()})
    vectors = torch.nn.Parameter(init)
    groups = [{"params": [vectors], "lr": float(cfg.lr)}]
    if kv:
        for m in kv.values():
            m.requires_grad_(True)
        groups.append({"params": [p for m in kv.values() for p in m.parameters()], "lr": float(cfg.lr_kv)})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    timesteps = cfg.get("timesteps")
    if timesteps == "auto":  # σ ≈ 0.83–5.1, where the bundled models decide a texture such as the stripes
        timesteps = [454, 836] if flow else [300, 800]
    t_lo, t_hi = (int(v) for v in timesteps) if timesteps else (0, n_train - 1)
    if not 0 <= t_lo <= t_hi < n_train:
        raise ConfigError(f"timesteps={list(timesteps)}: give [lo, hi] with 0 ≤ lo ≤ hi ≤ {n_train - 1}, auto, or null for all")
    gen = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + start)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), desc="textual inversion", unit="step", initial=start, total=steps)
    for step in bar:
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(t_lo, t_hi + 1, (batch,), generator=gen).to(device)
        edits = [LearnedTokens({token: vectors})]
        loss = model_loss(pipe, adapter, x0, noise, t, [captions[i] for i in idx.tolist()], edits)
        if prior_latents is not None:  # prior preservation: the world without the concept, its own captions
            j = torch.randint(len(prior_latents), (batch,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(t_lo, t_hi + 1, (batch,), generator=gen).to(device)
            loss = loss + prior_weight * model_loss(pipe, adapter, prior_latents[j], noise, t,
                                                    [prior_captions[i] for i in j.tolist()], edits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        done = step + 1
        if done % int(cfg.checkpoint_every) == 0 or done == steps:
            save_embeddings(ckpt_dir / f"learned_embeds-{done}.safetensors", {token: vectors})
            if kv:
                from safetensors.torch import save_file

                save_file(kv_state(kv), str(ckpt_dir / f"kv-{done}.safetensors"))
    seconds = time.perf_counter() - t0
    final = save_embeddings(out / "learned_embeds.safetensors", {token: vectors})
    if kv:  # the adapted model, whole (the text key/values changed): a pipeline folder any samplerlab run loads
        for m in kv.values():
            m.requires_grad_(False)
        pipe.save_pretrained(str(out / "pipeline"))
    summary = {
        "token": token, "initializer_token": str(cfg.initializer_token), "num_vectors": int(cfg.num_vectors),
        "steps": steps, "resumed_from": start,
        "batch_size": batch, "lr": float(cfg.lr), "num_images": len(images), "seconds": seconds,
        "threads": int(cfg.threads), "device": str(device), "file": str(final),
        "train_kv": bool(kv), "kv_parameters": sum(p.numel() for m in kv.values() for p in m.parameters()),
        "pipeline": str(out / "pipeline") if kv else None, "prior_images": 0 if prior_latents is None else len(prior_latents),
        "loss_first_20": sum(losses[:20]) / max(1, len(losses[:20])), "loss_last_20": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "nearest_tokens": emb.nearest(vectors[0], 5), "captions": captions[:4],
    }
    return summary


def run(ex: Experiment) -> dict[str, Any]:
    """Train as ``ex.cfg`` says; returns the record, also written to ``<out>/train.json`` (its
    ``results`` are :func:`train`'s summary)."""
    summary = train(ex.cfg)
    print(json.dumps({k: summary[k] for k in ("file", "steps", "seconds", "loss_first_20", "loss_last_20")}, indent=1))
    return ex.record(Path(ex.cfg.out) / "train.json", summary, ["learned_embeds.safetensors", "train_images.png"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ex = Experiment.compose(HERE, argv)
    if ex.cfg.fast and ex.cfg.out == "outputs/textual_inversion":
        ex.cfg.out = "outputs/textual_inversion_fast"
    return run(ex)


if __name__ == "__main__":
    entry(main)
