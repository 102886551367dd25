"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations, from scratch
(Liu et al. 2022, arXiv:2205.05638).

The frozen model is rescaled by learned vectors: the keys and values of every attention layer,
and the input of the feed-forward block's output projection,

    k <- l_k * k,   v <- l_v * v,   FFN(x) = W_down (l_ff * f(W_up x))       each l starts at 1

so training starts exactly at the pretrained model. A target layer's vector scales its output
(h = l * (W x + b), l: (d_out,)) or, for a feed-forward target, its input (h = W (l * x) + b,
l: (d_in,)). Trainable: one number per scaled feature (SmolLM2: 30 x (192 + 192 + 1536) = 57,600,
0.04%). Both fold into W: diag(l) W (and l * b) for outputs, W diag(l) for inputs, so `merge` leaves
no extra inference cost.

    model = ia3.apply(model, ("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",))

Targets and layout follow HF peft's `IA3Config` (Llama: k_proj, v_proj, down_proj; BERT: key,
value, output.dense, feed-forward output.dense); the vector is `ia3_l`, shaped as peft's:
(d_out, 1) for outputs, (1, d_in) for inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pefttutor import checks, params

from .base import Config, Method


@dataclass(frozen=True)
class IA3Config(Config):
    """What `apply` did, saved with the weights."""

    targets: tuple[str, ...]  # module-path suffixes of the rescaled nn.Linear layers
    feedforward: tuple[str, ...] = ()  # those of them whose input (not output) is rescaled

    def check(self) -> None:
        self._set("targets", checks.names(self.targets, "targets"))
        self._set("feedforward", checks.names(self.feedforward, "feedforward"))
        stray = sorted(set(self.feedforward) - set(self.targets))
        if stray:
            raise ValueError(f"feedforward names {stray} must also be targets {list(self.targets)}")


class IA3Linear(params.LinearWrapper):
    """h = l * (W x + b) (l: (d_out, 1)), or h = W (l * x) + b for a feed-forward layer (l: (1, d_in))."""

    def __init__(self, base: nn.Linear, feedforward: bool = False):
        super().__init__()
        self.base, self.feedforward = base, feedforward
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        if self.merged:
            self.refuse_training_when_merged("IA3")
            return self.base(x)
        if self.feedforward:
            return self.base(x * self.ia3_l.flatten())
        return self.base(x) * self.ia3_l.flatten()

    @torch.no_grad()
    def merge(self) -> None:
        """W <- diag(l) W, b <- l * b (outputs) or W <- W diag(l) (inputs). A no-op when merged."""
        if not self.merged:
            self.base.weight.mul_(self.ia3_l)  # (d_out, 1) scales rows, (1, d_in) columns
            if not self.feedforward and self.base.bias is not None:
                self.base.bias.mul_(self.ia3_l.flatten())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide l out again (equal up to rounding; an l of 0 cannot be undone and is refused)."""
        if self.merged:
            if not self.ia3_l.all():
                raise ValueError("an IA3 vector has a 0 entry: that feature was zeroed in W and cannot be unmerged")
            self.base.weight.div_(self.ia3_l)
            if not self.feedforward and self.base.bias is not None:
                self.base.bias.div_(self.ia3_l.flatten())
            self.merged = False

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, merged={self.merged}, {self.ia3_l.numel():,} params"


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    """Every IA3Linear in the model, by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, IA3Linear)}


class IA3(Method):
    """Wrap every nn.Linear whose path ends with one of `targets` in an IA3Linear; freeze the rest.

    `feedforward` names the targets whose input is scaled (peft's `feedforward_modules`).
    """

    name, title, Config = "ia3", "IA3", IA3Config
    must_match = ("targets", "feedforward")

    def attach(self, model: nn.Module, config: IA3Config, init: bool = True) -> None:
        feedforward = set(params.find_modules(model, config.feedforward).values()) if config.feedforward else set()
        params.wrap_linears(model, config.targets, lambda linear: IA3Linear(linear, feedforward=linear in feedforward))

    def detach(self, model: nn.Module) -> None:
        params.unwrap(model, ia3_layers(model))

    def modules(self, model: nn.Module, config: IA3Config) -> dict[str, nn.Module]:
        return {f"{path}.ia3_l": layer.ia3_l for path, layer in ia3_layers(model).items()}

    def merged(self, model: nn.Module) -> bool:
        return any(layer.merged for layer in ia3_layers(model).values())

    def _merge(self, model: nn.Module) -> None:
        for layer in ia3_layers(model).values():
            layer.merge()

    def _unmerge(self, model: nn.Module) -> None:
        for layer in ia3_layers(model).values():
            layer.unmerge()


METHOD: Method = IA3()
METHOD.export(globals())
