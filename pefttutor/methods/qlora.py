"""QLoRA: LoRA on a 4-bit quantized base model, from scratch (Dettmers et al. 2023, arXiv:2305.14314).

Every targeted frozen linear layer is stored in 4 bits (NF4 codes, absmax constants double
quantized: `pefttutor.quantized.Linear4bit`) and dequantized on the fly; LoRA trains on top (eq. 5):

    h = W_hat x + b + s B A x,    W_hat = doubleDequant(c1, c2, W^NF4),  s = alpha / r

so the frozen weights cost ~4.127 bits each instead of 32, while A and B (and the gradients and
optimizer states) stay in full precision. The paper adapts every linear layer of the blocks:
the default targets here. `h` is LoRA's layer (`lora.LoRALinear`), unchanged, over a 4-bit W0.

The design:

* Quantizing is a separate, explicit step on the base model (`quantized.quantize_model`), as in
  peft + bitsandbytes (load the model in 4 bits, then add LoRA): it drops W0, which is QLoRA's
  point. QLoRA is then LoRA on those 4-bit layers, and keeps the contract: `remove` gives back the
  4-bit base bit for bit, the model it was applied to. A full-precision linear at a target is
  refused ("quantize it first"). The config records the layers' `quant_type` and `double_quant`,
  and a file loads only into a base quantized the same way (its adapter learned that base's errors).
* `merge` is refused: W_hat + s B A is no 4-bit matrix, and re-quantizing it rounds away every
  update entry smaller than half a quantization step. `to_lora(model)` gives the same model on
  full-precision W_hat (each 4-bit layer dequantized) with LoRA, which `lora.merge` folds into.
* Files hold the LoRA tensors only (as peft's); the 4-bit base is stored once with `quantized.save`.

    quantized.quantize_model(model)                    # W0 -> NF4 + double quant, all 7 block linears
    model = qlora.apply(model, r=16, alpha=32)         # LoRA on every 4-bit layer, the rest frozen
    ...train...
    qlora.save(model, "adapter.safetensors")           # A and B only
    qlora.remove(model)                                # the 4-bit base again
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from pefttutor import checks, params, quant, quantized
from pefttutor.quantized import Linear4bit

from . import lora
from .base import Method, applied
from .lora import LoRA, LoRAConfig, LoRALinear

CANNOT_MERGE = ("W0 is stored as 4-bit codes: W_hat + s B A is no 4-bit matrix, and re-quantizing it would round "
                "away every update entry smaller than half a quantization step. qlora.to_lora(model) gives the "
                "same model on full-precision W_hat, which lora.merge folds into")


@dataclass(frozen=True)
class QLoRAConfig(LoRAConfig):
    """LoRA's settings, every block linear by default, and the 4-bit format of the layers they adapt."""

    targets: tuple[str, ...] = quantized.DECODER
    quant_type: str | None = None  # None: read from the model (`apply` records it)
    double_quant: bool | None = None  # None: read from the model

    def check(self) -> None:
        super().check()
        if self.quant_type is not None:
            checks.choice(self.quant_type, "quant_type", quant.CODES)
        if self.double_quant is not None:
            checks.boolean(self.double_quant, "double_quant")


class QLoRALinear(LoRALinear):
    """LoRA's layer over a frozen Linear4bit (see the module docstring); it never merges."""

    def merge(self) -> None:
        raise ValueError(f"QLoRA cannot be merged into the frozen weights: {CANNOT_MERGE}")


class QLoRA(LoRA):
    """LoRA on every Linear4bit whose path ends with one of `targets` (see the module docstring)."""

    name, title, Config = "qlora", "QLoRA", QLoRAConfig
    must_match = (*LoRA.must_match, "quant_type", "double_quant")
    cannot_merge = CANNOT_MERGE
    layer, wraps = QLoRALinear, Linear4bit

    def check(self, model: nn.Module, config: QLoRAConfig) -> QLoRAConfig:
        found = params.find_modules(model, config.targets, (nn.Linear, Linear4bit))
        plain = sorted(p for p, m in found.items() if not isinstance(m, Linear4bit))
        if plain:
            raise ValueError(f"QLoRA's targets must be 4-bit layers; {plain[:3]}{' ...' if len(plain) > 3 else ''} "
                             "are full-precision nn.Linear: quantize them first (pefttutor.quantized.quantize_model"
                             "(model, targets)), or use lora")
        formats = {(m.quant_type, m.double_quant) for m in found.values()}
        if len(formats) > 1:
            raise ValueError(f"the targets are quantized in different formats {sorted(formats)}: one QLoRA, one format")
        (quant_type, double_quant), = formats
        for name, want, have in (("quant_type", config.quant_type, quant_type),
                                 ("double_quant", config.double_quant, double_quant)):
            if want is not None and want != have:
                raise ValueError(f"{name} must be the 4-bit layers' own: the config says {want!r}, the model's "
                                 f"layers are {have!r}")
        return dataclasses.replace(config, quant_type=quant_type, double_quant=double_quant)

    def _load(self, model, path, header, tensors):
        if header["method"] == self.name and not quantized.layers(model):
            raise ValueError(f"{path} holds a QLoRA adapter, trained on a 4-bit base; this model has no 4-bit "
                             "layers: quantize it first (quantized.quantize_model, or quantized.load a stored one)")
        return super()._load(model, path, header, tensors)


def to_lora(model: nn.Module) -> nn.Module:
    """QLoRA -> LoRA on full-precision weights, in place: QLoRA comes off, every 4-bit layer becomes
    an nn.Linear holding its W_hat (`quantized.dequantize_model`), and LoRA goes on with the same
    settings and the same A, B (and `train` modules). The outputs do not change; `lora.merge` then
    folds s B A into W_hat. QLoRA must be the only method on the model."""
    others = [name for name in applied(model) if name != METHOD.name]
    if others:
        raise ValueError(f"to_lora needs QLoRA alone on the model; remove {others} first")
    config = METHOD.get_config(model)
    tensors = {k: v.clone() for k, v in METHOD.adapter_state_dict(model).items()}
    METHOD.remove(model)
    quantized.dequantize_model(model)
    lora.apply(model, config.targets, config.r, config.alpha, config.dropout, config.rslora, train=config.train)
    lora.load_adapter_state_dict(model, tensors)
    return model


METHOD: Method = QLoRA()
METHOD.export(globals())
