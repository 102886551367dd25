"""A model whose linear layers are stored in 4 bits: QLoRA's frozen base, from scratch
(Dettmers et al. 2023, arXiv:2305.14314).

QLoRA keeps no full-precision copy of a frozen weight W0: it stores the 4-bit codes and the absmax
constants (`pefttutor.quant`) and dequantizes on the fly, computing in the input's dtype (eq. 5-6):

    Y = X doubleDequant(c1, c2, W^4bit) + b,   doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W) = W_hat

c2: the per-64-block absmax constants (8-bit codes with double quantization), c1: their fp32
absmax per block of 256. The bias stays in full precision. `Linear4bit` is that layer: bit for bit
what `bitsandbytes.nn.Linear4bit` computes on its reference path (dequantize, then F.linear), and to
bf16 precision what its fused CPU inference kernel computes (tests/test_quantized.py); 4.127 bits
per weight with double quantization instead of 32.

Quantizing is an explicit, one-way step on the base model, before any method is applied: W0 is
dropped, and what comes back from a 4-bit layer is W_hat, not W0.

    quantize_model(model)                        # every decoder linear -> Linear4bit (NF4, double quant)
    save(model, "base-4bit.safetensors")         # packed codes + constants, everything else as it is
    load(Llama(config), "base-4bit.safetensors") # the same 4-bit model again, bit for bit
    dequantize_model(model)                      # each Linear4bit -> an nn.Linear holding W_hat
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save as serialize
from torch import nn

from pefttutor import checkpoint, checks, params, quant

DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # QLoRA: every block linear
HEADER = "pefttutor_4bit"  # the safetensors metadata key of a stored 4-bit model's layer list


class _Matmul4bit(torch.autograd.Function):
    """x W_hat^T + b. W0 is frozen, so backward needs only dL/dx = dL/dy W_hat (and dL/db): W_hat is
    dequantized again there instead of kept for it (keeping it would cost what the 4 bits saved)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return F.linear(x, layer.weight_as(x.dtype), bias)  # the bias inside: one rounding, as bnb

    @staticmethod
    def backward(ctx, grad):
        dx = grad @ ctx.layer.weight_as(grad.dtype) if ctx.needs_input_grad[0] else None
        db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx, db, None


class Linear4bit(nn.Module):
    """A frozen nn.Linear stored in 4 bits: y = x W_hat^T + b, W_hat dequantized in every forward.

    Buffers (in the state_dict, never trained): `codes` uint8, two 4-bit codes a byte; `absmax` one
    per block of 64 weights, fp32, or uint8 codes with double quantization, which adds `absmax2`
    (fp32, one per 256 absmax) and `offset` (their mean). `bias` stays a full-precision Parameter.

    Computes in `compute_dtype`, else in autocast's dtype, else in the input's; returns the input's
    dtype (under autocast: autocast's, as nn.Linear does). `weight` is W_hat, dequantized on each
    read, for code that reads a layer's shape or dtype: writing into it changes nothing.
    Keep the model's dtype as it is (model.to(torch.bfloat16) would round the fp32 constants):
    use autocast or `compute_dtype` instead.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 double_quant: bool = True, dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None, device=None):
        super().__init__()
        checks.choice(quant_type, "quant_type", quant.CODES)
        checks.boolean(double_quant, "double_quant")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.double_quant = quant_type, double_quant
        self.dtype, self.compute_dtype = dtype, compute_dtype  # W_hat's dtype (W0's), the matmul's
        self._cache: dict[torch.dtype, torch.Tensor] | None = None  # W_hat by dtype, inside dequantize_once
        n = in_features * out_features
        blocks = math.ceil(n / quant.BLOCK)
        self.register_buffer("codes", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8 if double_quant else torch.float32,
                                                   device=device))
        if double_quant:
            self.register_buffer("absmax2", torch.zeros(math.ceil(blocks / quant.BLOCK_ABSMAX), device=device))
            self.register_buffer("offset", torch.zeros((), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """The 4-bit version of `linear` (its W0 quantized; its bias copied, in its dtype)."""
        W0 = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type, double_quant,
                    W0.dtype, compute_dtype, W0.device)
        codes, state = quant.quantize(W0, quant_type, double_quant)
        with torch.no_grad():
            layer.codes.copy_(codes)
            layer.absmax.copy_(state.absmax)
            if double_quant:
                layer.absmax2.copy_(state.absmax2)
                layer.offset.copy_(state.offset)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer.train(linear.training)

    def quant_state(self) -> quant.QuantState:
        return quant.QuantState(torch.Size((self.out_features, self.in_features)), self.dtype, self.quant_type,
                                self.absmax, getattr(self, "offset", None), getattr(self, "absmax2", None))

    def dequantized(self) -> torch.Tensor:
        """W_hat: (d_out, d_in), in the dtype W0 had."""
        return quant.dequantize(self.codes, self.quant_state())

    weight = property(dequantized)

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """W_hat in `dtype`: dequantized now, or kept from the first call inside `dequantize_once`."""
        cache = self._cache
        if cache is None:
            return self.dequantized().to(dtype)
        if dtype not in cache:
            cache[dtype] = self.dequantized().to(dtype)
        return cache[dtype]

    def stored_bytes(self) -> int:
        """Bytes of the quantized weight: codes and constants (the bias not included)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = self.compute_dtype or (torch.get_autocast_dtype(x.device.type) if autocast else x.dtype)
        with torch.autocast(x.device.type, enabled=False):  # the dtype is chosen above, once
            y = _Matmul4bit.apply(x.to(dtype), None if self.bias is None else self.bias.to(dtype), self)
        return y if autocast and self.compute_dtype is None else y.to(x.dtype)

    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding W_hat (and the bias): what this layer computes, in full precision."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.codes.device,
                           dtype=self.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.train(self.training)

    def extra_repr(self) -> str:
        bits = 8 * self.stored_bytes() / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, double_quant={self.double_quant}, {bits:.3f} bits/weight")


