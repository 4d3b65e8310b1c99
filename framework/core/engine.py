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
import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework.core.errors import ConfigError, PluginError, SamplerlabError
from framework.models.base import Model
from framework.core.noise import SampleNoise
from framework.core.registry import PluginSet, build_plugins, schema
from framework.core.state import Batch, Conditioning, Prediction, SamplerState, Schedule, StepRecord


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
    name: str | None = None  # a fixed run-folder name (conf/config.yaml): reruns find and resume it
    resume: bool = True  # skip the batches (and whole runs) already saved in the run folder
    shard_index: int = 0  # this process makes the shard_index-th of shard_count contiguous index blocks
    shard_count: int = 1
    compile: bool = False  # torch.compile the model's network (framework/models/compiled.py)
    compile_mode: str | None = None  # null: reduce-overhead (CUDA graphs) on CUDA, default on the CPU
    channels_last: bool = False  # the network's weights (and so its activations) in NHWC layout

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
        if not 1 <= self.shard_count <= self.num_samples:
            raise ConfigError(f"shard_count must be between 1 and num_samples={self.num_samples}, got {self.shard_count}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ConfigError(
                f"shard_index must be in 0..{self.shard_count - 1} (shard_count={self.shard_count}), got {self.shard_index}"
            )
        if self.compile_mode is not None:
            from framework.models.compiled import MODES

            if self.compile_mode not in MODES:
                raise ConfigError(f"compile_mode '{self.compile_mode}' is not one of {', '.join(MODES)} (or null)")
        if self.name is not None and (not self.name.strip() or self.name.startswith("/") or ".." in self.name.split("/")):
            raise ConfigError(f"name '{self.name}' must be a relative folder name, e.g. name=my_study")

    def indices(self) -> range:
        """The global sample indices this process generates: its contiguous block of the shards."""
        n, c, i = self.num_samples, self.shard_count, self.shard_index
        return range(n * i // c, n * (i + 1) // c)


DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
SETTINGS_KEYS = tuple(Settings.__dataclass_fields__)


_SETTINGS: dict[str, Settings] = {}


def read_settings(cfg: DictConfig) -> Settings:
    """The checked top-level keys. Checking through the structured schema costs ~10 ms, so the
    result is memoised per distinct set of values (the runs of a sweep or a benchmark repeat them)."""
    values = {k: cfg[k] for k in SETTINGS_KEYS if k in cfg}
    plain = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in values.items()}
    memo = repr(sorted(plain.items()))
    if memo in _SETTINGS:
        return dataclasses.replace(_SETTINGS[memo], prompts=list(_SETTINGS[memo].prompts))
    settings = _check_settings(values)
    if len(_SETTINGS) > 256:
        _SETTINGS.clear()
    _SETTINGS[memo] = dataclasses.replace(settings, prompts=list(settings.prompts))
    return settings


def _check_settings(values: dict[str, Any]) -> Settings:
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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run (a KeyboardInterrupt): finished batches are on disk."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM (a cluster's pre-emption) stops the run like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class NonFinite:
    """Where each sample of a batch first stopped being finite, accumulated on the device.

    ``check`` costs a few device kernels and never synchronises: it notes the check point (step, σ,
    hook, plugin) in a host list and keeps, per sample, the number of the first point where the
    checked tensor held a NaN/Inf. ``read`` is the only host–device synchronisation.
    """

    def __init__(self, size: int, device: torch.device):
        self.first = torch.full((size,), -1, dtype=torch.long, device=device)
        self.points: list[tuple[int, float, str, str]] = []
        self.reads = 0

    @staticmethod
    def of(batch: Batch) -> NonFinite | None:
        """The batch's watch, when a plugin asked for finite checks (``run.request_finite_checks``)."""
        return batch.stash.get(NonFinite, lambda: None)

    def check(self, t: torch.Tensor, index: int, sigma: float, hook: str, plugin: str) -> None:
        self.points.append((index, sigma, hook, plugin))
        bad = ~torch.isfinite(t.detach()).flatten(1).all(1)
        self.first = torch.where(bad & (self.first < 0), len(self.points) - 1, self.first)

    def read(self) -> list[tuple[int, float, str, str] | None]:
        """Per sample: (step, σ, hook, plugin) of its first non-finite value, or None (one sync)."""
        self.reads += 1
        return [None if c < 0 else self.points[c] for c in self.first.tolist()]


