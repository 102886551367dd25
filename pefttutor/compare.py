"""Comparing methods side by side: a results cache keyed by configuration, and the measurements
every method gets (inference latency, adapter file size, mean and spread over seeds).

    row = compare.cached({"model": "minilm", "method": "lora", "r": 8, "seed": 0}, run_lora)

`run_lora()` runs only when no result for exactly this configuration is stored under
`<cache_dir>/results/`; its JSON-able dict is stored and returned. Re-executing a notebook then
takes seconds. `PEFTTUTOR_RECOMPUTE=1` ignores stored results (and replaces them).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .config import cache_dir, env_flag


def results_dir() -> Path:
    return cache_dir() / "results"


def key_of(config: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-able configuration (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached(config: Mapping[str, Any], run: Callable[[], dict[str, Any]], folder: Path | None = None) -> dict[str, Any]:
    """`run()`'s result for `config`, computed once and then read from `folder` (default `results_dir()`)."""
    folder = Path(folder) if folder is not None else results_dir()
    path = folder / f"{key_of(config)}.json"
    config = json.loads(json.dumps(config, sort_keys=True, default=str))  # as it reads back from JSON
    if path.exists() and not env_flag("PEFTTUTOR_RECOMPUTE"):
        stored = json.loads(path.read_text())
        if stored["config"] == config:  # a hash collision would not pass this
            return stored["result"]
    result = run()
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(path, json.dumps({"config": config, "result": result}, indent=1, sort_keys=True).encode())
    return result


@torch.no_grad()
def latency_ms(model: nn.Module, batch: Mapping[str, torch.Tensor], repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median, min and max milliseconds of one eval-mode forward pass on `batch` (after warm-up)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
    model.train(was_training)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def file_bytes(save: Callable[[nn.Module, Path], Any], model: nn.Module) -> int:
    """Size on disk of what `save(model, path)` writes (a method's adapter file), in bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        save(model, path)
        return path.stat().st_size


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another: fewer (x) or equal parameters with a higher (y) metric.
    Sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
