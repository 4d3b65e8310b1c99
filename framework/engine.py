"""The sampling loop: the only code that calls the per-step hooks.

```
cond  = conditioning(model.encode(prompts))         # chain, config order
sched = schedule(model, steps)                      # exactly one
x     = init_latents(sched, noise(seed, k))         # first result
for i in range(N):
    before_step(state)                              # all, config order
    state.pred = first evaluation at (x, σ_i)       # predict → guidance → momentum
    x_next = step(state, denoise)                   # exactly one
    after_step(state, x_next)                       # all, config order
```
``denoise(x, σ)`` = predict (one NFE, counted here) → guidance chain; the momentum chain applies
to a step's first evaluation only. Gradients are off except inside the guidance calls of plugins
that requested them.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework.errors import ConfigError, PluginError, SamplerlabError
from framework.models.base import Model
from framework.noise import SampleNoise
from framework.registry import PluginSet, build_plugins, schema
from framework.state import Batch, Conditioning, Prediction, SamplerState, Schedule, StepRecord


@dataclass
class Settings:
    """The top-level keys of the config (type-checked)."""

    steps: int = 20
    seed: int = 0
    num_samples: int = 4
    batch_size: int = 4
    prompts: list[str] = field(default_factory=lambda: ["a red circle"])
    negative_prompt: str = ""
    cfg_scale: float = 5.0
    device: str = "auto"
    dtype: str = "float32"
    output_dir: str | None = None
    save_images: bool = True
    noise: str = "independent"  # independent | brownian (SDE noise coherent across step counts)

    def check(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be ≥ 1 (got {self.steps}): e.g. steps=20")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be ≥ 1 (got {self.num_samples})")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1 (got {self.batch_size})")
        if not self.prompts:
            raise ConfigError("prompts is empty: give at least one, e.g. 'prompts=[a red circle]'")
        if self.noise not in ("independent", "brownian"):
            raise ConfigError(f"noise must be independent or brownian, got '{self.noise}'")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")


DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
SETTINGS_KEYS = tuple(Settings.__dataclass_fields__)


def read_settings(cfg: DictConfig) -> Settings:
    values = {k: cfg[k] for k in SETTINGS_KEYS if k in cfg}
    try:
        checked = OmegaConf.merge(schema(Settings), values)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        hint = f": it must be a list, e.g. '{key}=[a red circle,a blue square]'" if key == "prompts" else ""
        raise ConfigError(f"bad value for '{key}'{hint} ({str(e).splitlines()[0]})") from e
    settings = Settings(**OmegaConf.to_container(checked))  # type: ignore[arg-type]
    settings.check()
    return settings


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device '{name}': use auto, cpu or cuda[:N]") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available: use device=cpu or device=auto")
    return device


def call(name: str, hook: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call one plugin's hook, reporting a failure with the plugin's name."""
    try:
        return fn(**kwargs)
    except (SamplerlabError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise PluginError(name, hook, e) from e


@dataclass
class Result:
    """What a run returns: initial noisy latents, final latents, decoded images (or None), record."""

    x_T: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor | None
    record: dict[str, Any]
    schedule: Schedule
    failed: list[int] = field(default_factory=list)


class Run:
    """One run: settings, model, plugins, and what plugins declare or report."""

    def __init__(self, cfg: DictConfig, settings: Settings, plugins: PluginSet, device: torch.device):
        self.cfg = cfg
        self.settings = settings
        self.plugins = plugins
        self.model: Model = plugins.by_group("model")[0].obj  # type: ignore[assignment]
        self.device = device
        self.dtype = DTYPES[settings.dtype]
        self.metrics: dict[str, float] = {}
        self.needs_uncond = False
        self._grad_plugins: set[int] = set()
        self.output_dir: Path | None = None

    # declarations made in ``configure``
    def request_uncond(self) -> None:
        """Ask the model adapter to batch the unconditional (negative-prompt) pass."""
        self.needs_uncond = True

    def request_grad(self, plugin: object) -> None:
        """Run ``plugin``'s guidance hook with gradients enabled."""
        self._grad_plugins.add(id(plugin))

    def prepare(self) -> None:
        """Resolve every hook's implementations once (config order) for the hot loop."""
        p = self.plugins
        self.before_step = p.calls("before_step")
        self.after_step = p.calls("after_step")
        self.momentum = p.calls("momentum")
        self.guidance = [
            (name, fn, id(fn.__self__) in self._grad_plugins) for name, fn in p.calls("guidance")
        ]
        self.predict = p.one("predict")
        self.step = p.one("step")

    def encode(self, prompts: list[str]) -> Conditioning | None:
        if not self.model.is_conditional:
            return None
        cond = Conditioning(prompts=prompts, tensors=self.model.encode_prompts(prompts))
        if self.needs_uncond:
            cond.negative_prompts = [self.settings.negative_prompt] * len(prompts)
            cond.uncond = self.model.encode_prompts(cond.negative_prompts)
        for name, fn in self.plugins.calls("conditioning"):
            cond = call(name, "conditioning", fn, run=self, cond=cond)
        return cond


class Denoiser:
    """``denoise(x, σ)`` as the solver sees it: predict → guidance, one NFE per evaluation."""

    def __init__(self, run: Run, batch: Batch):
        self.run, self.batch = run, batch
        self.state: SamplerState | None = None
        self._predict_name, self._predict = run.predict

    def __call__(self, x: torch.Tensor, sigma: float) -> Prediction:
        st = self.state
        assert st is not None
        if st.pred is not None and x is st.x and sigma == st.sigma:
            return st.pred
        return self.evaluate(x, sigma)

    def evaluate(self, x: torch.Tensor, sigma: float) -> Prediction:
        st = self.state
        pred = call(self._predict_name, "predict", self._predict, state=st, x=x, sigma=sigma, cond=self.batch.cond)
        self.batch.nfe += 1
        for name, fn, grad in self.run.guidance:
            with torch.enable_grad() if grad else contextlib.nullcontext():
                pred = call(name, "guidance", fn, state=st, pred=pred)
        return pred


def sample_batch(
    run: Run, batch: Batch, schedule: Schedule, progress: Callable[[], object] = lambda: None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the loop for one batch; returns (x_T, x at the last σ). ``progress`` is called per step."""
    init = run.plugins.pm.hook.init_latents
    x = init(run=run, batch=batch, schedule=schedule, noise=batch.noise.draw())
    x_T = x
    denoiser = Denoiser(run, batch)
    step_name, step = run.step
    for i in range(schedule.steps):
        state = SamplerState(run=run, batch=batch, index=i, x=x, sigma=schedule.sigmas[i], schedule=schedule)
        denoiser.state = state
        for name, fn in run.before_step:
            call(name, "before_step", fn, state=state)
        pred = state.guided = denoiser.evaluate(state.x, state.sigma)
        for name, fn in run.momentum:
            pred = call(name, "momentum", fn, state=state, pred=pred)
        state.pred, state.x = pred, pred.x
        x_next = call(step_name, "step", step, state=state, denoise=denoiser)
        for name, fn in run.after_step:
            call(name, "after_step", fn, state=state, x_next=x_next)
        batch.history.append(
            StepRecord(i, state.sigma, state.sigma_next, state.x, state.guided.denoised, pred.denoised, x_next)
        )
        x = x_next
        progress()
    return x_T, x


def _batches(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def execute(
    cfg: DictConfig,
    choices: dict[str, str] | None = None,
    model: object | None = None,
    output_dir: str | Path | None = None,
) -> Result:
    """Run one composed config end to end: build plugins, sample every batch, score, record."""
    from framework import records

    settings = read_settings(cfg)
    device = resolve_device(settings.device)
    plugins = build_plugins(cfg, choices or {}, model)
    run = Run(cfg, settings, plugins, device)
    out = output_dir if output_dir is not None else settings.output_dir
    run.output_dir = Path(out) if out else None
    run.model.setup(device, run.dtype)
    for name, fn in plugins.calls("configure"):
        call(name, "configure", fn, run=run)
    run.prepare()
    sched_name, sched_fn = plugins.one("schedule")
    schedule = call(sched_name, "schedule", sched_fn, model=run.model, steps=settings.steps)
    for name, fn in plugins.calls("adjust_schedule"):
        schedule = call(name, "adjust_schedule", fn, run=run, schedule=schedule)
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"the schedule plugins returned {type(schedule).__name__}, not a Schedule")
    for name, fn in plugins.calls("run_start"):
        call(name, "run_start", fn, run=run)

    xs_T, xs, imgs, failed, nfes, calls = [], [], [], [], [], []
    batches = _batches(settings.num_samples, settings.batch_size)
    bar = tqdm(total=len(batches) * schedule.steps, desc="sampling", unit="step", disable=None, leave=False)
    t0 = time.perf_counter()
    with torch.no_grad(), bar:
        for indices in batches:
            prompts = [settings.prompts[k % len(settings.prompts)] for k in indices]
            until = 2 * schedule.sigmas[0] + 1 if settings.noise == "brownian" else None  # room for churn
            noise = SampleNoise(settings.seed, indices, run.model.latent_shape, device, run.dtype, until)
            batch = Batch(indices=indices, cond=run.encode(prompts), noise=noise)
            x_T, x = sample_batch(run, batch, schedule, bar.update)
            latents = run.model.output_latents(x, schedule.sigmas[-1])
            images = run.model.decode(latents)
            if batch.failed is not None:
                failed += [k for k, bad in zip(indices, batch.failed.tolist()) if bad]
            for name, fn in plugins.calls("batch_end"):
                call(name, "batch_end", fn, run=run, batch=batch, latents=latents, images=images)
            xs_T.append(x_T)
            xs.append(x)
            imgs.append(images)
            nfes.append(batch.nfe)
            calls.append(batch.unet_calls)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0

    x_T, x = torch.cat(xs_T), torch.cat(xs)
    images = None if imgs[0] is None else torch.cat(imgs)
    run.metrics.update(
        nfe=sum(nfes) / len(nfes),
        unet_calls=sum(calls) / len(calls),
        seconds=seconds,
        seconds_per_sample=seconds / settings.num_samples,
    )
    exact = run.model.exact_solution(x_T, schedule.sigmas[0], schedule.sigmas[-1])
    if exact is not None:
        run.metrics["rmse_to_reference"] = float((x - exact).double().pow(2).mean().sqrt())
    result = Result(x_T=x_T, latents=x, images=images, record={}, schedule=schedule, failed=failed)
    for name, fn in plugins.calls("run_end"):
        call(name, "run_end", fn, run=run, result=result)
    result.record = records.build(run, result)
    if run.output_dir is not None:
        records.save(run.output_dir, result, save_images=settings.save_images)
    return result
