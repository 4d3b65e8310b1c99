"""Scalar functions of σ values that are Python floats in the eager loop and 0-d device tensors
inside a captured step (``compile=step``, :mod:`framework.core.graphstep`): ``math`` for floats
(the eager results are unchanged), ``torch`` for tensors (no host read)."""
from __future__ import annotations

import math
from typing import TypeVar

import torch

S = TypeVar("S", float, torch.Tensor)


def log(v: S) -> S:
    return torch.log(v) if isinstance(v, torch.Tensor) else math.log(v)


def expm1(v: S) -> S:
    return torch.expm1(v) if isinstance(v, torch.Tensor) else math.expm1(v)

