"""LoRA: Low-Rank Adaptation, from scratch (Hu et al. 2021, arXiv:2106.09685).

A pretrained weight W0 (d_out x d_in) stays frozen; its update is learned in low-rank form:

    h = W0 x + b + (alpha / r) B A x        A: (r x d_in),  B: (d_out x r),  r << min(d_in, d_out)

so each adapted matrix adds only r (d_in + d_out) trainable parameters instead of d_in d_out.
B starts at zero, so training starts exactly from the pretrained model. After training, B A can be
folded into W0 (`merge`) and inference costs nothing extra.

    model = lora.apply(model, ("q_proj", "v_proj"), r=8, alpha=16)   # freeze all, inject A and B
    ...train...
    lora.save(model, "adapter.safetensors")                         # a few MB, not the model
    lora.merge(model)                                               # W0 <- W0 + (alpha/r) B A
    lora.remove(model)                                              # (unmerged) the base model back

`apply`, `save`, `load`, `merge` and the rest are the contract every method keeps (`base.py`).

Parameter names follow HF peft, so an export is just a key prefix (see `pefttutor.interop`):
the layer at `model.layers.0.self_attn.q_proj` holds A at `...q_proj.lora_A.weight` and B at
`...q_proj.lora_B.weight`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from pefttutor import checks, params

from .base import Config, Method


@dataclass(frozen=True)
class LoRAConfig(Config):
    """What `apply` did, saved with the weights."""

    targets: tuple[str, ...]  # module-path suffixes of the adapted nn.Linear layers
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False

    def check(self) -> None:
        self._set("targets", checks.names(self.targets, "targets"))
        checks.positive_int(self.r, "LoRA rank r")
        checks.number(self.alpha, "alpha", nonzero=True)  # alpha = 0 would zero the update: nothing trains
        checks.number(self.dropout, "dropout", low=0, high=1, high_open=True)
        checks.boolean(self.rslora, "rslora")


def scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """s = alpha / r as in the paper; alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732),
    which keeps the update's size stable as r grows."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(params.LinearWrapper):
    """h = W0 x + b + s B A x with s = alpha / r (or alpha / sqrt(r) with rsLoRA).

    - W0, b: the frozen pretrained `nn.Linear`, kept whole as `self.base` (W0 = `self.base.weight`).
    - A (r x d_in) = `self.lora_A.weight`: random. The paper says Gaussian; its reference code
      (loralib) and HF peft use kaiming-uniform, PyTorch's default for nn.Linear, and so do we.
      Any small random A works: what matters is that B A = 0 at the start.
    - B (d_out x r) = `self.lora_B.weight`: zeros, so the layer starts equal to the base layer.
    - Dropout (if any) acts on the input of the LoRA path only, in training mode only.

    `merge()` folds s B A into W0 for free inference; `unmerge()` takes it out again (whether it is
    merged travels with the state_dict: `params.LinearWrapper`).
    """

    def __init__(
        self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False
    ):
        super().__init__()
        checks.positive_int(r, "LoRA rank r")
        W0 = base.weight  # read once (a 4-bit layer dequantizes it on each read)
        d_out, d_in = W0.shape
        if r > min(d_in, d_out):
            raise ValueError(f"LoRA rank r={r} is above min(d_in, d_out) = {min(d_in, d_out)}: B A would not be low-rank")
        like = {"device": W0.device, "dtype": W0.dtype}
        self.base = base  # W0: (d_out, d_in), b: (d_out,)
        self.lora_A = nn.Linear(d_in, r, bias=False, **like)  # A: (r, d_in)
        self.lora_B = nn.Linear(r, d_out, bias=False, **like)  # B: (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.r = r
        self.scaling = scaling(r, alpha, rslora)

    def delta_weight(self) -> torch.Tensor:
        """s B A: (d_out, r) @ (r, d_in) -> (d_out, d_in), the learned update of W0."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) -> (..., d_out)
        if self.merged:
            self.refuse_training_when_merged("LoRA")
            return self.base(x)  # W0 already holds W0 + s B A
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + s B A. A no-op when already merged."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - s B A (equal to the original W0 up to float rounding). A no-op when not merged."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        d_out, d_in = self.out_features, self.in_features
        n = self.r * (d_in + d_out)
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}, r(d_in+d_out)={n:,} params"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model, by module path."""
    return METHOD.layers(model)


class LoRA(Method):
    """Wrap every nn.Linear whose path ends with one of `targets` in a LoRALinear; freeze the rest.

    Works on any nn.Module. Merging is refused for a W0 shared with another module (a tied
    lm_head): it would change that one too. `load` needs r, alpha and rslora to equal the file's
    (dropout may differ: it only acts in training).
    """

    name, title, Config = "lora", "LoRA", LoRAConfig
    must_match = ("r", "alpha", "rslora")
    layer: type[LoRALinear] = LoRALinear  # a variant (DoRA) subclasses the layer and this method
    wraps: type[nn.Module] = nn.Linear  # the frozen layers it adapts (QLoRA: 4-bit ones)

    def layers(self, model: nn.Module) -> dict[str, LoRALinear]:
        """This method's layers (of exactly its type, so that variants stack), by module path."""
        return {path: m for path, m in model.named_modules() if type(m) is self.layer}

    def attach(self, model: nn.Module, config: LoRAConfig, init: bool = True) -> None:
        # r above min(d_in, d_out) is refused by the layer
        params.wrap_linears(model, config.targets,
                            lambda linear: self.layer(linear, config.r, config.alpha, config.dropout, config.rslora),
                            self.wraps)

    def detach(self, model: nn.Module) -> None:
        params.unwrap(model, self.layers(model))

    def modules(self, model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
        return {f"{path}.{part}": getattr(layer, part) for path, layer in self.layers(model).items()
                for part in ("lora_A", "lora_B")}

    def merged(self, model: nn.Module) -> bool:
        return any(layer.merged for layer in self.layers(model).values())

    def _merge(self, model: nn.Module) -> None:
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        tied = sorted(path for path, layer in self.layers(model).items() if uses[id(layer.base.weight)] > 1)
        if tied:
            raise ValueError(f"cannot merge into {tied}: W0 is tied to another module, which merging would change")
        for layer in self.layers(model).values():
            layer.merge()

    def _unmerge(self, model: nn.Module) -> None:
        for layer in self.layers(model).values():
            layer.unmerge()


METHOD = LoRA()
METHOD.export(globals())
