"""The runs: what a benchmark run measures (Settings), how each method is trained and timed in both
implementations, and the records (results.json) it makes of them."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pefttutor.train import autocast_context, release_freed_memory

from harness import interleaved, log, machine, step_peak_bytes, tensor_bytes
from kits import Kit, load_kit
from methods import IMPLS, LATENCY_GROUPS, METHODS, VARIANTS, Method, lora_ours, lora_peft


@dataclass
class Settings:
    device: str
    batch: int = 4  # training batch
    seq_len: int = 128  # training sequence length
    latency_batches: tuple[int, ...] = (1, 16)
    latency_seq_len: int = 64
    repeats: int = 7
    warmup: int = 2
    latency_seconds: float = 30.0  # latency rounds continue (up to 50) until they took this long
    scaling_model: str = "smollm2"
    scaling_batch: int = 1  # both scaling tables; the rank table at seq_len tokens
    scaling_seqs: tuple[int, ...] = (64, 128, 256, 512)
    scaling_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    scaling_repeats: int = 5
    models: tuple[str, ...] = ("smollm2", "minilm")
    methods: tuple[str, ...] = tuple(METHODS)
    variants: tuple[str, ...] = tuple(VARIANTS)
    sections: tuple[str, ...] = ("train", "latency", "scaling")
    weights: str = "real"  # real | random | tiny
    autocasts: tuple[str | None, ...] = (None, "bf16")  # training rows per autocast (method key + "+bf16")


QUICK = dict(batch=2, seq_len=32, latency_batches=(1, 4), latency_seq_len=32, repeats=3, warmup=1, latency_seconds=0.0,
             scaling_seqs=(32, 64), scaling_ranks=(1, 8), scaling_repeats=3)


@dataclass
class Record:
    section: str  # train | latency | scaling_seq | scaling_rank
    impl: str  # pefttutor | peft
    model: str
    method: str
    batch: int
    seq_len: int
    metric: str  # step_time_s | peak_memory_mb | step_memory_mb | trainable_params | latency_ms | latency_vs_base
    median: float
    min: float
    max: float
    runs: int


def summary(section, impl, model, method, batch, seq_len, metric, values, scale=1.0) -> Record:
    values = [v * scale for v in values]
    return Record(section, impl, model, method, batch, seq_len, metric,
                  statistics.median(values), min(values), max(values), len(values))


class Trainer:
    """One implementation's model with a method applied, an AdamW optimizer and a fixed batch."""

    def __init__(self, kit: Kit, method: Method, impl: str, batch: dict, autocast: str | None = None):
        self.kit, self.impl, self.batch, self.autocast = kit, impl, batch, autocast
        self.task = kit.task(method.apply(impl)(kit.fresh(impl), kit), impl).train()
        self.params = [p for p in self.task.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)

    def step(self) -> None:
        """forward + backward + optimizer step, as pefttutor.train.train does them (the forward and
        loss under the same autocast for both implementations)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._forward_backward_step()

    def _loss(self) -> torch.Tensor:
        with autocast_context(next(self.task.parameters()).device, self.autocast):
            return self.kit.loss(self.task, self.batch, self.impl)

    def peak_memory_bytes(self, device) -> tuple[int, int]:
        """(whole: model + optimizer state + step growth, step growth alone); call after a step."""
        self.optimizer.zero_grad(set_to_none=True)  # gradients are part of the step's growth
        grow = step_peak_bytes(self._forward_backward_step, device)
        state = [t for s in self.optimizer.state.values() for t in s.values()]
        static = tensor_bytes(list(self.task.parameters()) + list(self.task.buffers())) + tensor_bytes(state)
        return static + grow, grow

    def _forward_backward_step(self) -> None:
        self._loss().backward()
        self.optimizer.step()

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def _step_records(section: str, trainer: Trainer, key: str, step_times: list[float], device) -> list[Record]:
    """A trainer's step time, peak memory and step growth (measured now, after its timed steps)."""
    B, T = trainer.batch["input_ids"].shape
    whole, grow = trainer.peak_memory_bytes(device)
    return [summary(section, trainer.impl, trainer.kit.name, key, B, T, "step_time_s", step_times),
            summary(section, trainer.impl, trainer.kit.name, key, B, T, "peak_memory_mb", [whole], 2**-20),
            summary(section, trainer.impl, trainer.kit.name, key, B, T, "step_memory_mb", [grow], 2**-20)]


def _medians(times: dict[str, list[float]]) -> str:
    return "  ".join(f"{impl} {statistics.median(times[impl]):.3f}s" for impl in IMPLS)


