"""Every PEFT method, one file each, registered here under its one name.

Each is a `base.Method` (the contract, stated once in `base.py`); its module exposes the contract
as plain functions (`lora.apply`, `lora.save`, ...). The calculator, the study, the benchmarks,
interop and the exercises name methods by these keys.
"""

from __future__ import annotations

import os

from torch import nn

from pefttutor import checkpoint

from . import adapters, dora, ia3, llama_adapter, lora, prefix_tuning, prompt_tuning, qlora
from .base import Method, applied

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (
    prompt_tuning, prefix_tuning, adapters, llama_adapter, lora, dora, ia3, qlora)}


def get(name: str) -> Method:
    """The method registered as `name`; ValueError listing the valid names."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load any method's adapter file into `model`: the file names its method."""
    header, tensors = checkpoint.read(path)
    return get(header["method"])._load(model, path, header, tensors)


__all__ = ["METHODS", "Method", "adapters", "applied", "dora", "get", "ia3", "llama_adapter", "load", "lora",
           "prefix_tuning", "prompt_tuning", "qlora"]
