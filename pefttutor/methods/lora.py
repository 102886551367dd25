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

Parameter names follow HF peft, so an export is just a key prefix (see `pefttutor.interop`):
the layer at `model.layers.0.self_attn.q_proj` holds A at `...q_proj.lora_A.weight` and B at
`...q_proj.lora_B.weight`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pefttutor import checkpoint, params

_METADATA_KEY = "pefttutor.lora"  # the LoRAConfig as JSON in the safetensors header


@dataclass(frozen=True)
class LoRAConfig:
    """What `apply` did; kept on the model as `model.lora_config` and saved with the weights."""

    targets: tuple[str, ...]  # module-path suffixes of the adapted nn.Linear layers
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False
    train: tuple[str, ...] = ()  # modules trained in full beside LoRA (e.g. a classifier head)


def scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """s = alpha / r as in the paper; alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732),
    which keeps the update's size stable as r grows."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """h = W0 x + b + s B A x with s = alpha / r (or alpha / sqrt(r) with rsLoRA).

    - W0, b: the frozen pretrained `nn.Linear`, kept whole as `self.base` (W0 = `self.base.weight`).
    - A (r x d_in) = `self.lora_A.weight`: random. The paper says Gaussian; its reference code
      (loralib) and HF peft use kaiming-uniform, PyTorch's default for nn.Linear, and so do we.
      Any small random A works: what matters is that B A = 0 at the start.
    - B (d_out x r) = `self.lora_B.weight`: zeros, so the layer starts equal to the base layer.
    - Dropout (if any) acts on the input of the LoRA path only, in training mode only.

    `merge()` folds s B A into W0 for free inference; `unmerge()` takes it out again.
    """

    def __init__(
        self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False
    ):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        d_out, d_in = base.weight.shape
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base = base  # W0: (d_out, d_in), b: (d_out,)
        self.lora_A = nn.Linear(d_in, r, bias=False, **like)  # A: (r, d_in)
        self.lora_B = nn.Linear(r, d_out, bias=False, **like)  # B: (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.r = r
        self.scaling = scaling(r, alpha, rslora)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """s B A: (d_out, r) @ (r, d_in) -> (d_out, d_in), the learned update of W0."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) -> (..., d_out)
        if self.merged:
            if self.training:  # the LoRA path is gone: no dropout, no gradient to A and B
                raise RuntimeError(
                    "a merged LoRA layer is for inference: call model.eval(), or lora.unmerge(model) to train"
                )
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
        d_out, d_in = self.base.weight.shape
        n = self.r * (d_in + d_out)
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}, r(d_in+d_out)={n:,} params"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model, by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply(
    model: nn.Module,
    targets: str | Iterable[str],
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rslora: bool = False,
    train: str | Iterable[str] = (),
) -> nn.Module:
    """Wrap every nn.Linear whose path ends with one of `targets` in a LoRALinear; freeze the rest.

    Modules named in `train` (e.g. "classifier") stay fully trainable. Works on any nn.Module.
    A target that matches nothing raises ValueError listing the valid names; so does applying twice.
    Returns the model (changed in place), with the settings recorded as `model.lora_config`.
    """
    if lora_layers(model) or hasattr(model, "lora_config"):
        raise ValueError("this model already has LoRA layers; apply LoRA once, to a fresh model")
    config = LoRAConfig(
        targets=(targets,) if isinstance(targets, str) else tuple(targets),
        r=r, alpha=alpha, dropout=dropout, rslora=rslora,
        train=(train,) if isinstance(train, str) else tuple(train),
    )
    layers = params.find_modules(model, config.targets)  # raises, listing valid names, on a typo
    heads = params.find_modules(model, config.train, nn.Module) if config.train else {}
    clash = sorted(p for p in layers for h in heads if p == h or p.startswith(h + "."))
    if clash:
        raise ValueError(f"{clash} are both LoRA targets and inside `train` modules {sorted(heads)}: pick one")
    params.freeze(model)
    for path, linear in layers.items():
        parent, _, name = path.rpartition(".")
        new = LoRALinear(linear, r, alpha, dropout, rslora).train(linear.training)  # keep eval/train mode
        setattr(model.get_submodule(parent), name, new)
    params.unfreeze(model, config.train)
    model.lora_config = config
    return model


def get_config(model: nn.Module) -> LoRAConfig:
    """The model's LoRAConfig; ValueError if LoRA was never applied."""
    return checkpoint.attached_config(
        model, "lora_config", LoRAConfig, "this model has no LoRA: call lora.apply(model, targets) first"
    )


def merge(model: nn.Module) -> nn.Module:
    """Fold s B A into W0 in every LoRA layer (idempotent). Use with model.eval().

    Refused for a W0 shared with another module (a tied lm_head): merging would change that one too.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = sorted(path for path, layer in lora_layers(model).items() if uses[id(layer.base.weight)] > 1)
    if tied:
        raise ValueError(f"cannot merge into {tied}: W0 is tied to another module, which merging would change")
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (idempotent): W0 back to the pretrained weights up to float rounding."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: A and B of every LoRA layer plus the `train` modules' state.

    Keys are the model's own state_dict keys (`<path>.lora_A.weight`, `<path>.lora_B.weight`,
    `<train path>.weight`, ...); the tensors share memory with the model.
    """
    config = get_config(model)
    state = {}
    for path, layer in lora_layers(model).items():
        state[f"{path}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{path}.lora_B.weight"] = layer.lora_B.weight.detach()
    heads = params.find_modules(model, config.train, nn.Module) if config.train else {}
    for path, module in heads.items():
        state.update({f"{path}.{k}": v for k, v in module.state_dict().items()})
    return state


def load_adapter_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy `tensors` into the model's adapter, strictly (`checkpoint.load_strict`): exactly the keys
    of `adapter_state_dict(model)`, each with `prefix` in front, else ValueError and nothing loaded."""
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("cannot load into a merged model: call lora.unmerge(model) first")
    checkpoint.load_strict(adapter_state_dict(model), tensors, prefix)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write only the adapter (see `adapter_state_dict`) and its LoRAConfig to a safetensors file, atomically."""
    checkpoint.save(adapter_state_dict(model), path, _METADATA_KEY, asdict(get_config(model)))


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter written by `save`. Returns the model.

    On a model without LoRA, LoRA is first applied with the saved settings. On a model that has
    LoRA, r, alpha and rslora must equal the saved ones (dropout may differ: it only acts in
    training). Keys and shapes are checked strictly (`load_adapter_state_dict`).
    """
    saved, tensors = checkpoint.read(path, _METADATA_KEY, "LoRA", LoRAConfig)
    if not hasattr(model, "lora_config"):
        apply(model, **asdict(saved))
    checkpoint.require_same(get_config(model), saved, ("r", "alpha", "rslora"), path, "LoRA")
    load_adapter_state_dict(model, tensors)
    return model
