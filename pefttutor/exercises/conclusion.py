"""Exercises of notebook 06 (conclusion): counting at scale and reading the comparison."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pefttutor import calculator as calc
from pefttutor.study import report

from . import STR, Exercise, exact_count, expects

llama_adapter_7b = Exercise(
    "LLaMA-Adapter on LLaMA-7B",
    checker=exact_count(calc.peft_params("llama-7b", "llama_adapter", n_tokens=10, n_layers=30)),
    hint="Per adapted layer: 10 prompt vectors of width 4096, and one gate per head (32).",
    solution="30 * (10 * 4096 + 32)  # = 1,229,760: the paper's 1.2M",
)


def smallest_close_to_full(rows: Sequence[Mapping[str, Any]]) -> Exercise:
    """`rows`: the study's summary of a task (`report.summary`): per method its "gap" to full
    finetuning (points, standard error) and its "file_bytes". The answer: the smallest file among the
    methods not worse than full finetuning beyond noise: above it, or indistinguishable (the study's rule)."""
    close = {r["method"]: r["file_bytes"] for r in rows
             if r["method"] == "full" or (r["gap"] is not None and (r["gap"][0] > 0 or report.indistinguishable(r["gap"])))}
    best = min(close, key=close.get)

    @expects(STR)
    def checker(answer):
        return answer == best, "" if answer == best else f"{answer!r} is not it; candidates: {sorted(close)}"

    return Exercise(
        "smallest file among the methods indistinguishable from full finetuning",
        checker=checker,
        hint="Keep the rows whose Δ vs full is positive or within two standard errors of 0, then compare their files.",
        solution=f"{best!r}: {close[best] / 1e3:.1f} KB, the smallest of {len(close)} methods within noise of "
        "full finetuning (or above it)",
    )


def largest_fitting_rank(budget_gb: float = 140, max_rank: int = 4096) -> int:
    """The largest LoRA rank (Wq, Wv) whose bf16 AdamW training of LLaMA-65B fits `budget_gb` (0 if none)."""
    fits = [r for r in range(1, max_rank + 1)
            if calc.gb(calc.training_memory_bytes("llama-65b", "lora", r=r, dtype="bf16")) <= budget_gb]
    return max(fits, default=0)


_frozen_gb = calc.gb(2 * calc.total_params("llama-65b"))
_per_rank_gb = calc.gb(8 * calc.peft_params("llama-65b", "lora", r=1))
lora_65b_rank = Exercise(
    "LoRA rank that fits LLaMA-65B in 140 GB",
    checker=exact_count(largest_fitting_rank()),
    hint="Loop r over 1, 2, ... with calc.training_memory_bytes('llama-65b', 'lora', r=r, dtype='bf16') and keep "
    "the last r under 140e9 bytes. Or by hand: frozen weights 2 bytes each, every LoRA parameter 2 + 2 + 4 bytes.",
    solution=f"{largest_fitting_rank()}: the frozen bf16 weights alone take {_frozen_gb:.1f} GB; each unit of rank "
    f"adds {1e3 * _per_rank_gb:.1f} MB (80 layers x 2 matrices x r (8192 + 8192) parameters at 2 + 2 + 4 bytes).",
)
