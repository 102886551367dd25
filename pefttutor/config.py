"""Run-wide settings: fast vs full mode, seeding, device and cache locations.

`PEFTTUTOR_FAST=1` (set by `make test`) shrinks data and steps so every notebook runs in about a
minute; full mode, the default, produces the results the committed notebooks show.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def env_flag(name: str) -> bool:
    """Whether the environment variable `name` is set to a true value (1/true/yes, any case)."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


def is_fast() -> bool:
    """True when `PEFTTUTOR_FAST` is set to a true value (1/true/yes)."""
    return env_flag("PEFTTUTOR_FAST")


def full_or_fast(full: T, fast: T) -> T:
    """Pick a setting by mode: `steps = full_or_fast(300, 20)`."""
    return fast if is_fast() else full


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_device(prefer: str | None = None) -> torch.device:
    """`PEFTTUTOR_DEVICE` or `prefer` if given, else CUDA when present, else CPU."""
    name = prefer or os.environ.get("PEFTTUTOR_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir() -> Path:
    """Where converted weights live: `PEFTTUTOR_CACHE` (`~` expanded; empty is unset), else `~/.cache/pefttutor`."""
    value = os.environ.get("PEFTTUTOR_CACHE", "")
    path = Path(value).expanduser() if value.strip() else Path.home() / ".cache" / "pefttutor"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # OSError(errno, ...) keeps the subclass: PermissionError, FileExistsError, ...
        raise OSError(e.errno, f"cannot create the cache folder {path} ({e.strerror}): set PEFTTUTOR_CACHE "
                               f"to a writable folder") from e
    return path


def repo_root() -> Path:
    """The checkout's top folder (holds `data/`, `notebooks/`, `figures/`)."""
    return Path(__file__).resolve().parent.parent
