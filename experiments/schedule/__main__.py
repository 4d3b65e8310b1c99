"""Noise schedules and noising: σ and model timesteps of every schedule plugin at several step counts
(one plot), and an image noised at chosen steps of the run's grid with the model's x₀ prediction.

    python -m experiments.schedule                  # docs/deep_dive/schedule_*.png, schedule.json
    python -m experiments.schedule fast=true out=/tmp/dd
    python -m experiments.schedule model=sd15 model.path=/path/to/sd15 schedule=normal steps=30 out=/tmp/sd

Every schedule is the plugin itself (conf/schedule/<name>.yaml, or an installed distribution's)
called through its ``schedule(model, steps)`` hook on the run's model; the plugin chosen for the
run (``schedule=…``, default karras) takes the user's parameter overrides.
"""
from __future__ import annotations

from pathlib import Path

import torch

from experiments.harness import (Experiment, entry, instantiate, load_run, pyplot, require_vae, save_figure, schedule_plugins,
                                 show, world_scenes)
from framework.entry.compose import compose
from framework.plugin import ConfigError, pixel_size

HERE = Path(__file__).resolve().parent


def schedule_node(name: str):
    """The config node of schedule plugin ``name`` with its defaults (built in or installed)."""
    return compose([f"schedule={name}"])[0].schedule


def grids(model, plugins: dict[str, object], step_counts: list[int]) -> tuple[dict, dict]:
    """{schedule: {steps: {sigmas, timesteps}}} and {schedule: reason} for those that refuse a count."""
    table: dict[str, dict[int, dict]] = {}
    skipped: dict[str, str] = {}
    for name, plugin in plugins.items():
        for n in step_counts:
            try:
                sched = plugin.schedule(model=model, steps=n)
            except ConfigError as e:
                skipped[f"{name}@{n}"] = str(e)
                continue
            ts = [model.timestep_of(s, sched.timestep(s)) if s > 0 else None for s in sched.sigmas]
            table.setdefault(name, {})[n] = {"sigmas": list(sched.sigmas), "timesteps": ts,
                                             "init_noise_scale": sched.init_noise_scale}
    return table, skipped


def grid_figure(table: dict, step_counts: list[int], model_name: str, path: Path, files: list[str]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(step_counts), 2, figsize=(10, 2.6 * len(step_counts) + 0.6), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for r, n in enumerate(step_counts):
        for k, (name, row) in enumerate(table.items()):
            if n not in row:
                continue
            style = dict(color=cmap(k % 20), marker=".", markersize=4, linewidth=1, linestyle="-" if k < 10 else "--", label=name)
            sig = [s for s in row[n]["sigmas"] if s > 0]
            axes[r, 0].semilogy(range(len(sig)), sig, **style)
            ts = [t for t in row[n]["timesteps"] if t is not None]
            axes[r, 1].plot(range(len(ts)), ts, **style)
        axes[r, 0].set_ylabel(f"{n} steps\nσ_i (log; final 0 not drawn)", fontsize=8)
        axes[r, 1].set_ylabel("model timestep t_i", fontsize=8)
        for ax in axes[r]:
            ax.grid(True, which="both", alpha=0.3)
            ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step index i", fontsize=8)
    axes[0, 1].legend(fontsize=6, ncol=2, loc="upper right")
    fig.suptitle(f"σ grids and timesteps of every schedule plugin on {model_name}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, files)


def noising_figure(model, schedule, steps: list[int], seed: int, path: Path, files: list[str]) -> list[dict]:
    """A world scene encoded, noised to σ_i of the run's grid, decoded as a pipeline would; below,
    the model's prediction of x₀ from it (conditioned on the scene's caption, no CFG: one call each)."""
    plt = pyplot()
    size = pixel_size(model)
    image, captions = world_scenes(1, seed, size)
    z = model.encode_images(image)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
    cond = model.encode_prompts(captions)
    picks = [i for i in steps if 0 <= i < schedule.steps] + [schedule.steps]
    fig, axes = plt.subplots(2, len(picks) + 1, figsize=(1.5 * (len(picks) + 1), 3.9), squeeze=False)
    show(axes[0, 0], image[0], "clean image")
    show(axes[1, 0], model.decode(z)[0].cpu(), "decode(encode)")
    axes[0, 0].set_ylabel("x_σ = z + σ·ε\n(decoded)", fontsize=7)
    axes[1, 0].set_ylabel("model's x̂₀\nD(x_σ, σ)", fontsize=7)
    rows = []
    for j, i in enumerate(picks, start=1):
        sigma = schedule.sigmas[i]
        x = z + sigma * eps
        t = schedule.timestep(sigma)
        show(axes[0, j], model.decode(model.output_latents(x, sigma))[0].cpu(),
             f"step {i}\nσ={sigma:.3g}" + (f", t={model.timestep_of(sigma, t):.0f}" if sigma > 0 else ""))
        if sigma > 0:
            d = model.denoise_batch(x, sigma, t, cond)
            show(axes[1, j], model.decode(d)[0].cpu())
            rows.append({"step": i, "sigma": sigma, "timestep": model.timestep_of(sigma, t),
                         "x0_rmse_latent": float((d - z).pow(2).mean().sqrt())})
        else:
            axes[1, j].axis("off")
    fig.suptitle(f"noising “{captions[0]}” along the run's grid ({schedule.steps} steps)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, files)
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment with Hydra-style overrides; returns its record (also written to ``out``)."""
    ex = Experiment.compose(HERE, argv, passthrough=True)
    cfg = ex.cfg
    loaded = load_run(ex.run_overrides())
    run_cfg, choices, model = loaded.cfg, loaded.choices, loaded.model
    require_vae(model, "experiments.schedule")
    if run_cfg.get("schedule") is None:
        raise ConfigError("experiments.schedule needs a schedule plugin (a solver that owns its grid has none to show)")
    chosen = choices.get("schedule", "")
    names = schedule_plugins() if cfg.schedules == "all" else list(cfg.schedules)
    plugins = {name: instantiate(run_cfg.schedule if name == chosen else schedule_node(name), f"schedule={name}")
               for name in names}
    step_counts = [int(n) for n in cfg.step_counts]
    out = Path(cfg.out)
    files: list[str] = []
    with torch.no_grad():
        table, skipped = grids(model, plugins, step_counts)
        model_name = choices.get("model", "model")
        grid_figure(table, step_counts, model_name, out / "schedule_sigmas.png", files)
        run_schedule = instantiate(run_cfg.schedule, f"schedule={chosen}").schedule(model=model, steps=loaded.steps)
        noised = noising_figure(model, run_schedule, [int(i) for i in cfg.noised_steps], cfg.seed,
                                out / "schedule_noising.png", files)
    results = {"schedules": table, "skipped": skipped, "run_schedule": chosen, "run_steps": loaded.steps, "noised": noised}
    return ex.record(out / "schedule.json", results, files)


if __name__ == "__main__":
    entry(main)
