"""pefttutor against Hugging Face transformers + peft: training step time, peak memory, latency.

One process loads both implementations of a model (pefttutor's from-scratch Llama/Bert and the
transformers model with the same weights), applies the same method to each (pefttutor's module /
peft), and times them on the same batch, interleaved run by run (A B, then B A, ...) after warm-up,
so slow phases of a shared machine hit both alike. Every measurement becomes one record
(impl, model, method, batch, seq_len, metric, median, min, max, runs) in results.json, and
RESULTS.md renders them with the ratio pefttutor / peft for each row.

    python benchmarks/bench.py                  # full run (`make bench`): benchmarks/results.json + RESULTS.md
    python benchmarks/bench.py --quick          # a smoke run in under 3 minutes (`make bench-quick`)
    python benchmarks/bench.py --render-only    # re-render RESULTS.md from results.json

A method is one entry of METHODS: how pefttutor applies it, how peft applies it, to which models.
Entries whose pefttutor module does not exist yet are skipped and listed as missing.

Peak memory of a training step = the model's tensors + the optimizer state + the peak growth of
allocated tensor memory during one step (gradients, activations, temporaries). The growth is the
allocator's own accounting: `torch.cuda.max_memory_allocated` on CUDA; on CPU the torch profiler's
allocation events (every c10 CPU allocation and free, summed in order), which is exact for torch
tensors and, unlike process RSS, does not depend on what the process freed earlier.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pefttutor import config as pt_config  # noqa: E402
from pefttutor.models import Bert, BertClassifier, Llama, mean_pool  # noqa: E402
from pefttutor.train import autocast_context, causal_lm_loss, classification_loss, release_freed_memory  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, as peft calls them

HERE = Path(__file__).resolve().parent
IMPLS = ("pefttutor", "peft")


# ----------------------------------------------------------------------------- models


class LMTask(nn.Module):
    """Logits (B, T, vocab) of the input's T positions, from either implementation.

    Soft prompts prepend virtual positions; only the last T are scored, by both implementations.
    """

    def __init__(self, model: nn.Module, hf: bool):
        super().__init__()
        self.model, self.hf = model, hf

    def forward(self, input_ids, attention_mask, logits_at=None):  # (B, T), (B, T), bool (B, T) for ours
        if not self.hf:  # ours returns the real tokens' logits only; causal_lm_loss passes logits_at
            return self.model(input_ids=input_ids, attention_mask=attention_mask, logits_at=logits_at)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -input_ids.shape[1]:]


class HFBertClassifier(nn.Module):
    """pefttutor's BertClassifier (mean pool, dropout, linear) on a transformers BertModel."""

    def __init__(self, bert: nn.Module, num_classes: int, dropout: float):
        super().__init__()
        self.bert, self.dropout = bert, nn.Dropout(dropout)
        self.classifier = nn.Linear(bert.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden[:, -input_ids.shape[1]:]  # drop soft-prompt positions, if any: (B, T, d)
        return self.classifier(self.dropout(mean_pool(hidden, attention_mask)))  # (B, C)


@dataclass
class Kit:
    """One base model in both implementations, with what a benchmark needs to train and run it."""

    name: str  # "smollm2" | "minilm" (tiny random models keep these names)
    ours: nn.Module  # pristine, eval mode; copied for every configuration
    hf: nn.Module
    qv: tuple[str, ...]  # LoRA on the attention's query and value projections
    all_linear: tuple[str, ...]  # LoRA on every linear layer of the blocks (not lm_head / pooler)
    vocab: int
    num_classes: int = 2

    @property
    def causal(self) -> bool:
        return self.name == "smollm2"

    @property
    def train_heads(self) -> tuple[str, ...]:  # modules trained in full beside the method
        return () if self.causal else ("classifier",)

    def task(self, model: nn.Module, impl: str) -> nn.Module:
        """Wrap a (method-applied) base model into the module a step calls: logits out."""
        if self.causal:
            return LMTask(model, hf=impl == "peft")
        if impl == "pefttutor":
            return model  # already a BertClassifier (methods are applied to it, head included)
        torch.manual_seed(0)
        head = HFBertClassifier(model, self.num_classes, self.ours.config.hidden_dropout_prob)
        return head.to(next(model.parameters()).device)

    def fresh(self, impl: str) -> nn.Module:
        """A copy of the base model to apply a method to: Llama / BertClassifier, or the HF model."""
        if impl == "peft":
            return copy.deepcopy(self.hf)
        model = copy.deepcopy(self.ours)
        if self.causal:
            return model
        torch.manual_seed(0)
        return BertClassifier(model, self.num_classes)

    def loss(self, task: nn.Module, batch: dict, impl: str) -> torch.Tensor:
        """Each implementation's own loss, as its users train: for the LM, pefttutor.train.causal_lm_loss
        and transformers' loss from `labels` (inside the model; peft adds -100 labels for soft prompts);
        for the classifier, both cross-entropy of the same head's logits."""
        if not self.causal:
            return classification_loss(task, batch)
        if impl == "peft":
            return task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
        return causal_lm_loss(task, batch)

    def batch(self, B: int, T: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Random tokens (ids >= 5: no special tokens), all real (no padding), fixed seed."""
        g = torch.Generator().manual_seed(B * 1000 + T)
        ids = torch.randint(5, self.vocab, (B, T), generator=g)
        labels = ids.clone() if self.causal else torch.randint(0, self.num_classes, (B,), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device)}


# Random-weight stand-ins: "random" has the real models' shapes (pefttutor's config defaults are
# SmolLM2-135M and all-MiniLM-L6-v2), "tiny" is for the harness's own test.
TINY = {"smollm2": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        "minilm": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=64)}


def _random_pair(name: str, weights: str) -> tuple[nn.Module, nn.Module]:
    """(pefttutor model, transformers model) with the same random weights."""
    import transformers

    from pefttutor.models import BertConfig, LlamaConfig

    ours_cls, config_cls = (Llama, LlamaConfig) if name == "smollm2" else (Bert, BertConfig)
    config = asdict(config_cls(**TINY[name])) if weights == "tiny" else asdict(config_cls())
    hf_cls, hf_config = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if name == "smollm2"
                         else (transformers.BertModel, transformers.BertConfig))
    torch.manual_seed(0)
    hf = hf_cls(hf_config(**config, attn_implementation="sdpa")).eval()
    return ours_cls.from_hf(hf).eval(), hf


def load_kit(name: str, device: torch.device, weights: str = "real") -> Kit:
    """SmolLM2 or MiniLM in both implementations: the real checkpoints (`weights="real"`: load_smollm2 /
    load_smollm2_hf, load_minilm / load_minilm_hf) or random weights ("random": the same shapes, for
    machines without the weight packages; "tiny": a few thousand parameters, for tests)."""
    if name not in ("smollm2", "minilm"):
        raise ValueError(f"unknown model {name!r}; valid: smollm2, minilm")
    if weights != "real":
        ours, hf = _random_pair(name, weights)
        ours, hf = ours.to(device), hf.to(device)
    elif name == "smollm2":
        from pefttutor.models import load_smollm2, load_smollm2_hf

        ours, hf = load_smollm2(device=device)[0], load_smollm2_hf(device=device)
    else:
        from pefttutor.models import load_minilm, load_minilm_hf

        ours, hf = load_minilm(device=device)[0], load_minilm_hf(device=device)
    if name == "smollm2":
        attn, mlp = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
        return Kit(name, ours, hf, ("q_proj", "v_proj"), attn + mlp, ours.config.vocab_size)
    # pefttutor's Bert.forward skips the pooler; so must transformers' (its forward runs it when present),
    # and neither keeps its unused weights (they would count as trainable in full finetuning)
    hf.pooler = ours.pooler = None
    # "output.dense" also matches "attention.output.dense"; the pooler's dense stays out of both
    all_linear = ("query", "key", "value", "intermediate.dense", "output.dense")
    return Kit(name, ours, hf, ("query", "value"), all_linear, ours.config.vocab_size)


# ----------------------------------------------------------------------------- methods


def _method_module(name: str):
    return importlib.import_module(f"pefttutor.methods.{name}")


def _peft(model: nn.Module, config) -> nn.Module:
    import peft

    return peft.get_peft_model(model, config)


def _task_type(kit: Kit) -> str:
    return "CAUSAL_LM" if kit.causal else "FEATURE_EXTRACTION"


def _full(model: nn.Module, kit: Kit) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _lora_ours(targets: str, r: int = 8) -> Callable:
    return lambda model, kit: _method_module("lora").apply(
        model, getattr(kit, targets), r=r, alpha=2 * r, train=kit.train_heads)


def _lora_peft(targets: str, r: int = 8) -> Callable:
    def apply(model, kit):
        import peft

        return _peft(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(getattr(kit, targets))))

    return apply


def _soft_prompt_peft(model, kit):
    import peft

    return _peft(model, peft.PromptTuningConfig(task_type=_task_type(kit), num_virtual_tokens=20))


def _prefix_peft(model, kit):
    import peft

    return _peft(model, peft.PrefixTuningConfig(
        task_type=_task_type(kit), num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=512))


def _llama_adapter_peft(model, kit):
    import peft

    return _peft(model, peft.AdaptionPromptConfig(
        task_type="CAUSAL_LM", adapter_len=10, adapter_layers=model.config.num_hidden_layers))


@dataclass(frozen=True)
class Method:
    """One benchmarked method: `ours(model, kit)` / `peft(hf_model, kit)` return the model to train."""

    label: str
    ours: Callable[[nn.Module, Kit], nn.Module]
    peft: Callable[[nn.Module, Kit], nn.Module] | None
    module: str | None = None  # the pefttutor.methods module it needs (skipped while missing)
    models: tuple[str, ...] = ("smollm2", "minilm")


METHODS: dict[str, Method] = {
    "full": Method("full finetuning", _full, _full),
    "lora_qv": Method("LoRA Wq,Wv r=8", _lora_ours("qv"), _lora_peft("qv"), "lora"),
    "lora_all": Method("LoRA all linear r=8", _lora_ours("all_linear"), _lora_peft("all_linear"), "lora"),
    "soft_prompt": Method(
        "soft prompt (20 tokens)",
        lambda m, kit: _method_module("prompt_tuning").apply(m, 20, train=kit.train_heads),
        _soft_prompt_peft, "prompt_tuning"),
    "prefix": Method(
        "prefix (20 tokens, MLP 512)",
        lambda m, kit: _method_module("prefix_tuning").apply(m, 20, reparam=True, hidden=512, train=kit.train_heads),
        _prefix_peft, "prefix_tuning"),
    "llama_adapter": Method(
        "LLaMA-Adapter (10 tokens, all layers)",
        lambda m, kit: _method_module("llama_adapter").apply(m, n_tokens=10, n_layers=m.config.num_hidden_layers),
        _llama_adapter_peft, "llama_adapter", models=("smollm2",)),
}

# Inference variants: base model, LoRA unmerged / merged, bottleneck adapters (pefttutor only: peft
# has no bottleneck adapters). `ours(model, kit)` / `peft(hf, kit)` return the eval-mode model.


def _merged_ours(targets: str) -> Callable:
    def apply(model, kit):
        lora = _method_module("lora")
        return lora.merge(_lora_ours(targets)(model, kit))

    return apply


def _merged_peft(targets: str) -> Callable:
    return lambda model, kit: _lora_peft(targets)(model, kit).merge_and_unload()


def _adapters(placement: str) -> Callable:
    def apply(model, kit):  # size 64, or less on a tiny model (a bottleneck must be narrower than d)
        size = min(64, kit.ours.config.hidden_size // 4)
        return _method_module("adapters").apply(model, size, placement=placement, train=kit.train_heads)

    return apply


VARIANTS: dict[str, Method] = {
    "base": Method("base model", lambda m, kit: m, lambda m, kit: m),  # timed in every group's loop
    "lora_qv": Method("LoRA Wq,Wv r=8, unmerged", _lora_ours("qv"), _lora_peft("qv"), "lora"),
    "lora_qv_merged": Method("LoRA Wq,Wv r=8, merged", _merged_ours("qv"), _merged_peft("qv"), "lora"),
    "lora_all": Method("LoRA all linear r=8, unmerged", _lora_ours("all_linear"), _lora_peft("all_linear"), "lora"),
    "lora_all_merged": Method("LoRA all linear r=8, merged", _merged_ours("all_linear"), _merged_peft("all_linear"),
                              "lora"),
    **{f"adapters_{p}": Method(f"bottleneck adapters, {p}, size 64", _adapters(p), None, "adapters")
       for p in ("houlsby", "pfeiffer", "parallel")},
}


# timed together with the base models, one loop per group (a loop holds every model of its group)
LATENCY_GROUPS = (("lora_qv", "lora_qv_merged"), ("lora_all", "lora_all_merged"),
                  ("adapters_houlsby", "adapters_pfeiffer", "adapters_parallel"))


def available(method: Method) -> bool:
    return method.module is None or importlib.util.find_spec(f"pefttutor.methods.{method.module}") is not None


# ----------------------------------------------------------------------------- measuring


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


class Trainer:
    """One implementation's model with a method applied, an AdamW optimizer and a fixed batch."""

    def __init__(self, kit: Kit, method: Method, impl: str, batch: dict, autocast: str | None = None):
        apply = method.ours if impl == "pefttutor" else method.peft
        self.kit, self.impl, self.batch, self.autocast = kit, impl, batch, autocast
        self.task = kit.task(apply(kit.fresh(impl), kit), impl).train()
        self.params = [p for p in self.task.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)

    def step(self) -> None:
        """forward + backward + optimizer step, as pefttutor.train.train does them (the forward and
        loss under the same autocast for both implementations)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._loss().backward()
        self.optimizer.step()

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


# ----------------------------------------------------------------------------- records


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
             scaling_seqs=(32, 64),
             scaling_ranks=(1, 8), scaling_repeats=3)


# ----------------------------------------------------------------------------- benchmarks


def log(msg: str) -> None:
    print(msg, flush=True)


def bench_train(kit: Kit, s: Settings, device, records: list[Record], missing: set[str]) -> None:
    batch = kit.batch(s.batch, s.seq_len, device)
    for base_key, autocast in ((k, a) for a in s.autocasts for k in s.methods):
        method = METHODS[base_key]
        key = base_key + ("" if autocast is None else f"+{autocast}")
        if kit.name not in method.models:
            continue
        if not available(method):
            missing.add(method.module)
            continue
        trainers = {impl: Trainer(kit, method, impl, batch, autocast) for impl in IMPLS}
        times = interleaved({impl: t.step for impl, t in trainers.items()}, s.repeats, s.warmup, device)
        for impl, t in trainers.items():
            whole, grow = t.peak_memory_bytes(device)
            records += [
                summary("train", impl, kit.name, key, s.batch, s.seq_len, "step_time_s", times[impl]),
                summary("train", impl, kit.name, key, s.batch, s.seq_len, "peak_memory_mb", [whole], 2**-20),
                summary("train", impl, kit.name, key, s.batch, s.seq_len, "step_memory_mb", [grow], 2**-20),
                summary("train", impl, kit.name, key, s.batch, s.seq_len, "trainable_params", [t.trainable()]),
            ]
        log(f"  train {kit.name:8} {key:14} " + "  ".join(
            f"{impl} {statistics.median(times[impl]):.3f}s" for impl in IMPLS))
        del trainers
        release_freed_memory()  # the next method starts from a process that holds no freed pages


def bench_latency(kit: Kit, s: Settings, device, records: list[Record], missing: set[str]) -> None:
    """Forward latency (eval, no_grad). Each group of variants is timed in one interleaved loop with
    the base models, so a variant's overhead is a paired ratio: its run / its implementation's base
    run of the same round."""
    bases = {impl: kit.task(kit.fresh(impl), impl).eval() for impl in IMPLS}
    timed_base: set[tuple[int, str]] = set()  # (batch, impl) whose base row is recorded
    for group in LATENCY_GROUPS:
        keys = [k for k in group if k in s.variants and _available_or_missing(VARIANTS[k], missing)]
        if not keys:
            continue
        models = {(impl, key): kit.task(_apply(VARIANTS[key], impl)(kit.fresh(impl), kit), impl).eval()
                  for key in keys for impl in _impls(VARIANTS[key])}
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


def _available_or_missing(method: Method, missing: set[str]) -> bool:
    if not available(method):
        missing.add(method.module)
        return False
    return True


def _apply(method: Method, impl: str) -> Callable[[nn.Module, Kit], nn.Module]:
    return method.ours if impl == "pefttutor" else method.peft


def _impls(method: Method) -> tuple[str, ...]:
    return IMPLS if method.peft is not None else ("pefttutor",)


def _forward(task: nn.Module, batch: dict) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return task(batch["input_ids"], batch["attention_mask"])

    return run


def bench_scaling(kit: Kit, s: Settings, device, records: list[Record]) -> None:
    """LoRA (Wq, Wv) step time and peak memory against sequence length and against rank."""
    if not available(METHODS["lora_qv"]):
        return
    trainers = {impl: Trainer(kit, METHODS["lora_qv"], impl, None) for impl in IMPLS}
    for T in s.scaling_seqs:
        _scale_point(trainers, kit.batch(s.scaling_batch, T, device), "scaling_seq", "lora_qv", s, device, records)
    batch = kit.batch(s.scaling_batch, s.seq_len, device)
    for r in s.scaling_ranks:
        del trainers
        gc.collect()
        method = Method(f"LoRA r={r}", _lora_ours("qv", r), _lora_peft("qv", r), "lora")
        trainers = {impl: Trainer(kit, method, impl, None) for impl in IMPLS}
        _scale_point(trainers, batch, "scaling_rank", f"lora_qv_r{r}", s, device, records)


def _scale_point(trainers, batch, section, method, s: Settings, device, records) -> None:
    B, T = batch["input_ids"].shape
    for t in trainers.values():
        t.batch = batch
    times = interleaved({impl: t.step for impl, t in trainers.items()}, s.scaling_repeats, 1, device)
    for impl, t in trainers.items():
        whole, grow = t.peak_memory_bytes(device)
        records += [summary(section, impl, t.kit.name, method, B, T, "step_time_s", times[impl]),
                    summary(section, impl, t.kit.name, method, B, T, "peak_memory_mb", [whole], 2**-20),
                    summary(section, impl, t.kit.name, method, B, T, "step_memory_mb", [grow], 2**-20)]
    log(f"  {section} {method:12} B={B} T={T:<4}" + "  ".join(
        f"{impl} {statistics.median(times[impl]):.3f}s" for impl in IMPLS))


def machine(device: torch.device) -> dict[str, str | int]:
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


def run(s: Settings) -> dict:
    device = torch.device(s.device)
    records: list[Record] = []
    missing: set[str] = set()
    start = time.perf_counter()
    for name in s.models:
        kit = load_kit(name, device, s.weights)
        gc.freeze()  # the libraries' and pristine models' objects: later collections skip them (fast)
        log(f"{name}: loaded")
        if "train" in s.sections:
            bench_train(kit, s, device, records, missing)
        if "latency" in s.sections:
            bench_latency(kit, s, device, records, missing)
        if "scaling" in s.sections and name == s.scaling_model:
            bench_scaling(kit, s, device, records)
        del kit
        gc.unfreeze()
        gc.collect()
    return {"machine": machine(device), "settings": asdict(s), "missing_methods": sorted(missing),
            "wall_time_s": round(time.perf_counter() - start, 1), "records": [asdict(r) for r in records]}


# ----------------------------------------------------------------------------- rendering


def _index(records: list[dict]) -> dict[tuple, dict]:
    return {(r["section"], r["impl"], r["model"], r["method"], r["batch"], r["seq_len"], r["metric"]): r
            for r in records}


def _fmt(x: float, metric: str) -> str:
    if metric == "step_time_s":
        return f"{1e3 * x:,.0f}" if x >= 0.1 else f"{1e3 * x:,.1f}"
    if metric == "latency_ms":
        return f"{x:,.1f}" if x >= 10 else f"{x:,.2f}"
    if metric == "latency_vs_base":
        return f"{x:.3f}"
    if metric == "trainable_params":
        return f"{x:,.0f}"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"  # MB


def _cell(r: dict | None, metric: str, spread: bool = True) -> str:
    if r is None:
        return "—"
    if not spread or r["runs"] == 1:
        return _fmt(r["median"], metric)
    return f"{_fmt(r['median'], metric)} ({_fmt(r['min'], metric)}–{_fmt(r['max'], metric)})"


def _ratio(a: dict | None, b: dict | None, key: str = "median") -> str:
    return "—" if a is None or b is None or not b[key] else f"{a[key] / b[key]:.2f}x"


def _base(method: str) -> str:
    """The METHODS key of a record's method ("lora_qv+bf16" -> "lora_qv")."""
    return method.split("+", 1)[0]


def _label(method: str) -> str:
    base, _, autocast = method.partition("+")
    if base in METHODS:
        return METHODS[base].label + (f", {autocast} autocast" if autocast else "")
    return VARIANTS[method].label if method in VARIANTS else method


def render(result: dict, extras: dict | None = None) -> str:
    """RESULTS.md; `extras` holds the other benchmarks' results (`_extras`), each rendered after."""
    m, s, idx = result["machine"], result["settings"], _index(result["records"])
    keys = {(r["section"], r["model"], r["method"], r["batch"], r["seq_len"]) for r in result["records"]}

    def rows(section):
        order = {name: i for i, name in enumerate(VARIANTS if section == "latency" else
                                                  [m + a for a in ("", "+bf16") for m in METHODS])}
        return sorted((k for k in keys if k[0] == section),
                      key=lambda k: (k[1] != "smollm2", k[3], order.get(k[2], len(order)), k[2], k[4]))

    def get(section, impl, model, method, B, T, metric):
        return idx.get((section, impl, model, method, B, T, metric))

    lines = [
        "# Benchmarks: pefttutor vs Hugging Face transformers + peft",
        "",
        "Generated by `benchmarks/bench.py` (`make bench`) from `benchmarks/results.json`; do not edit by hand.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; device `{m['device']}`; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']},"
        f" Python {m['python']}; run {m['date']}, {result['wall_time_s'] / 60:.0f} minutes in all.",
        "",
        "Models: " + {"real": "the real checkpoints (SmolLM2-135M-Instruct, all-MiniLM-L6-v2)",
                      "random": "random weights with the real models' shapes",
                      "tiny": "tiny random models (a test run: the numbers mean nothing)"}[s.get("weights", "real")]
        + f". Settings: training batch {s['batch']} x {s['seq_len']} tokens, {s['warmup']} warm-up steps then"
        f" {s['repeats']} timed steps per implementation, interleaved run by run (order reversed every other"
        " round, Python's garbage collector paused while timing); fp32; random token ids, no padding (attention mask of ones), AdamW. Times are medians"
        " (min–max) in milliseconds; ratios are pefttutor / peft (below 1.00x: pefttutor is faster/smaller).",
        "",
    ]
    lines += _targets(result, idx)
    lines += ["## Optimized after profiling against peft", ""] + [f"- {o}" for o in OPTIMIZED] + [""]
    if result["missing_methods"]:
        lines += [f"Not benchmarked: `pefttutor.methods.{', '.join(result['missing_methods'])}` did not exist"
                  " when this ran.", ""]

    train = rows("train")
    if train:
        lines += [
            "## Training step (forward + backward + AdamW step)",
            "",
            "SmolLM2-135M: pefttutor's `Llama` vs transformers' `LlamaForCausalLM`, next-token loss over"
            " all positions. all-MiniLM-L6-v2: pefttutor's `BertClassifier` vs the same mean-pool + linear"
            " head on transformers' `BertModel` (its pooler removed, as pefttutor's Bert skips it), 2-class"
            " cross-entropy, dropout on. peft wraps the transformers model for every method but full finetuning.",
            "",
            "| model | method | trainable (pefttutor / peft) | step ms, pefttutor | step ms, peft | time ratio"
            " (median / min) | peak MB, pefttutor | peak MB, peft | memory ratio | step-growth MB (pefttutor / peft) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for sec, model, method, B, T in train:
            g = {(impl, metric): get(sec, impl, model, method, B, T, metric) for impl in IMPLS
                 for metric in ("step_time_s", "peak_memory_mb", "step_memory_mb", "trainable_params")}
            lines.append(" | ".join([
                f"| {model}", _label(method),
                f"{_cell(g['pefttutor', 'trainable_params'], 'trainable_params')} /"
                f" {_cell(g['peft', 'trainable_params'], 'trainable_params')}",
                _cell(g["pefttutor", "step_time_s"], "step_time_s"), _cell(g["peft", "step_time_s"], "step_time_s"),
                f"{_ratio(g['pefttutor', 'step_time_s'], g['peft', 'step_time_s'])} /"
                f" {_ratio(g['pefttutor', 'step_time_s'], g['peft', 'step_time_s'], 'min')}",
                _cell(g["pefttutor", "peak_memory_mb"], "mb"), _cell(g["peft", "peak_memory_mb"], "mb"),
                _ratio(g["pefttutor", "peak_memory_mb"], g["peft", "peak_memory_mb"]),
                f"{_cell(g['pefttutor', 'step_memory_mb'], 'mb')} / {_cell(g['peft', 'step_memory_mb'], 'mb')} |",
            ]))
        lines.append("")

    latency = rows("latency")
    if latency:
        lines += [
            "## Inference latency (one forward pass, eval mode, no_grad)",
            "",
            f"{s['latency_seq_len']} tokens per sequence. \"vs base\" is the variant's time over its own"
            " implementation's base model, paired by round (a round runs the base models and each variant of its group once, in"
            " alternating order): median (min–max) of the per-round ratios."
            + (f" At least {s['repeats']} rounds, and more (up to 50) until a group's rounds at one batch size took"
               f" {s['latency_seconds']:g} s, so the fast rows get enough samples." if s.get("latency_seconds") else "")
            + " peft's merged LoRA is `merge_and_unload()` (a plain transformers model again); pefttutor's"
            " `lora.merge` keeps the LoRA layers (to `unmerge` later) and runs only W0 + BA folded.",
            "",
            "| model | variant | batch | ms, pefttutor | ms, peft | ratio (median / min) |"
            " pefttutor vs base | peft vs base |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for sec, model, method, B, T in latency:
            g = {(impl, metric): get(sec, impl, model, method, B, T, metric) for impl in IMPLS
                 for metric in ("latency_ms", "latency_vs_base")}
            lines.append(" | ".join([
                f"| {model}", _label(method), str(B),
                _cell(g["pefttutor", "latency_ms"], "latency_ms"), _cell(g["peft", "latency_ms"], "latency_ms"),
                f"{_ratio(g['pefttutor', 'latency_ms'], g['peft', 'latency_ms'])} /"
                f" {_ratio(g['pefttutor', 'latency_ms'], g['peft', 'latency_ms'], 'min')}",
                _cell(g["pefttutor", "latency_vs_base"], "latency_vs_base"),
                _cell(g["peft", "latency_vs_base"], "latency_vs_base") + " |",
            ]))
        lines.append("")

    for section, title, axis in (("scaling_seq", "Scaling with sequence length (LoRA Wq,Wv r=8)", "seq_len"),
                                 ("scaling_rank", "Scaling with LoRA rank (Wq,Wv, alpha = 2r)", "rank")):
        pts = rows(section)
        if not pts:
            continue
        model, B, T = pts[0][1], pts[0][3], pts[0][4]
        where = f"batch {B}" if axis == "seq_len" else f"batch {B} x {T} tokens"
        lines += [
            f"## {title}",
            "",
            f"{model}, {where}, {s['scaling_repeats']} interleaved timed steps after 1 warm-up.",
            "",
            f"| {axis} | step ms, pefttutor | step ms, peft | time ratio | peak MB, pefttutor | peak MB, peft |"
            " memory ratio | step-growth MB (pefttutor / peft) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        pts = sorted(pts, key=lambda k: k[4] if axis == "seq_len" else int(k[2].rsplit("r", 1)[1]))
        for sec, model, method, B, T in pts:
            g = {(impl, metric): get(sec, impl, model, method, B, T, metric) for impl in IMPLS
                 for metric in ("step_time_s", "peak_memory_mb", "step_memory_mb")}
            x = T if axis == "seq_len" else method.rsplit("r", 1)[1]
            lines.append(" | ".join([
                f"| {x}", _cell(g["pefttutor", "step_time_s"], "step_time_s"),
                _cell(g["peft", "step_time_s"], "step_time_s"),
                _ratio(g["pefttutor", "step_time_s"], g["peft", "step_time_s"]),
                _cell(g["pefttutor", "peak_memory_mb"], "mb"), _cell(g["peft", "peak_memory_mb"], "mb"),
                _ratio(g["pefttutor", "peak_memory_mb"], g["peft", "peak_memory_mb"]),
                f"{_cell(g['pefttutor', 'step_memory_mb'], 'mb')} / {_cell(g['peft', 'step_memory_mb'], 'mb')} |",
            ]))
        lines.append("")

    lines += [MEMORY_NOTE, ""]
    extras = extras or {}
    if "speedups" in extras:
        lines += speedups_section(extras["speedups"])
    if "time_to_accuracy" in extras:
        lines += time_to_accuracy_section(extras["time_to_accuracy"])
    return "\n".join(lines)


def speedups_section(sp: dict) -> list[str]:
    """The table of `benchmarks/speedups.py`'s run (speedups.json)."""
    m = sp["machine"]
    lines = ["## Training speed-ups, each against what it replaced", "",
             f"`benchmarks/speedups.py`, run {m['date']} on {m['cpu']} ({m['torch_threads']} torch threads, device"
             f" `{m['device']}`): median seconds per training step over {sp['steps']} of the study's real batches,"
             " the two variants interleaved (evaluation rows: a whole validation pass). The accuracy check of bf16"
             " autocast is the study's fp32 group (`results/README.md`).", "",
             "| speed-up | setting | before (ms) | after (ms) | speed-up |", "|---|---|---|---|---|"]
    for r in sp["rows"]:
        lines.append(f"| {r['speed-up']} | {r['setting']} | {1e3 * r['before']:,.0f} | {1e3 * r['after']:,.0f} |"
                     f" {r['before'] / r['after']:.2f}x |")
    return lines + [""]


def time_to_accuracy_section(tta: dict) -> list[str]:
    """The table of `benchmarks/time_to_accuracy.py`'s run (time_to_accuracy.json)."""
    s, m, runs = tta["settings"], tta["machine"], tta["runs"]
    ref = runs["Trainer + peft, defaults"]["time_to_target_s"], runs["Trainer + peft, best flags"]["time_to_target_s"]
    lines = ["## Time to accuracy: pefttutor vs transformers.Trainer + peft", "",
             f"`benchmarks/time_to_accuracy.py`, run {m['date']} on {m['cpu']} ({m['torch_threads']} torch threads,"
             f" device `{m['device']}`): MiniLM tweets, LoRA r={s['r']} alpha={s['alpha']} on {', '.join(s['targets'])}"
             f" + the linear head, lr {s['lr']:g}, batch {s['batch']}, {s['epochs']} epochs ({s['steps']} steps),"
             f" validation ({s['validation']} tweets) every {s['eval_every']} steps, clock included. Target:"
             f" validation accuracy {tta['target']:.4f} (from {', '.join(tta['target_from'])}: converged full"
             f" finetuning minus 1 point).", "",
             "| contestant | time to target (s) | vs Trainer defaults | vs Trainer best flags | total (s) |"
             " test accuracy at the end |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        t = r["time_to_target_s"]
        ratio = lambda base: "—" if t is None or base is None else f"{t / base:.2f}x"  # noqa: E731
        lines.append(f"| {name} | {'not reached' if t is None else f'{t:.0f}'} | {ratio(ref[0])} | {ratio(ref[1])} |"
                     f" {r['wall_s']:.0f} | {r['test_accuracy']:.4f} |")
    return lines + [""]


# What profiling against peft (torch.profiler, operator by operator) found and what was changed;
# rendered in every RESULTS.md, so a reader sees why the from-scratch code runs as fast as it does.
OPTIMIZED = [
    "Grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads): SDPA's native"
    " `enable_gqa` instead of repeating k and v per query head, so no H-head copies of k and v are"
    " made or saved for the backward (`pefttutor/models/attention.py`).",
    "An all-ones attention mask takes the causal kernel path (`is_causal`, no mask tensor), with one"
    " (1, T) row of positions broadcast over the batch (`pefttutor/models/llama.py`).",
    "Causal-LM loss: the labels are shifted one step left instead of the logits, so the (B, T, vocab)"
    " logits and their gradient are never copied (`pefttutor.train.causal_lm_loss`).",
    "Prefix tuning: P_theta is computed once per model forward (a forward pre-hook) and split into"
    " the L layers' blocks, instead of each layer computing its slice of the MLP's last Linear. The"
    " backward of each such slice wrote a zero-filled gradient of the whole (L * 2 * kv_dim, hidden)"
    " weight, L times per step (`aten::fill_` 375 ms vs peft's 51 ms per SmolLM2 step before;"
    " the split's backward is one concatenation).",
]


# Causes of pefttutor using more memory, by method (rendered only for rows where it does).
MORE_MEMORY_BECAUSE = {
    "llama_adapter": "pefttutor trains one zero-initialised gate per query head (g_l of shape (H,)); peft's"
                     " `adaption_prompt` has one per layer. The extra H - 1 gates per layer, with their"
                     " gradients and AdamW state, are the difference (see the trainable counts).",
}


def _targets(result: dict, idx: dict) -> list[str]:
    """The issue's targets, checked against this run's records, and the rows that miss them, with causes."""
    recs = result["records"]
    train = [r for r in recs if r["section"] == "train" and r["impl"] == "pefttutor"]

    def other(r, metric=None):
        return idx.get((r["section"], "peft", r["model"], r["method"], r["batch"], r["seq_len"], metric or r["metric"]))

    lines = ["## Targets, checked on this run", ""]
    over: dict[str, list[dict]] = {}
    for metric, what in (("step_time_s", "training step time"), ("peak_memory_mb", "peak training memory")):
        rows = [r for r in train if r["metric"] == metric and other(r)]
        over[metric] = [r for r in rows if r["median"] > other(r)["median"]]
        listed = [f"{r['model']} {_label(r['method'])} {r['median'] / other(r)['median']:.2f}x"
                  f" (min {r['min'] / other(r)['min']:.2f}x)" if metric == "step_time_s" else
                  f"{r['model']} {_label(r['method'])} +{r['median'] - other(r)['median']:.3f} MB"
                  f" ({r['median'] / other(r)['median']:.5f}x)" for r in over[metric]]
        lines.append(f"- {what} <= 1.00x peft's: {len(rows) - len(listed)} of {len(rows)} rows"
                     + (f"; above: {'; '.join(listed)}." if listed else "."))
    merged = [r for r in recs if r["section"] == "latency" and r["impl"] == "pefttutor"
              and r["metric"] == "latency_vs_base" and r["method"].endswith("_merged")]
    if merged:
        ok = sum(r["median"] <= 1.03 for r in merged)
        lines.append(f"- merged LoRA latency within 3% of the base model (pefttutor, median paired ratio): {ok} of"
                     f" {len(merged)} rows: " + ", ".join(
                         f"{r['model']} {r['method'].removesuffix('_merged')} B={r['batch']} {r['median']:.3f}"
                         for r in merged) + ".")
        for r in (r for r in merged if r["median"] > 1.03):
            fastest = (idx[("latency", "pefttutor", r["model"], r["method"], r["batch"], r["seq_len"], "latency_ms")]["min"]
                       / idx[("latency", "pefttutor", r["model"], "base", r["batch"], r["seq_len"], "latency_ms")]["min"])
            lines.append(f"  - {r['model']} {r['method'].removesuffix('_merged')} B={r['batch']} is over: its fastest"
                         f" run is {fastest:.3f}x the base model's fastest"
                         + (" (noise: merged, the layer runs the base model's own matrix product with W0 + s B A"
                            " folded in, plus one Python call per LoRA layer)." if fastest <= 1.03 else "."))
    unmerged = [r for r in recs if r["section"] == "latency" and r["metric"] == "latency_vs_base"
                and r["method"] in ("lora_qv", "lora_all") and r["impl"] == "pefttutor"]
    if unmerged:
        lines.append("- unmerged LoRA latency over the base model, pefttutor / peft: " + ", ".join(
            f"{r['model']} {r['method']} B={r['batch']} {r['median']:.2f}x / "
            + (f"{other(r)['median']:.2f}x" if other(r) else "—") for r in unmerged) + ".")

    for metric, title, causes in (("step_time_s", "Where pefttutor is slower", {}),
                                  ("peak_memory_mb", "Where pefttutor uses more memory", MORE_MEMORY_BECAUSE)):
        methods = sorted({r["method"] for r in over[metric]}, key=lambda m: (list(METHODS).index(_base(m)), m))
        if methods:
            lines += ["", f"{title}:"]
        for method in methods:
            rows = [r for r in over[metric] if r["method"] == method]
            overlap = all(r["min"] <= other(r)["max"] for r in rows)
            why = causes.get(_base(method)) or (
                "the fastest runs are not slower (ratio of the mins <= 1.00x): run-to-run noise on this shared"
                " machine." if all(r["min"] <= other(r)["min"] for r in rows) else
                "no cause found: the profile (operator by operator against peft's, on tiny and real models)"
                " shows the same operators, counts and sizes, and the min–max ranges of the runs overlap."
                if overlap and metric == "step_time_s" else "no cause found.")
            lines.append(f"- {_label(method)}: {why}")
    return lines + [""]


MEMORY_NOTE = """## How memory is measured

Peak memory of a step = the model's tensors (parameters and buffers, tied ones once) + the optimizer
state + the peak growth of allocated tensor memory during one step from zeroed gradients (gradients,
saved activations, temporaries; "step-growth" above). The growth is the allocator's own count: on
CUDA `torch.cuda.max_memory_allocated`; on CPU the torch profiler's memory events (every allocation
and free of torch's CPU allocator, summed in order), which is exact for tensors and independent of
the order in which configurations run. Process RSS (what `pefttutor.train.PeakMemory` samples on
CPU) is not used here: in one process that runs many configurations it only shows growth past
earlier peaks, so it is a lower bound that depends on the order of runs. Both implementations
hold the same frozen base weights, so most of a PEFT method's peak is shared; the step-growth column
shows where they differ."""


# ----------------------------------------------------------------------------- main


def _extras(out: Path) -> dict:
    """The results of benchmarks/speedups.py and time_to_accuracy.py, where they were run."""
    names = ("speedups", "time_to_accuracy")
    return {n: json.loads((out / f"{n}.json").read_text()) for n in names if (out / f"{n}.json").exists()}


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "RESULTS.md").write_text(render(result, _extras(out)))


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: pefttutor.config.get_device())")
    p.add_argument("--out", type=Path, default=HERE, help="folder for results.json and RESULTS.md")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run")
    p.add_argument("--weights", choices=["real", "random", "tiny"], default="real",
                   help="the real checkpoints, random weights of the same shapes, or tiny random models")
    p.add_argument("--repeats", type=int, help="timed runs per configuration (scaling points too)")
    p.add_argument("--warmup", type=int, help="untimed runs before them")
    p.add_argument("--models", nargs="+", choices=["smollm2", "minilm"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    p.add_argument("--sections", nargs="+", choices=["train", "latency", "scaling"])
    p.add_argument("--render-only", action="store_true", help="re-render RESULTS.md from OUT/results.json")
    a = p.parse_args(argv)
    if a.render_only:
        (a.out / "RESULTS.md").write_text(render(json.loads((a.out / "results.json").read_text()), _extras(a.out)))
        return None
    s = Settings(device=str(pt_config.get_device(a.device)), weights=a.weights, **(QUICK if a.quick else {}))
    for name in ("repeats", "warmup", "models", "methods", "variants", "sections"):
        value = getattr(a, name)
        if value is not None:
            setattr(s, name, tuple(value) if isinstance(value, list) else value)
    if a.repeats is not None:
        s.scaling_repeats = a.repeats
    pt_config.seed_everything(0)
    log(f"benchmarking on {s.device} with {torch.get_num_threads()} threads -> {a.out}")
    result = run(s)
    write(result, a.out)
    log(f"wrote {a.out / 'results.json'} and {a.out / 'RESULTS.md'} in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