#: How a hook's plugin is named in messages.
ROLE = {"predict": "model", "guidance": "guidance", "momentum": "momentum", "step": "solver",
        "before_step": "before_step plugin"}


def describe(point: tuple[int, float, str, str]) -> str:
    """'at step 2 (σ=3.1) after solver 'euler'' for a check point."""
    step, sigma, hook, plugin = point
    return f"at step {step} (σ={sigma:.4g}) after {ROLE.get(hook, hook)} '{plugin}'"


@dataclass
class Result:
    """What a run returns: initial noisy latents, final latents, decoded images (or None), record.

    Row ``r`` of the tensors is global sample ``indices[r]`` (all samples unless sharded).
    ``resumed`` lists the samples read back from the run folder instead of being generated;
    ``skipped`` is true when the whole run was already finished there. ``failures`` says why each
    failed sample failed (step, σ and plugin of its first non-finite value).
    """

    x_T: torch.Tensor
    latents: torch.Tensor
    images: torch.Tensor | None
    record: dict[str, Any]
    schedule: Schedule
    failed: list[int] = field(default_factory=list)  # global indices of failed samples (see failures)
    indices: list[int] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)
    skipped: bool = False
    failures: dict[int, str] = field(default_factory=dict)


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
        self.finite_checks = False
        self.output_dir: Path | None = None

    # declarations made in ``configure``
    def request_uncond(self) -> None:
        """Ask the model adapter to batch the unconditional (negative-prompt) pass."""
        self.needs_uncond = True

    def request_grad(self, plugin: object) -> None:
        """Run ``plugin``'s guidance hook with gradients enabled."""
        self._grad_plugins.add(id(plugin))

    def request_finite_checks(self) -> None:
        """Check every hook's output for NaN/Inf on the device (``NonFinite.of(batch)`` reads it)."""
        self.finite_checks = True

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
        if not self.needs_uncond:
            cond = Conditioning(prompts=prompts, tensors=self.model.encode_prompts(prompts))
        else:  # one text-encoder call for both, as diffusers' pipeline does
            negative = [self.settings.negative_prompt] * len(prompts)
            both = self.model.encode_prompts(prompts + negative)
            n = len(prompts)
            cond = Conditioning(prompts=prompts, tensors={k: v[:n] for k, v in both.items()},
                                negative_prompts=negative, uncond={k: v[n:] for k, v in both.items()})
        for name, fn in self.plugins.calls("conditioning"):
            cond = call(name, "conditioning", fn, run=self, cond=cond)
        return cond


class Denoiser:
    """``denoise(x, σ)`` as the solver sees it: predict → guidance, one NFE per evaluation."""

    def __init__(self, run: Run, batch: Batch):
        self.run, self.batch = run, batch
        self.state: SamplerState | None = None
        self._predict_name, self._predict = run.predict
        self.watch = NonFinite.of(batch)

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
        watch = self.watch
        if watch is not None:
            watch.check(pred.denoised, st.index, sigma, "predict", self._predict_name)
        for name, fn, grad in self.run.guidance:
            with torch.enable_grad() if grad else contextlib.nullcontext():
                pred = call(name, "guidance", fn, state=st, pred=pred)
            if watch is not None:
                watch.check(pred.denoised, st.index, sigma, "guidance", name)
        return pred


