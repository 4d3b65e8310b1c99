"""A user's loss as a guidance plugin: ``fn`` names a plain Python function 'package.module:name'
with the signature ``fn(images, **kwargs) -> per-sample loss`` (images [n, 3, H, W] in [0, 1],
differentiable; the result has shape [n]); ``kwargs`` are passed on. Applied by
framework.bases.loss_guidance with all its options::

    samplerlab 'guidance=[cfg,user_loss]' guidance.user_loss.fn=mypkg.losses:warm \\
        +guidance.user_loss.kwargs.strength=2

``fn`` runs the user's code, as any plugin does: name only functions you trust (a config's
``_target_`` is limited to plugin classes; ``fn`` is the one key that names arbitrary code).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from framework.plugin import ConfigError, LossGuidance


def resolve(spec: str):
    """The callable named by 'package.module:name'."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"user_loss.fn must be 'package.module:function', got '{spec}'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"user_loss.fn '{spec}' cannot be imported ({e}): check the module is on sys.path") from e
    if not callable(fn):
        raise ConfigError(f"user_loss.fn '{spec}' is not callable")
    return fn


@dataclass
class UserLoss(LossGuidance):
    fn: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)

    def setup(self, run) -> None:
        resolve(self.fn)  # fail before sampling

    def loss(self, images, context):
        return resolve(self.fn)(images, **self.kwargs)  # an import-cache lookup