@contextlib.contextmanager
def dequantize_once(model: nn.Module):
    """Inside, each Linear4bit dequantizes once and keeps W_hat: for generation, where every new
    token is a forward through every layer (a fresh dequantization each time costs more than the
    token's matmuls). The same numbers, W_hat's memory held meanwhile; no-op without 4-bit layers."""
    found = layers(model).values()
    for layer in found:
        layer._cache = {}
    try:
        yield model
    finally:
        for layer in found:
            layer._cache = None


def layers(model: nn.Module) -> dict[str, Linear4bit]:
    """Every Linear4bit in the model, by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, Linear4bit)}


def _refuse_methods(model: nn.Module, what: str) -> None:
    from pefttutor.methods import applied  # lazy: the methods import this module

    if applied(model):
        raise ValueError(f"{what} the base model, with no method applied: this one has {list(applied(model))} "
                         "(remove them first)")


def quantize_model(model: nn.Module, targets=DECODER, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every nn.Linear matching `targets` by its Linear4bit, in place; returns the model.

    One way: W0 is dropped (a 4-bit layer only gives back W_hat). Nothing changes when any layer fails.
    """
    _refuse_methods(model, "quantize")
    found = params.find_modules(model, targets)  # a typo lists the valid names
    new = {path: Linear4bit.from_linear(linear, quant_type, double_quant, compute_dtype)
           for path, linear in found.items()}
    for path, layer in new.items():
        params.replace_module(model, path, layer)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every Linear4bit by an nn.Linear holding W_hat (not W0: that is gone), in place."""
    _refuse_methods(model, "dequantize")
    for path, layer in layers(model).items():
        params.replace_module(model, path, layer.to_linear())
    return model


def _unique(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor once (SmolLM2's LM head is its embedding matrix; safetensors refuses shared storage)."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else k
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the 4-bit model to one safetensors file, atomically: every tensor of its state_dict
    (packed codes and constants of each Linear4bit) and, in the metadata, what each 4-bit layer is."""
    _refuse_methods(model, "save")
    spec = {p: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                "quant_type": m.quant_type, "double_quant": m.double_quant, "dtype": str(m.dtype).split(".")[-1],
                "compute_dtype": m.compute_dtype and str(m.compute_dtype).split(".")[-1]}
            for p, m in layers(model).items()}
    tensors = {k: v.detach().contiguous() for k, v in _unique(model.state_dict()).items()}
    checkpoint.write_atomic(path, serialize(tensors, metadata={"format": "pt", HEADER: json.dumps(spec)}))


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a file written by `save` into a model of the same architecture (its weights are
    overwritten): the file's 4-bit layers replace its linears, then every tensor is copied, keys
    and shapes exactly (`checkpoint.load_strict`). On any failure the model is as before."""
    _refuse_methods(model, "load into")
    metadata, tensors = checkpoint.read_file(path)
    if HEADER not in metadata:
        raise ValueError(f"{path} is not a stored 4-bit model (no {HEADER!r} metadata; an adapter file loads with "
                         "pefttutor.methods.load)")
    dtype = lambda name: name and getattr(torch, name)  # noqa: E731
    replaced = {}
    try:
        for p, s in json.loads(metadata[HEADER]).items():
            old = model.get_submodule(p)
            device = next(old.parameters(), torch.empty(0)).device
            new = Linear4bit(s["in_features"], s["out_features"], s["bias"], s["quant_type"], s["double_quant"],
                             dtype(s["dtype"]), dtype(s["compute_dtype"]), device)
            params.replace_module(model, p, new.train(old.training))
            replaced[p] = old
        checkpoint.load_strict(_unique(model.state_dict()), tensors)  # every key and shape, or nothing is copied
    except BaseException as error:
        for p, old in replaced.items():
            params.replace_module(model, p, old)
        if isinstance(error, (ValueError, AttributeError, KeyError, TypeError)):
            raise ValueError(f"{path} does not fit this model: {error}") from None
        raise
    return model
