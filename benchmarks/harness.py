"""The measuring harness: interleaved timing, peak tensor memory, and the machine a run was on.

Peak memory of a training step = the model's tensors + the optimizer state + the peak growth of
allocated tensor memory during one step (gradients, activations, temporaries). The growth is the
allocator's own accounting: `torch.cuda.max_memory_allocated` on CUDA; on CPU the torch profiler's
allocation events (every c10 CPU allocation and free, summed in order), which is exact for torch
tensors and, unlike process RSS, does not depend on what the process freed earlier.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def log(msg: str) -> None:
    print(msg, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device,
                min_seconds: float = 0.0, max_repeats: int = 50) -> dict[str, list[float]]:
    """Seconds per call of each fn: `warmup` untimed calls each, then timed rounds in which every fn
    runs once, the order reversed every other round (A B, B A, ...): `repeats` rounds, and more
    (up to `max_repeats`) until the rounds took `min_seconds`, so that fast calls get enough samples."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()  # as timeit does: a collection pause would land on whichever call happens to run then
    start, r = time.perf_counter(), 0
    try:
        while r < repeats or (time.perf_counter() - start < min_seconds and r < max_repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                fns[name]()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
            r += 1
    finally:
        gc.enable()
    return times


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages (tied weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def _stderr_silenced():
    """Point file descriptor 2 at /dev/null: the profiler's C++ side prints a line at start and stop."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def step_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak growth of allocated tensor memory while fn runs (allocations minus frees, in order)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # stable: same-time events keep their order
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def machine(device: torch.device) -> dict[str, str | int]:
    """What a run ran on (RESULTS.md names it): CPU, cores, torch threads, library versions, device, date."""
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "device": str(device),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info

