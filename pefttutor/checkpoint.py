"""Adapter files: atomic safetensors writes, a checked header, strict loading.

An adapter file is one safetensors file: the method's tensors under the model's own keys, and a
JSON header (metadata key "pefttutor") naming the method, its config and the base model's
identity (`pefttutor.methods.base`). `load_strict` copies a file's tensors into a model only when
the keys and shapes match exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

HEADER = "pefttutor"  # the safetensors metadata key of the JSON header
_FIELDS = ("method", "config", "base")


def temporary_path(path: Path) -> Path:
    """A hidden sibling of `path` to write first and then os.replace: readers never see half a file."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, header: dict[str, Any]) -> None:
    """Write `tensors` and `header` (as JSON) atomically: a temporary file, then os.replace."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt", HEADER: json.dumps(header)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a file written by `save`; ValueError naming the file for anything else."""
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(HEADER)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    if raw is None:
        raise ValueError(f"{path} is not a pefttutor adapter file (no {HEADER!r} header in its metadata)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: its {HEADER!r} header is not valid JSON ({error})") from None
    if not isinstance(header, dict) or any(k not in header for k in _FIELDS):
        raise ValueError(f"{path}: its {HEADER!r} header must be a JSON object with {list(_FIELDS)}")
    return header, tensors


def _names(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(own: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy `tensors` into the model tensors `own` (by key, with `prefix` in front of own's keys).

    Any missing, unexpected or wrongly shaped key raises ValueError naming it; nothing is copied then.
    """
    own = {prefix + k: v for k, v in own.items()}
    missing = sorted(own.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - own.keys())
    wrong = [
        f"{k} (file {tuple(tensors[k].shape)}, model {tuple(own[k].shape)})"
        for k in sorted(own.keys() & tensors.keys())
        if tensors[k].shape != own[k].shape
    ]
    problems = [f"{what}: {_names(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    if problems:
        raise ValueError("adapter does not fit this model; " + "; ".join(problems))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])
