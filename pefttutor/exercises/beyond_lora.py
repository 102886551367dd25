"""Exercises of notebook 07 (beyond LoRA: QLoRA, DoRA, IA3): the storage of double quantization,
DoRA's extra parameters, and an experiment on which layers 4 bits hurt. Checkers derive their
answers from the block sizes, the calculator's shapes and the model itself."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

from torch import nn

from pefttutor import calculator, quant, quantized

from . import INT, NUMBER, Exercise, expects

MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def bits_with_double_quant() -> Exercise:
    """Bits per weight of a large matrix in NF4 with double quantization (blocks of 64, then 256)."""
    bits, without = quant.bits_per_parameter(True), quant.bits_per_parameter(False)

    @expects(NUMBER)
    def checker(answer):
        if abs(answer - bits) <= 1e-3:
            return True, f"{bits:.4f} bits: {without:g} without double quantization, 32 in fp32"
        if abs(answer - without) <= 1e-3:
            return False, f"{without:g} is without double quantization: the 64-block constants are then fp32"
        if abs(answer - (4 + 8 / quant.BLOCK)) <= 1e-3:
            return False, "close: the 8-bit constants have their own fp32 absmax, one per 256 of them"
        return False, f"got {answer:g}"

    return Exercise(
        "bits per weight, NF4 with double quantization",
        checker=checker,
        hint=f"4 bits of code per weight; one 8-bit absmax per block of {quant.BLOCK} weights; and one fp32 "
        f"constant per block of {quant.BLOCK_ABSMAX} absmax, so per {quant.BLOCK} x {quant.BLOCK_ABSMAX} weights.",
        solution=f"4 + 8 / {quant.BLOCK} + 32 / ({quant.BLOCK} * {quant.BLOCK_ABSMAX})  # = {bits:.4f}",
    )


def dora_extra_params(arch: str = "llama-7b", targets: tuple[str, ...] = ("q", "v"), r: int = 8) -> Exercise:
    """How many trainable parameters DoRA adds to LoRA (same r, same targets) on `arch`."""
    a = calculator.get_arch(arch)
    lora_n = calculator.peft_params(a, "lora", r=r, targets=targets)
    extra = calculator.peft_params(a, "dora", r=r, targets=targets) - lora_n
    shapes = calculator.block_linears(a)
    outs = " + ".join(str(shapes[t][1]) for t in targets)

    @expects(INT)
    def checker(answer):
        if answer == extra:
            return True, f"{extra:,} magnitudes, {extra / lora_n:.1%} on top of LoRA's {lora_n:,}"
        if answer == extra + lora_n:
            return False, f"that is DoRA's total; the question is what it adds to LoRA's {lora_n:,}"
        if answer == a.n_layers * sum(shapes[t][0] for t in targets):
            return False, "one magnitude per output row (peft's norm is over each row of W, dim=1), not per input"
        return False, f"you have {answer:,}"

    return Exercise(
        f"DoRA's extra parameters, r={r} on {', '.join(targets)} of {a.name}",
        checker=checker,
        hint="m has one entry per output feature of each adapted matrix, in every layer; r does not enter.",
        solution=f"{a.n_layers} * ({outs})  # = {extra:,}",
    )


def mlp_only_loss(model: nn.Module, val_loss: Callable[[nn.Module], float]) -> Exercise:
    """The experiment: `val_loss` of `model` with only its feed-forward matrices in NF4 (double
    quantization), the attention in full precision. The checker quantizes copies itself (once, at the
    first check): the MLP only, the attention only, and both, for its message; within 0.0005."""

    @functools.cache
    def losses() -> dict[str, float]:
        out = {"none": val_loss(model)}
        for name, targets in (("mlp", MLP), ("attention", ATTENTION), ("both", MLP + ATTENTION)):
            q = quantized.quantize_model(copy.deepcopy(model), targets)
            out[name] = val_loss(q)
            del q
        return out

    @expects(NUMBER)
    def checker(answer):
        got = losses()
        cost = {k: got[k] - got["none"] for k in ("mlp", "attention", "both")}
        if abs(answer - got["mlp"]) <= 5e-4:
            worse = "the MLP" if cost["mlp"] > cost["attention"] else "the attention"
            return True, (f"{got['mlp']:.3f}: +{cost['mlp']:.3f} over full precision, against +{cost['attention']:.3f} "
                          f"for the attention alone and +{cost['both']:.3f} for both; 4 bits hurt {worse} more")
        if abs(answer - got["both"]) <= 5e-4:
            return False, "that is every linear in 4 bits: quantize only gate_proj, up_proj and down_proj"
        if abs(answer - got["attention"]) <= 5e-4:
            return False, "that is the attention quantized: the feed-forward matrices are gate_proj, up_proj, down_proj"
        if abs(answer - got["none"]) <= 5e-4:
            return False, "that is the full-precision model: quantize a copy first (quantized.quantize_model)"
        return False, f"got {answer:.3f}"

    return Exercise(
        "validation loss with the MLP in NF4",
        checker=checker,
        hint="quantized.quantize_model(copy.deepcopy(llm), [\"gate_proj\", \"up_proj\", \"down_proj\"]) quantizes only "
        "those (the copy keeps llm in full precision); then val_loss, as section 1 measured the whole model.",
        solution="answer = val_loss(quantized.quantize_model(copy.deepcopy(llm), [\"gate_proj\", \"up_proj\", \"down_proj\"]))",
    )
