"""One training loop for every method.

A method only decides which parameters are trainable (see `pefttutor.methods`); this loop then
optimizes exactly those with AdamW, linear warmup then cosine decay, gradient clipping and
periodic evaluation, and measures what the notebooks compare: parameters, time, memory, metrics.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import env_flag, get_device, seed_everything
from . import checks, distributed as dist_
from .params import count_parameters

Batch = dict[str, torch.Tensor]


@dataclass
class TrainResult:
    """What one training run measured. `metrics` are the last evaluation's."""

    trainable_params: int
    total_params: int
    steps: int
    wall_time_s: float
    median_step_s: float
    peak_memory_mb: float
    metrics: dict[str, float] = field(default_factory=dict)
    loss_curve: list[float] = field(default_factory=list)
    eval_curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    allreduce_bytes_per_step: float | None = None  # gradient bytes DDP all-reduced per step (DDP only)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.total_params

    def summary(self) -> dict[str, Any]:
        """A flat, rounded record for a results table."""
        return {
            "trainable": self.trainable_params,
            "trainable %": round(self.trainable_pct, 4),
            "time (s)": round(self.wall_time_s, 1),
            "step (ms)": round(1000 * self.median_step_s, 1),
            "peak mem (MB)": round(self.peak_memory_mb, 1),
            **{k: round(v, 4) for k, v in self.metrics.items()},
        }


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear 0 -> 1 over `warmup` steps, then cosine 1 -> 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def release_freed_memory() -> None:
    """Return memory the process has freed to the OS, so RSS growth counts new allocations (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): growth may then undercount
        pass


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak on GPU, else peak RSS growth of the process.

    CPU tensors are not tracked by torch, so on CPU a thread samples the resident set size every
    few milliseconds; the result is the peak increase over the RSS at entry (in MB). Memory the
    process freed earlier would be reused without showing as growth, so on entry freed memory is
    handed back to the OS first (`gc.collect()` and glibc's `malloc_trim(0)`; measured: MiniLM full
    finetuning then LoRA read 972 then 0 MB without it, 981 then 607 MB with it). Still a lower bound
    on CPU (allocator caches, sampling interval).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval_s, self.peak_mb = device, interval_s, 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            self._proc = psutil.Process()
            self._start = self._peak = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = (peak - self._start) / 2**20


AUTOCAST = {None: torch.float32, "bf16": torch.bfloat16}  # train(autocast=...) -> the autocast dtype
AUTO = "auto"  # train(autocast="auto"): "bf16" where the device computes it natively, else None


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run on native kernels: a CUDA GPU with bf16, or a CPU that oneDNN runs bf16
    on (AVX-512 or AMX). Elsewhere PyTorch falls back to a reference gemm: on an AVX2-only AMD EPYC,
    a 512 x 576 @ 576 x 1536 matmul took 771 ms in bf16 against 17 ms in fp32 (one thread)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_autocast(device: torch.device | str, autocast: str | None) -> str | None:
    """The autocast `train` uses: "auto" becomes "bf16" where `native_bf16`, else None; others as given."""
    if autocast == AUTO:
        return "bf16" if native_bf16(device) else None
    if autocast not in AUTOCAST:
        raise ValueError(f"autocast must be one of {sorted(AUTOCAST, key=str) + [AUTO]}, got {autocast!r}")
    return autocast


def _fused(params: list[nn.Parameter]) -> dict[str, bool]:
    """AdamW's fused kernel (one op for every tensor) where torch has it for these parameters:
    float CPU or CUDA tensors (torch >= 2.4 on CPU). The same update as the default per-tensor loop,
    up to float rounding (tested)."""
    ok = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
             for p in params)
    return {"fused": True} if ok and "fused" in inspect.signature(torch.optim.AdamW).parameters else {}


def autocast_context(device: torch.device | str, autocast: str | None):
    """`torch.autocast` for `train(autocast=...)` ("bf16"), or a no-op context for None."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST[autocast])


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _cycle(batches: Callable[[int], Iterable[Batch]] | Iterable[Batch]) -> Iterator[Batch]:
    """Endless batches; a callable is called with the epoch number (to reshuffle each epoch)."""
    epoch = seen = 0
    while True:
        empty = True
        for batch in batches(epoch) if callable(batches) else batches:
            empty = False
            seen += 1
            yield batch
        if empty and seen:  # a generator is used up after one pass: the second epoch finds nothing
            raise ValueError(f"the batches ran out after {seen}: epoch {epoch} produced none (a generator or "
                             "iterator is used up after one pass); pass a list, or a function of the epoch")
        if empty:
            raise ValueError("the training data produced no batches")
        epoch += 1


