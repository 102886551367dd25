"""4-bit NormalFloat (NF4) and FP4 blockwise quantization, with double quantization, from scratch
(QLoRA: Dettmers et al. 2023, arXiv:2305.14314).

A weight matrix is cut into blocks of 64 values; each block is divided by its absolute maximum
(its "absmax", kept in fp32), so every value lies in [-1, 1], and is rounded to the nearest of 16
code values; two 4-bit codes share a byte (the first value in the high nibble). NF4's codes are
quantiles of N(0, 1), rescaled to [-1, 1]: pretrained weights are roughly normal, so each code is
used about equally often, which is what makes a 4-bit type information-theoretically optimal for
them (the paper's section 3). NF4 has an exact zero, 8 positive and 7 negative codes.
For comparison, "int4" is the plain symmetric integer absmax code: the 15 levels k / 7, k = -7..7
(round(7 x / absmax), as LLM.int8's absmax quantization does with 8 bits), evenly spaced, so the
many values near 0 and the few in the tails get the same resolution.

Double quantization quantizes the absmax constants too: their mean is subtracted and the rest is
stored in 8 bits (bitsandbytes' signed "dynamic" code, blockwise with blocks of 256, each block's
own fp32 absmax). Per parameter that is 4 + 32/64 = 4.5 bits without it and
4 + 8/64 + 32/(64 * 256) ~ 4.127 bits with it.

    packed, state = quantize(W)                      # uint8 (numel / 2,), the state to undo it
    W_hat = dequantize(packed, state)                # the 4-bit approximation of W, in W's dtype

Written to agree byte for byte with bitsandbytes (`functional.quantize_4bit` / `dequantize_4bit`,
tested in tests/test_quant.py): the same code tables, the same nearest-code rounding (ties to the
lower code), the same order of operations. (bitsandbytes has no int4; it goes through the same code.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 64  # values per absmax
BLOCK_ABSMAX = 256  # absmax constants per 8-bit block in double quantization


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values: quantiles of N(0, 1), 8 on the positive side and 7 on the negative,
    plus an exact 0, divided by the largest so that they span [-1, 1].

    The quantiles are taken at equal steps of probability between 0.5 and `offset`, the
    probability whose quantile becomes +-1: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, halfway between the
    choices for 15 and 16 levels (the paper's appendix; bitsandbytes' `create_normal_map`).
    """
    offset = 0.9677083
    # probabilities and the final division in fp32, the quantiles in fp64: how bitsandbytes computed its table
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 values
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values.float()
    return values / values.max()


# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bits), by code: magnitudes 0, 1/32 (its subnormal),
# 4, 6, 2, 3, 1, 1.5, divided by the largest, 6; codes 8-15 are the same with the sign bit set
_FP4_MAGNITUDES = torch.tensor([0.0, 1 / 32, 4.0, 6.0, 2.0, 3.0, 1.0, 1.5]) / 6
FP4 = torch.cat([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]) + 0.0  # + 0.0: code 8 is +0, not -0
# int4: symmetric absmax integers, 15 levels (-8 is left out so that +-1 both exist and 0 is exact)
INT4 = torch.arange(-7, 8, dtype=torch.float32) / 7
CODES = {"nf4": nf4_code(), "fp4": FP4, "int4": INT4}


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2015, arXiv:1511.04561), sorted: for
    exponents 10^-6 .. 10^0, the midpoints of 2^i + 1 linear steps in [0.1, 1], both signs, plus 0 and 1."""
    values = []
    for i in range(7):
        steps = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (steps[:-1] + steps[1:]) / 2
        values += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values + [0.0] * (256 - len(values))), dtype=torch.float32)


@dataclass
class QuantState:
    """What `dequantize` needs: the shape and dtype, the code, and the (maybe double-quantized) absmax."""

    shape: torch.Size
    dtype: torch.dtype
    quant_type: str
    absmax: torch.Tensor  # fp32 (n_blocks,), or uint8 codes with double quantization
    offset: torch.Tensor | None = None  # double quantization: the absmax mean subtracted first
    absmax2: torch.Tensor | None = None  # double quantization: fp32 absmax of each 256-block of absmax codes


def _scaled_blocks(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values / their block's absmax, clamped to [-1, 1], absmax per block); a last partial block is its own."""
    n = flat.numel()
    full = n - n % block
    absmax = flat[:full].view(-1, block).abs().amax(dim=1)
    scaled = (flat[:full].view(-1, block) * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    return scaled, absmax


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (ties to the lower value): a search over the midpoints."""
    order = code.argsort()
    sorted_code = code[order]
    return order[torch.bucketize(scaled, (sorted_code[:-1] + sorted_code[1:]) / 2)]


def quantize(A: torch.Tensor, quant_type: str = "nf4", double_quant: bool = False) -> tuple[torch.Tensor, QuantState]:
    """4-bit blockwise quantization of a float tensor: (packed uint8 codes, the state to undo it).

    `quant_type`: "nf4" or "fp4" (bitsandbytes' codes) or "int4" (15 evenly spaced levels, ours)."""
    if quant_type not in CODES:
        raise ValueError(f"unknown quant_type {quant_type!r}; valid: {', '.join(CODES)}")
    if A.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize takes fp32, bf16 or fp16 tensors, got {A.dtype}")
    scaled, absmax = _scaled_blocks(A.reshape(-1).float(), BLOCK)
    if scaled.numel() % 2:  # an odd count: the last byte's low nibble codes a 0
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    q = _nearest(scaled, CODES[quant_type].to(A.device)).to(torch.uint8)
    packed = (q[::2] << 4) | q[1::2]  # the first value in the high nibble
    state = QuantState(A.shape, A.dtype, quant_type, absmax)
    if double_quant:
        state.offset = absmax.mean()
        scaled2, state.absmax2 = _scaled_blocks(absmax - state.offset, BLOCK_ABSMAX)
        state.absmax = _nearest(scaled2, dynamic_code().to(A.device)).to(torch.uint8)
    return packed, state


def _unscaled_blocks(values: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """values * their block's absmax (the inverse of `_scaled_blocks`, in fp32)."""
    n = values.numel()
    full = n - n % block
    out = (values[:full].view(-1, block) * absmax[:full // block, None]).reshape(-1)
    return torch.cat([out, values[full:] * absmax[-1]]) if full < n else out


def dequantize(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The 4-bit approximation of the quantized tensor, in its shape and dtype (computed in fp32)."""
    absmax = state.absmax
    if state.absmax2 is not None:
        absmax = _unscaled_blocks(dynamic_code().to(packed.device)[absmax.long()], state.absmax2, BLOCK_ABSMAX)
        absmax = absmax + state.offset
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()[:state.shape.numel()]
    values = CODES[state.quant_type].to(packed.device)[q]
    return _unscaled_blocks(values, absmax, BLOCK).view(state.shape).to(state.dtype)


def bits_per_parameter(double_quant: bool) -> float:
    """Storage per weight: 4 bits of code, plus the absmax constants' share."""
    return 4 + (8 / BLOCK + 32 / (BLOCK * BLOCK_ABSMAX) if double_quant else 32 / BLOCK)
