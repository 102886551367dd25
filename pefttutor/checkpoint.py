"""Adapter files shared by every PEFT method: strict loading and atomic safetensors writes.

A method's adapter is a dict of named tensors (its own parameters, plus any `train` modules) and a
JSON config. `save` writes both into one safetensors file under the method's metadata key;
`load_strict` copies a file's tensors into a model only when the keys and shapes match exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .params import find_modules

C = TypeVar("C")  # a method's config dataclass


def temporary_path(path: Path) -> Path:
    """A hidden sibling of `path` to write first and then os.replace: readers never see half a file."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, key: str, config: dict[str, Any]) -> None:
    """Write `tensors` and `config` (as JSON under metadata `key`) atomically: temp file, then os.replace."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt", key: json.dumps(config)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read(path: str | os.PathLike, key: str, what: str, config_class: type[C]) -> tuple[C, dict[str, torch.Tensor]]:
    """(config, tensors) of a file written by `save` under `key`, the config rebuilt as `config_class`
    (a dataclass; JSON lists become tuples). ValueError naming `what` for any other file."""
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(key)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if raw is None:
        raise ValueError(f"{path} is not a pefttutor {what} file (no {key!r} config in its header)")
    config = json.loads(raw)
    unknown = sorted(config.keys() - {f.name for f in fields(config_class)})
    if unknown:
        raise ValueError(f"{path}: unknown {what} settings {unknown} (written by another pefttutor version?)")
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}), tensors


def attached_config(model: torch.nn.Module, attr: str, config_class: type[C], missing: str) -> C:
    """The config a method's `apply` recorded on the model as `attr`; ValueError(`missing`) if none."""
    config = getattr(model, attr, None)
    if not isinstance(config, config_class):
        raise ValueError(missing)
    return config


def require_same(config: Any, saved: Any, names: tuple[str, ...], path: str | os.PathLike, what: str) -> None:
    """Refuse a file whose settings `names` differ from the model's: ValueError listing each difference."""
    diff = [f"{k}: model {getattr(config, k)!r}, file {getattr(saved, k)!r}"
            for k in names if getattr(config, k) != getattr(saved, k)]
    if diff:
        raise ValueError(f"{what} config mismatch with {path}: " + "; ".join(diff))


def module_state(model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The state_dict entries of the modules whose paths end with `names`, under the model's own keys
    (e.g. `classifier.weight`); detached, sharing memory with the model. Unknown names raise ValueError."""
    if not names:
        return {}
    state = {}
    for path, module in find_modules(model, names, torch.nn.Module).items():
        state.update({f"{path}.{k}": v.detach() for k, v in module.state_dict().items()})
    return state


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