@contextlib.contextmanager
def _left_clean(model: nn.Module, optimizer: torch.optim.Optimizer, bar) -> Iterator[None]:
    """However the loop ends (done, an error, Ctrl-C): the bar closed, the model in eval mode, no gradients held."""
    try:
        yield
    finally:
        bar.close()
        model.eval()
        optimizer.zero_grad(set_to_none=True)


def _check_finite(step: int, loss: float, grad_norm: torch.Tensor, lr: float, clip: float | None) -> None:
    """Stop at the first non-finite loss or gradient norm, before its update: one NaN step would make
    every trained weight NaN, and training would go on (and save) without a sign."""
    if math.isfinite(loss) and torch.isfinite(grad_norm):
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm.item()}"
    raise FloatingPointError(f"{what} at step {step}: training stopped before that step's update, so the weights "
                             f"are as they were before it. Try a lower lr (this run: {lr:g})"
                             + (", or clip=1.0" if clip is None else ""))


def _check_arguments(steps, lr, weight_decay, warmup, clip, evaluate, eval_every, seed, should_stop) -> None:
    """Refuse what would train wrongly without an error: clip=0 freezes, clip<0 ascends, warmup=2.5 rounds."""
    checks.positive_int(steps, "steps")
    checks.number(lr, "lr", low=0, low_open=True)
    checks.number(weight_decay, "weight_decay", low=0)
    checks.number(warmup, "warmup", low=0)
    if warmup >= 1 and (warmup != int(warmup) or warmup > steps):
        raise ValueError(f"warmup >= 1 is a number of steps, whole and at most steps={steps}, got {warmup!r} "
                         "(below 1 it is a fraction of steps)")
    if clip is not None:
        checks.number(clip, "clip (None: no clipping)", low=0, low_open=True)
    if eval_every is not None:
        checks.positive_int(eval_every, "eval_every")
    checks.count(seed, "seed")
    if eval_every is not None and evaluate is None:
        raise ValueError("eval_every needs evaluate: there is nothing to run every eval_every steps")
    if should_stop is not None and eval_every is None:
        raise ValueError("should_stop is asked after each periodic evaluation: pass evaluate and eval_every too")


