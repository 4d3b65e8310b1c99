"""Metrics plugins: prompt accuracy under the bundled judge."""
from __future__ import annotations

import pytest

from framework.api import run
from framework.errors import ConfigError
from plugins.metrics.prompt_accuracy import first_word

PROMPTS = "prompts=[a red circle,a blue square,a green triangle,a yellow diamond]"


def test_first_word():
    assert first_word("a small Red circle above a blue square", ("red", "blue")) == "red"
    assert first_word("a circle", ("red",)) is None


def test_prompt_accuracy_on_bundled_model():
    guided = run(["metrics=[prompt_accuracy]", "num_samples=8", "batch_size=4", PROMPTS, "cfg_scale=5.0"]).record["metrics"]
    assert guided["prompt_accuracy_colour_n"] == 8 and guided["prompt_accuracy_shape_n"] == 8
    # measured 0.75 (v0 model, 20 euler steps); chance is 1/8
    assert guided["prompt_accuracy_colour"] >= 0.5
    weak = run(["metrics=[prompt_accuracy]", "num_samples=8", "batch_size=4", PROMPTS, "cfg_scale=1.0"]).record["metrics"]
    assert guided["prompt_accuracy_colour"] > weak["prompt_accuracy_colour"]  # measured 0.25 without guidance


def test_prompt_accuracy_needs_images():
    with pytest.raises(ConfigError, match="no decoder"):
        run(["model=gaussian", "metrics=[prompt_accuracy]"])
