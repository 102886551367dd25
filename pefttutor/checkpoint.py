"""Adapter files: atomic safetensors writes, a checked header, strict loading.

An adapter file is one safetensors file: the method's tensors under the model's own keys, and a
JSON header (metadata key "pefttutor") naming the method, its config and the base model's
identity (`pefttutor.methods.base`). `load_strict` copies a file's tensors into a model only when
the keys, shapes and kinds of dtype match exactly.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

HEADER = "pefttutor"  # the safetensors metadata key of the JSON header
_FIELDS = ("method", "config", "base")
# What open() found wrong, in words: safetensors says "No such device" for a directory.
_PROBLEMS = {FileNotFoundError: "does not exist", IsADirectoryError: "is a directory, not a safetensors file",
             PermissionError: "is not readable (permission denied)"}


def temporary_path(path: Path) -> Path:
    """A hidden sibling of `path`, new on every call, so that threads and processes saving the same
    path never share one: write it, then os.replace it onto `path`; readers never see half a file."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, header: dict[str, Any]) -> None:
    """Write `tensors` and `header` (as JSON) atomically: a temporary file, then os.replace.

    The file is written by a plain open(), so its mode is 0666 less the umask, like any other file
    (safetensors' own save_file makes it 0600).
    """
    write_atomic(path, serialize({k: v.detach().contiguous() for k, v in tensors.items()},
                                 metadata={"format": "pt", HEADER: json.dumps(header)}))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling and os.replace: never half a file."""
    tmp = temporary_path(Path(path))
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file.

    The OSError open() raises, saying what is wrong with the path (does not exist, is a directory,
    is not readable); ValueError naming the file when it is not safetensors.
    """
    try:
        open(path, "rb").close()
    except OSError as error:
        raise type(error)(error.errno, f"{path} {_PROBLEMS.get(type(error), error.strerror)}") from None
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a file written by `save`; ValueError naming the file for anything else
    (OSError, as `read_file`, for a path that is not a readable file)."""
    metadata, tensors = read_file(path)
    raw = metadata.get(HEADER)
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


def _fits(file: torch.Tensor, model: torch.Tensor) -> bool:
    # A float converts to any float dtype (an fp32 file into a bf16 model); anything else must match
    # exactly, or copy_ would silently turn an int64 file into floats.
    return file.dtype == model.dtype or (file.is_floating_point() and model.is_floating_point())


def load_strict(own: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy `tensors` into the model tensors `own` (by key, with `prefix` in front of own's keys).

    Any missing, unexpected, wrongly shaped or wrongly typed key (`_fits`) raises ValueError naming
    it; nothing is copied then.
    """
    own = {prefix + k: v for k, v in own.items()}
    missing = sorted(own.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - own.keys())
    common = sorted(own.keys() & tensors.keys())
    wrong = [f"{k} (file {tuple(tensors[k].shape)}, model {tuple(own[k].shape)})"
             for k in common if tensors[k].shape != own[k].shape]
    dtypes = [f"{k} (file {tensors[k].dtype}, model {own[k].dtype})" for k in common if not _fits(tensors[k], own[k])]
    problems = [f"{what}: {_names(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong),
                 ("wrong dtypes", dtypes)) if keys]
    if problems:
        raise ValueError("adapter does not fit this model; " + "; ".join(problems))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])