def train(
    model: nn.Module,
    batches: Callable[[int], Iterable[Batch]] | Iterable[Batch],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: float = 0.1,
    clip: float | None = 1.0,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    autocast: str | None = None,
    should_stop: Callable[[list[tuple[int, dict[str, float]]]], bool] | None = None,
    distributed: dist_.Strategy | str | None = None,
) -> TrainResult:
    """Train the parameters of `model` that require grad, for `steps` optimizer steps.

    batches:  an iterable of batch dicts, or `f(epoch) -> iterable` to reshuffle every epoch.
    loss_fn:  `loss_fn(model, batch) -> scalar loss`, so one loop serves classifiers and LMs.
    warmup:   fraction of `steps` (if < 1) or a number of steps of linear LR warmup.
    evaluate: `evaluate(model) -> {"metric": value}`, run in eval mode under no_grad every
              `eval_every` steps and at the end.
    autocast: "bf16" runs the forward pass and loss under `torch.autocast` in bfloat16 (CPU and
              CUDA); weights, gradients and optimizer states stay in their dtype. None: no autocast.
              "auto": "bf16" where the device has native bf16 kernels (`native_bf16`), else None.
    should_stop: `should_stop(eval_curve) -> bool`, asked after each periodic evaluation; True ends
              training there (early stopping). The result's `steps` is the number actually run, and
              no extra final evaluation is made.
    distributed: "ddp" or "fsdp" (or a `distributed.Strategy`), in every process of a torchrun
              launch: each process trains on its rows of every batch, gradients are averaged, the
              loss curve is the processes' average. `batches` are the global batches, the same in
              every process; `evaluate` runs in every process. See `pefttutor.distributed`.

    A non-finite loss or gradient norm stops training with FloatingPointError before that step's
    update. However training ends (an error, Ctrl-C), the model is left in eval mode without gradients.
    """
    _check_arguments(steps, lr, weight_decay, warmup, clip, evaluate, eval_every, seed, should_stop)
    device = torch.device(device) if device is not None else get_device()
    autocast = resolve_autocast(device, autocast)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: apply a method or unfreeze some")
    trainable, total = count_parameters(model)
    seed_everything(seed)
    model.to(device)
    engine, rank, world, counter = model, 0, 1, None  # engine: what forward and backward run through
    if distributed is not None:
        how = dist_.strategy(distributed)
        rank, world = dist_.init(device)
        engine = dist_.wrap(model, how, device)
        counter = dist_.AllReduceCounter(engine) if how.kind == "ddp" else None
    params = [p for p in engine.parameters() if p.requires_grad]  # after wrapping: FSDP2 registers its own
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **_fused(params))
    warmup_steps = max(1, round(warmup * steps) if warmup < 1 else int(warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, steps, warmup_steps)
    )

    def run_eval(step: int) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in evaluate(model).items()}
        eval_curve.append((step, metrics))
        return metrics

    losses: list[float] = []
    step_times: list[float] = []
    eval_curve: list[tuple[int, dict[str, float]]] = []
    data = _cycle(batches)
    # progress=False or TQDM_DISABLE=1 (tests, executed notebooks) silence the bar. tqdm reads
    # TQDM_DISABLE itself, but its notebook bar (tqdm.auto in Jupyter) overrides it with disable=False.
    quiet = not progress or env_flag("TQDM_DISABLE")
    bar = tqdm(total=steps, desc="train", leave=False, **({"disable": True} if quiet else {}))
    start = time.perf_counter()
    stopped = False
    with _left_clean(model, optimizer, bar), PeakMemory(device) as memory:
        for step in range(1, steps + 1):
            engine.train()
            batch = _to(next(data), device)
            if world > 1:
                batch = dist_.shard(batch, rank, world)
            t0 = time.perf_counter()
            with autocast_context(device, autocast):
                loss = loss_fn(engine, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if counter is not None and step == 1 and not how.find_unused_parameters:
                _check_used(model)
            # clip=None: the same norm, for the check below; scaling by min(1, inf) = 1 changes nothing
            norm = torch.nn.utils.clip_grad_norm_(params, math.inf if clip is None else clip)
            if distributed is not None:
                loss, norm = dist_.mean(loss), dist_.whole(norm)  # norm: the same in every process
            losses.append(loss.item())  # the step's one sync (the loss curve needs it anyway), before the update
            _check_finite(step, losses[-1], norm, lr, clip)
            optimizer.step()
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if evaluate is not None and eval_every and step % eval_every == 0 and step < steps:
                run_eval(step)
                if should_stop is not None and should_stop(eval_curve):
                    stopped = True
                    break
    if evaluate is None:
        metrics = {}
    else:
        metrics = eval_curve[-1][1] if stopped else run_eval(step)
    return TrainResult(
        trainable_params=trainable,
        total_params=total,
        steps=step,
        wall_time_s=time.perf_counter() - start,
        median_step_s=statistics.median(step_times),
        peak_memory_mb=memory.peak_mb,
        metrics=metrics,
        loss_curve=losses,
        eval_curve=eval_curve,
        allreduce_bytes_per_step=counter.bytes / step if counter is not None else None,
    )


def _check_used(model: nn.Module) -> None:
    """DDP waits for every trainable parameter's gradient; one that gets none makes the next step fail
    with "Expected to have finished reduction in the prior iteration ...". Name it now instead."""
    unused = dist_.unused_trainable(model)
    if unused:
        raise ValueError(f"these trainable parameters got no gradient, which DDP cannot reduce: {unused}. Freeze "
                         "them (requires_grad_(False)), or pass distributed=Strategy('ddp', find_unused_parameters=True)")


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of a classifier's logits (B, C) against `batch["labels"]` (B,)."""
    return nn.functional.cross_entropy(_logits(model, batch), batch["labels"])


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy; positions labelled -100 (prompt, padding) are not scored.

    Only the positions that predict a label go through the LM head (`logits_at`): the loss equals
    scoring every position and ignoring the -100s (tested), without the (B, T, vocab) logits.
    """
    # token t predicts token t+1: shift the labels one step left (the last position predicts nothing)
    labels = nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # (B, T)
    scored = labels != -100  # (B, T)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_at=scored)  # (N, vocab)
    return nn.functional.cross_entropy(logits.float(), labels[scored])


@torch.no_grad()
def predict_classes(model: nn.Module, batches: Iterable[Batch], device=None) -> tuple[list[int], list[int]]:
    """(predictions, labels) of a classifier over `batches`, in eval mode."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds: list[int] = []
    labels: list[int] = []
    for batch in batches:
        batch = _to(batch, device)
        preds += _logits(model, batch).argmax(-1).tolist()
        labels += batch["labels"].tolist()
    model.train(was_training)
    return preds, labels