def bench_train(kit: Kit, s: Settings, device, records: list[Record]) -> None:
    batch = kit.batch(s.batch, s.seq_len, device)
    for base_key, autocast in ((k, a) for a in s.autocasts for k in s.methods):
        method = METHODS[base_key]
        key = base_key + ("" if autocast is None else f"+{autocast}")
        if kit.name not in method.models:
            continue
        trainers = {impl: Trainer(kit, method, impl, batch, autocast) for impl in IMPLS}
        times = interleaved({impl: t.step for impl, t in trainers.items()}, s.repeats, s.warmup, device)
        for impl, t in trainers.items():
            records += _step_records("train", t, key, times[impl], device)
            records.append(summary("train", impl, kit.name, key, s.batch, s.seq_len, "trainable_params",
                                   [t.trainable()]))
        log(f"  train {kit.name:8} {key:14} " + _medians(times))
        del trainers
        release_freed_memory()  # the next method starts from a process that holds no freed pages


def bench_latency(kit: Kit, s: Settings, device, records: list[Record]) -> None:
    """Forward latency (eval, no_grad). Each group of variants is timed in one interleaved loop with
    the base models, so a variant's overhead is a paired ratio: its run / its implementation's base
    run of the same round."""
    bases = {impl: kit.task(kit.fresh(impl), impl).eval() for impl in IMPLS}
    timed_base: set[tuple[int, str]] = set()  # (batch, impl) whose base row is recorded
    for group in LATENCY_GROUPS:
        keys = [k for k in group if k in s.variants]
        if not keys:
            continue
        models = {(impl, key): kit.task(VARIANTS[key].apply(impl)(kit.fresh(impl), kit), impl).eval()
                  for key in keys for impl in VARIANTS[key].impls}
        impls = sorted({impl for impl, _ in models}, key=IMPLS.index)
        for B in s.latency_batches:
            batch = kit.batch(B, s.latency_seq_len, device)
            fns = {(impl, "base"): _forward(bases[impl], batch) for impl in impls}
            fns.update({name: _forward(model, batch) for name, model in models.items()})
            times = interleaved(fns, s.repeats, s.warmup, device, min_seconds=s.latency_seconds)
            T = s.latency_seq_len
            for (impl, key), t in times.items():
                if key == "base":
                    if (B, impl) in timed_base:
                        continue  # the base rows come from the first group that timed them
                    timed_base.add((B, impl))
                else:
                    paired = [v / b for v, b in zip(t, times[impl, "base"])]
                    records.append(summary("latency", impl, kit.name, key, B, T, "latency_vs_base", paired))
                records.append(summary("latency", impl, kit.name, key, B, T, "latency_ms", t, 1e3))
            log(f"  latency {kit.name:8} B={B:<3}" + "  ".join(
                f"{impl}/{key} {1e3 * statistics.median(t):.1f}ms" for (impl, key), t in times.items()))
        del models
        gc.collect()


def _forward(task: nn.Module, batch: dict) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return task(batch["input_ids"], batch["attention_mask"])

    return run


def bench_scaling(kit: Kit, s: Settings, device, records: list[Record]) -> None:
    """LoRA (Wq, Wv) step time and peak memory against sequence length and against rank."""
    trainers = {impl: Trainer(kit, METHODS["lora_qv"], impl, None) for impl in IMPLS}
    for T in s.scaling_seqs:
        _scale_point(trainers, kit.batch(s.scaling_batch, T, device), "scaling_seq", "lora_qv", s, device, records)
    batch = kit.batch(s.scaling_batch, s.seq_len, device)
    for r in s.scaling_ranks:
        del trainers
        gc.collect()
        method = Method(f"LoRA r={r}", lora_ours("qv", r), lora_peft("qv", r))
        trainers = {impl: Trainer(kit, method, impl, None) for impl in IMPLS}
        _scale_point(trainers, batch, "scaling_rank", f"lora_qv_r{r}", s, device, records)


def _scale_point(trainers, batch, section, method, s: Settings, device, records) -> None:
    B, T = batch["input_ids"].shape
    for t in trainers.values():
        t.batch = batch
    times = interleaved({impl: t.step for impl, t in trainers.items()}, s.scaling_repeats, 1, device)
    for impl, t in trainers.items():
        records += _step_records(section, t, method, times[impl], device)
    log(f"  {section} {method:12} B={B} T={T:<4}" + _medians(times))


def run(s: Settings) -> dict:
    device = torch.device(s.device)
    records: list[Record] = []
    start = time.perf_counter()
    for name in s.models:
        kit = load_kit(name, device, s.weights)
        gc.freeze()  # the libraries' and pristine models' objects: later collections skip them (fast)
        log(f"{name}: loaded")
        if "train" in s.sections:
            bench_train(kit, s, device, records)
        if "latency" in s.sections:
            bench_latency(kit, s, device, records)
        if "scaling" in s.sections and name == s.scaling_model:
            bench_scaling(kit, s, device, records)
        del kit
        gc.unfreeze()
        gc.collect()
    return {"machine": machine(device), "settings": asdict(s), "wall_time_s": round(time.perf_counter() - start, 1),
            "records": [asdict(r) for r in records]}
