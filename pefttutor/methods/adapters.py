"""Bottleneck adapters, from scratch (Houlsby et al. 2019, arXiv:1902.00751).

A frozen transformer gets small trainable bottleneck networks inside every layer:

    h <- h + W_up f(W_down h + b_down) + b_up        W_down: (m x d),  W_up: (d x m),  m << d

Each adapter adds 2md + d + m parameters (two matrices and two bias vectors). The internal skip
connection (`h +`) makes it the identity when its branch is zero, and the weights start small:
N(0, sigma^2) truncated at 2 sigma with sigma = 1e-2, biases zero, so the model starts *near* the
pretrained one (the paper: larger sigma trains worse). `init="zero"` zeroes the up-projection as
well, and the model starts *exactly* at the pretrained one. f is GELU by default, as in the paper's
reference code (adapter-bert); Pfeiffer et al. use ReLU (`activation="relu"`).

Where the adapters go (`placement`):

* "houlsby": two per layer, on the output of the attention block (after its output projection) and
  on the output of the feed-forward block, each before the residual add (Houlsby et al.);
* "pfeiffer": one per layer, on the output of the feed-forward block, before its residual add (the
  placement of Pfeiffer et al. 2020, arXiv:2005.00247; AdapterHub's version also re-applies the
  layer's LayerNorm around it, which we leave out);
* "parallel": one per layer *beside* the feed-forward block: it reads the block's input and its
  branch is added to the block's output, with no internal skip (the layer's residual already is
  one) and no scaling (He et al. 2021, arXiv:2110.04366, who also try scaling the branch by s = 4).

Unlike LoRA's B A, the nonlinearity f keeps an adapter from being folded into the pretrained
weights: it always costs extra inference time.

    model = adapters.apply(model, size=64, placement="houlsby", train=("classifier",))
    ...train...
    adapters.save(model, "adapter.safetensors")          # adapters (+ norms, head) only
    adapters.merge(model)                                 # refused: f sits between W_down and W_up

Two block layouts are recognised by module name (the names of Hugging Face's models, so
transformers' `LlamaForCausalLM` and `BertModel` work too):

* pre-LN decoder (Llama): x + o_proj(attention(norm(x))), then x + mlp(norm(x)). The adapters wrap
  `self_attn.o_proj` and `mlp`.
* post-LN encoder (BERT): LayerNorm(x + dropout(dense(...))) twice (`AddNorm`). The adapters wrap
  `attention.output.dense` and the feed-forward `output.dense`, so they sit before the residual add
  and LayerNorm; the dropout then acts on the adapter's output (the reference code applies the
  adapter after the dropout: the same in eval mode). A parallel adapter wraps the feed-forward
  `output` AddNorm: AddNorm(h, x + branch(x)) = LayerNorm(x + (FFN(x) + branch(x))), since the
  residual x *is* the feed-forward block's input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pefttutor import checks, params

from .base import Config, Method

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
INITS = ("normal", "zero")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass(frozen=True)
class BottleneckConfig(Config):
    """What `apply` did, saved with the weights."""

    size: int  # m, the bottleneck width
    placement: str = "houlsby"
    sigma: float = 1e-2  # std of the truncated-normal initial weights
    init: str = "normal"  # "zero": the up-projection starts at zero (exact identity)
    activation: str = "gelu"
    train_layernorms: bool = False  # also train every LayerNorm / RMSNorm (Houlsby et al. do)

    def check(self) -> None:
        checks.positive_int(self.size, "adapter size (bottleneck width m)")
        checks.choice(self.placement, "placement", PLACEMENTS)
        checks.number(self.sigma, "sigma (std of the initial weights)", low=0, low_open=True)
        checks.choice(self.init, "init", INITS)
        checks.choice(self.activation, "activation", ACTIVATIONS)
        checks.boolean(self.train_layernorms, "train_layernorms")


class Bottleneck(nn.Module):
    """The adapter's branch, W_up f(W_down h + b_down) + b_up: (..., d) -> (..., m) -> (..., d).

    The skip connection is added by the wrapper that places it (`SerialAdapter`), or not at all
    (`ParallelAdapter`: the layer's own residual is the skip).
    """

    def __init__(self, d: int, m: int, sigma: float = 1e-2, init: str = "normal", activation: str = "gelu",
                 device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(d, m, device=device, dtype=dtype)  # W_down: (m, d), b_down: (m,)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(m, d, device=device, dtype=dtype)  # W_up: (d, m), b_up: (d,)
        for linear in (self.down, self.up):  # near identity: small weights, zero biases
            nn.init.trunc_normal_(linear.weight, std=sigma, a=-2 * sigma, b=2 * sigma)
            nn.init.zeros_(linear.bias)
        if init == "zero":  # the branch is exactly 0: the model starts exactly at the pretrained one
            nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        return self.up(self.act(self.down(h)))  # (..., m) inside

    def extra_repr(self) -> str:
        m, d = self.down.weight.shape
        return f"2md+d+m={2 * m * d + d + m:,} params"


class AdapterWrapper(params.Wrapper):
    """A frozen submodule `base` with a `Bottleneck` `adapter` attached; subclasses say where."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base, self.adapter = base, adapter


class SerialAdapter(AdapterWrapper):
    """h = base(...); h + adapter(h): an adapter on the output of `base` (Houlsby, Pfeiffer)."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        h = self.base(*args, **kwargs)  # (B, T, d)
        return h + self.adapter(h)


class ParallelAdapter(AdapterWrapper):
    """base(x) + adapter(x): an adapter beside `base`, reading its input (He et al.)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        return self.base(x) + self.adapter(x)


class ParallelAddNormAdapter(AdapterWrapper):
    """A parallel adapter for a post-LN feed-forward block, wrapping its AddNorm `base(h, x)`.

    base(h, x) = LayerNorm(x + FFN(x)) with x the block's input (the residual) and h = the FFN's
    inner activations; passing x + adapter(x) as the residual adds the branch to the FFN's output.
    """

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:  # h (B, T, d_ff), residual (B, T, d)
        return self.base(h, residual + self.adapter(residual))


@dataclass(frozen=True)
class _Layout:
    """Where adapters go in one family of transformer blocks, by module paths inside a block."""

    name: str
    marker: str  # a module of every block (its parent is the block)
    width: str  # a linear layer of the block whose out_features is the hidden size d (maybe wrapped)
    sites: Mapping[str, tuple[tuple[str, type[AdapterWrapper]], ...]]  # placement -> (path, wrapper)


_LAYOUTS = (
    _Layout("pre-LN decoder (Llama)", marker="mlp", width="self_attn.o_proj", sites={
        "houlsby": (("self_attn.o_proj", SerialAdapter), ("mlp", SerialAdapter)),
        "pfeiffer": (("mlp", SerialAdapter),),
        "parallel": (("mlp", ParallelAdapter),),
    }),
    _Layout("post-LN encoder (BERT)", marker="intermediate", width="attention.output.dense", sites={
        "houlsby": (("attention.output.dense", SerialAdapter), ("output.dense", SerialAdapter)),
        "pfeiffer": (("output.dense", SerialAdapter),),
        "parallel": (("output", ParallelAddNormAdapter),),
    }),
)


def _blocks(model: nn.Module) -> tuple[_Layout, list[str]]:
    """The first layout whose blocks the model has, and the blocks' paths (in model order)."""
    for layout in _LAYOUTS:
        blocks = [p.rpartition(".")[0] for p, _ in model.named_modules()
                  if p == layout.marker or p.endswith("." + layout.marker)]
        blocks = [b for b in blocks if _has(model, b, layout)]
        if blocks:
            return layout, blocks
    raise ValueError("found no transformer blocks to put adapters in; known layouts: " + "; ".join(
        f"{layout.name}, blocks with {', '.join(sorted(_paths(layout)))}" for layout in _LAYOUTS))


def _paths(layout: _Layout) -> set[str]:
    return {layout.marker, layout.width, *(path for sites in layout.sites.values() for path, _ in sites)}


def _has(model: nn.Module, block: str, layout: _Layout) -> bool:
    prefix = f"{block}." if block else ""
    try:
        for path in _paths(layout):
            model.get_submodule(prefix + path)
    except AttributeError:
        return False
    return hasattr(model.get_submodule(prefix + layout.width), "out_features")  # nn.Linear, or wrapped in LoRA


def _norms(model: nn.Module) -> dict[str, nn.Module]:
    """Every LayerNorm / RMSNorm (ours, torch's or a transformers one), by module path."""
    return {p: m for p, m in model.named_modules()
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith("RMSNorm")}


def adapter_layers(model: nn.Module) -> dict[str, AdapterWrapper]:
    """Every wrapped module (one adapter each), by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, AdapterWrapper)}


class Adapters(Method):
    """Insert bottleneck adapters of width `size` (m) into every transformer block; freeze the rest.

    `placement` is "houlsby" (two per block), "pfeiffer" or "parallel" (one per block); see the
    module docstring. `train_layernorms=True` also trains (and saves) every LayerNorm/RMSNorm.
    `load` needs size, placement, activation and train_layernorms to equal the file's (sigma and
    init only matter before training).
    """

    name, title, Config = "adapters", "bottleneck adapters", BottleneckConfig
    must_match = ("size", "placement", "activation", "train_layernorms")
    cannot_merge = ("the nonlinearity f between W_down and W_up keeps the adapter out of any single "
                    "weight matrix: it always costs extra inference time")

    def _sites(self, model: nn.Module, config: BottleneckConfig) -> tuple[dict[str, type[AdapterWrapper]], int]:
        layout, blocks = _blocks(model)
        sites = {(f"{b}." if b else "") + path: wrapper for b in blocks for path, wrapper in layout.sites[config.placement]}
        d = model.get_submodule((f"{blocks[0]}." if blocks[0] else "") + layout.width).out_features
        return sites, d

    def check(self, model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
        _, d = self._sites(model, config)
        if config.size > d:
            raise ValueError(f"adapter size m={config.size} is wider than the hidden size d={d}: not a bottleneck")
        return config

    def attach(self, model: nn.Module, config: BottleneckConfig, init: bool = True) -> None:
        sites, d = self._sites(model, config)
        for path, wrapper in sites.items():
            base = model.get_submodule(path)
            weight = next(base.parameters())
            adapter = Bottleneck(d, config.size, config.sigma, config.init, config.activation,
                                 device=weight.device, dtype=weight.dtype)
            params.replace_module(model, path, wrapper(base, adapter).train(base.training))

    def detach(self, model: nn.Module) -> None:
        params.unwrap(model, adapter_layers(model))

    def modules(self, model: nn.Module, config: BottleneckConfig) -> dict[str, nn.Module]:
        own = {f"{path}.adapter": layer.adapter for path, layer in adapter_layers(model).items()}
        return {**own, **_norms(model)} if config.train_layernorms else own


METHOD = Adapters()
METHOD.export(globals())
