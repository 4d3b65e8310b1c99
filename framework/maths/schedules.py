"""What schedule plugins share: a Schedule from the positive part of a grid, the init_noise option."""
from __future__ import annotations

import numpy as np

from framework.core.errors import ConfigError
from framework.core.state import Schedule
from framework.maths.sigmas import INIT_NOISE_MODES, init_noise_scale


def finish(body: np.ndarray | list[float], final_zero: bool, init_noise: str) -> Schedule:
    """A Schedule from the positive part of a grid: optional final 0, initial noise scale."""
    grid = tuple(float(s) for s in body) + ((0.0,) if final_zero else ())
    return Schedule(grid, None, init_noise_scale(grid[0], init_noise))


def check_init_noise(init_noise: str) -> None:
    if init_noise not in INIT_NOISE_MODES:
        raise ConfigError(f"schedule.init_noise must be one of {', '.join(INIT_NOISE_MODES)}, got '{init_noise}'")