def sample_batch(
    run: Run, batch: Batch, schedule: Schedule, progress: Callable[[], object] = lambda: None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the loop for one batch; returns (x_T, x at the last σ). ``progress`` is called per step."""
    init = run.plugins.pm.hook.init_latents
    x = init(run=run, batch=batch, schedule=schedule, noise=batch.noise.draw())
    x_T = x
    watch = batch.stash.get(NonFinite, lambda: NonFinite(len(batch.indices), x.device)) if run.finite_checks else None
    denoiser = Denoiser(run, batch)
    step_name, step = run.step
    for i in range(schedule.steps):
        state = SamplerState(run=run, batch=batch, index=i, x=x, sigma=schedule.sigmas[i], schedule=schedule)
        denoiser.state = state
        for name, fn in run.before_step:
            call(name, "before_step", fn, state=state)
            if watch is not None:
                watch.check(state.x, i, state.sigma, "before_step", name)
        pred = state.guided = denoiser.evaluate(state.x, state.sigma)
        for name, fn in run.momentum:
            pred = call(name, "momentum", fn, state=state, pred=pred)
            if watch is not None:
                watch.check(pred.denoised, i, state.sigma, "momentum", name)
        state.pred, state.x = pred, pred.x
        x_next = call(step_name, "step", step, state=state, denoise=denoiser)
        if watch is not None:
            watch.check(x_next, i, state.sigma, "step", step_name)
        for name, fn in run.after_step:
            call(name, "after_step", fn, state=state, x_next=x_next)
        batch.history.append(
            StepRecord(i, state.sigma, state.sigma_next, state.x, state.guided.denoised, pred.denoised, x_next)
        )
        x = x_next
        progress()
    return x_T, x


def _batches(indices: range, size: int) -> list[list[int]]:
    return [list(indices[s : s + size]) for s in range(0, len(indices), size)]


def failures(batch: Batch) -> dict[int, str]:
    """Global index → why the sample failed, read once at the end of the batch (one sync)."""
    out: dict[int, str] = {}
    watch = NonFinite.of(batch)
    if watch is not None:
        for k, point in zip(batch.indices, watch.read()):
            if point is not None:
                out[k] = f"non-finite values {describe(point)}"
        flags = watch.first >= 0
        batch.failed = flags if batch.failed is None else batch.failed | flags
    if batch.failed is not None:  # plugins may mark samples failed themselves
        for k, bad in zip(batch.indices, batch.failed.tolist()):
            if bad:
                out.setdefault(k, "marked failed by a plugin")
    return dict(sorted(out.items()))


def execute(
    cfg: DictConfig,
    choices: dict[str, str] | None = None,
    model: object | None = None,
    output_dir: str | Path | None = None,
) -> Result:
    """Run one composed config end to end: build plugins, sample every batch, score, record.

    With a run folder (``output_dir``) every batch is saved as soon as it is made: its PNGs, then
    ``batches/{first:06d}.safetensors`` (latents + run key). With ``resume`` on (the default), a
    rerun into the same folder reads back the batches saved under the same run key instead of
    generating them, and a finished run (record.json with the same run key) is returned from disk
    without building anything. A ``model`` object passed in (which the run key cannot see) turns
    resuming off. Ctrl-C and SIGTERM stop the run between two writes, never half-way.
    """
    from framework.runs import records

    settings = read_settings(cfg)
    out = output_dir if output_dir is not None else settings.output_dir
    folder = Path(out) if out else None
    key = records.run_key(records.resolved_config(cfg)) if folder is not None else ""
    resume = settings.resume and model is None  # the run key cannot see a model object passed in
    if folder is not None and resume:
        done = records.load_finished(folder, key)
        if done is not None:
            return done
        records.remove_temporaries(folder)
    device = resolve_device(settings.device)
    plugins = build_plugins(cfg, choices or {}, model)
    run = Run(cfg, settings, plugins, device)
    run.output_dir = folder
    run.model.setup(device, run.dtype)
    run.model.prepare_network(compile=settings.compile, mode=settings.compile_mode, channels_last=settings.channels_last)
    for name, fn in plugins.calls("configure"):
        call(name, "configure", fn, run=run)
    run.prepare()
    sched_name, sched_fn = plugins.one("schedule")
    schedule = call(sched_name, "schedule", sched_fn, model=run.model, steps=settings.steps)
    for name, fn in plugins.calls("adjust_schedule"):
        schedule = call(name, "adjust_schedule", fn, run=run, schedule=schedule)
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"the schedule plugins returned {type(schedule).__name__}, not a Schedule")
    run.model.prepare_schedule(schedule)
    for name, fn in plugins.calls("run_start"):
        call(name, "run_start", fn, run=run)

    xs_T, xs, imgs, nfes, calls = [], [], [], [], []
    failed: dict[int, str] = {}
    resumed: list[int] = []
    finished: list[int] = []  # sizes of the batches done (saved, when there is a run folder)
    indices = settings.indices()
    batches = _batches(indices, settings.batch_size)
    bar = tqdm(total=len(batches) * schedule.steps, desc="sampling", unit="step", disable=None, leave=False)
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), bar, sigterm_as_interrupt():
            for ks in batches:
                prompts = [settings.prompts[k % len(settings.prompts)] for k in ks]
                until = 2 * schedule.sigmas[0] + 1 if settings.noise == "brownian" else None  # room for churn
                noise = SampleNoise(settings.seed, ks, run.model.latent_shape, device, run.dtype, until)
                batch = Batch(indices=ks, cond=run.encode(prompts), noise=noise)
                saved = records.load_batch(folder, key, ks) if folder is not None and resume else None
                if saved is None:
                    x_T, x = sample_batch(run, batch, schedule, bar.update)
                    bad = failures(batch)
                else:
                    x_T, x = saved.x_T.to(device, run.dtype), saved.latents.to(device, run.dtype)
                    batch.nfe, batch.unet_calls, bad = saved.nfe, saved.unet_calls, saved.failures
                    batch.failed = torch.tensor([k in bad for k in ks], device=device)
                    resumed += ks
                    bar.update(schedule.steps)
                batch.failure = list(bad.values())
                latents = run.model.output_latents(x, schedule.sigmas[-1])
                images = run.model.decode(latents)
                pngs = images if settings.save_images else None
                if folder is not None and saved is None:
                    records.save_batch(folder, key, ks, x_T, x, pngs, bad, batch.nfe, batch.unet_calls)
                elif folder is not None and pngs is not None:  # resumed: restore PNGs removed since
                    records.save_samples(folder, ks, pngs, bad, only_missing=True)
                finished.append(len(ks))
                failed.update(bad)
                for name, fn in plugins.calls("batch_end"):
                    call(name, "batch_end", fn, run=run, batch=batch, latents=latents, images=images)
                xs_T.append(x_T)
                xs.append(x)
                imgs.append(images)
                nfes.append(batch.nfe)
                calls.append(batch.unet_calls)
    except KeyboardInterrupt:
        where = f"{sum(finished)} samples saved in {folder}: rerun the same command to resume" if folder else "no run folder"
        print(f"samplerlab: interrupted after {len(finished)} of {len(batches)} batches; {where}", file=sys.stderr)
        raise
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0

    x_T, x = torch.cat(xs_T), torch.cat(xs)
    images = None if imgs[0] is None else torch.cat(imgs)
    run.metrics.update(
        nfe=sum(nfes) / len(nfes),
        unet_calls=sum(calls) / len(calls),
        seconds=seconds,
        seconds_per_sample=seconds / len(indices),
    )
    exact = run.model.exact_solution(x_T, schedule.sigmas[0], schedule.sigmas[-1])
    if exact is not None:
        run.metrics["rmse_to_reference"] = float((x - exact).double().pow(2).mean().sqrt())
    result = Result(x_T=x_T, latents=x, images=images, record={}, schedule=schedule, failed=list(failed),
                    indices=list(indices), resumed=resumed, failures=failed)
    for name, fn in plugins.calls("run_end"):
        call(name, "run_end", fn, run=run, result=result)
    result.record = records.build(run, result)
    if folder is not None:
        records.save(folder, result, save_images=settings.save_images, samples_written=True)
    return result
