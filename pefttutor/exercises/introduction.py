"""Exercises of notebook 01 (introduction): memory arithmetic and parameter counts."""

from __future__ import annotations

from pefttutor import calculator as calc

from . import STR, Exercise, close_to, exact_count, expects


def adam_memory_13b() -> Exercise:
    return Exercise(
        "Adam memory of a 13B model",
        checker=close_to(calc.gb(calc.training_memory_bytes(13e9)), rel=0.01),
        hint="4 bytes each for the weight, its gradient and Adam's two moments.",
        solution="calc.gb(calc.training_memory_bytes(13e9))  # 16 bytes x 13e9 = 208 GB",
    )


def fits(method: str, budget_gb: float = 24) -> bool:
    """Does finetuning LLaMA-7B at 16 bits with `method` ("full" or "lora") fit in `budget_gb`?"""
    hparams = {"r": 8, "targets": ("q", "v")} if method == "lora" else {}
    return calc.gb(calc.training_memory_bytes("llama-7b", method, dtype="fp16", **hparams)) <= budget_gb


def what_fits_24gb() -> Exercise:
    expected = "full" if fits("full") else "lora" if fits("lora") else "neither"
    return Exercise(
        "what fits in 24 GB",
        checker=expects(STR)(lambda a: a.lower() == expected),
        hint="Full: 8 bytes per parameter at 16 bits. LoRA: 2 bytes per frozen parameter, 8 per trainable one.",
        solution="'lora': full needs 8 x 6.74e9 = 54 GB; LoRA about 2 x 6.74e9 = 13.5 GB plus 8 x 4.2M = 0.03 GB",
    )


def minilm_block_params(block_params: int) -> Exercise:
    """`block_params`: the real count, e.g. sum(p.numel() for p in enc.encoder.layer[-1].parameters())."""
    return Exercise(
        "parameters of one MiniLM block",
        checker=exact_count(block_params),
        hint="Each attention matrix is 384 x 384 + 384 biases; the MLP is 384 x 1536 + 1536 and 1536 x 384 + 384; "
        "each LayerNorm has 2 x 384.",
        solution="4 * (384 * 384 + 384) + (384 * 1536 + 1536) + (1536 * 384 + 384) + 2 * 2 * 384  # = 1,774,464",
    )
