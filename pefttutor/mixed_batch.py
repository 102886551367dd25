"""A mixed batch: every row of one forward pass with its own LoRA adapter, all of them resident.

S-LoRA (Sheng et al. 2023, arXiv:2311.03285) and Punica (Chen et al. 2023, arXiv:2310.18547) serve
many LoRA adapters of one base model at once. The frozen W0 is shared, so a batch whose rows need
different adapters still makes one pass through W0; only the small low-rank products are taken per
adapter. Row i, with adapter a(i) (none: the base model):

    h_i = W0 x_i + b + s_{a(i)} B_{a(i)} A_{a(i)} x_i        s_a = alpha_a / r_a  (rsLoRA: alpha_a / sqrt(r_a))

`MultiLoRALinear` keeps every resident adapter of one nn.Linear in peft's multi-adapter layout
(`lora_A.<name>.weight`, `lora_B.<name>.weight`, `scaling[name]`). Adapters may differ in r, alpha
and targets: a layer holds only the adapters that target it, and a row whose adapter is not there
gets W0 x_i + b. The rows are grouped by adapter once per batch (`Rows`); each layer then gathers an
adapter's rows, takes its two small products and adds them into W0 x: the idea of Punica's SGMV
kernel (segmented gather matrix-vector products) in plain torch, and what peft's `adapter_names=`
does (`LoraLayer._mixed_batch_forward`). The modules
are the very ones of `LoRALinear`s that `lora.load` built and checked (`pefttutor.multi`), and a
whole batch with one adapter computes exactly `LoRALinear.forward`'s expression, bit for bit.

`Resident` keeps one model's MultiLoRALinear layers and puts them into it (or takes them out) at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pefttutor import params
from pefttutor.methods.lora import LoRALinear

__all__ = ["BASE", "MultiLoRALinear", "Resident", "Rows"]


@dataclass(frozen=True)
class Rows:
    """Which rows of the batch each adapter serves: (name, row indices), indices None for every row."""

    groups: tuple[tuple[str, torch.Tensor | None], ...] = ()  # empty: every row gets the base model
    batch_size: int | None = None  # None: any batch (one adapter for all rows, or none)

    @classmethod
    def of(cls, adapter_names: Sequence[str | None], device: torch.device | str = "cpu") -> Rows:
        """Group `adapter_names` (one per row; None = the base model) once, for every layer of a forward."""
        names = list(adapter_names)
        distinct = list(dict.fromkeys(n for n in names if n is not None))
        if len(distinct) == 1 and None not in names:  # one adapter for the whole batch: no gather, any shape
            return cls(((distinct[0], None),))
        groups = tuple((a, torch.tensor([i for i, n in enumerate(names) if n == a], device=device)) for a in distinct)
        return cls(groups, len(names))


BASE = Rows()


class MultiLoRALinear(params.LinearWrapper):
    """h_i = W0 x_i + b + s_{a(i)} B_{a(i)} A_{a(i)} x_i for the rows `rows` assigns (see the module docstring).

    Inference only: the modules it takes from a LoRALinear are frozen, and it never merges.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base  # W0, b: the model's own nn.Linear, shared by every adapter
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.rows = BASE  # set for every layer at once by `pefttutor.multi.MultiAdapter`

    def add(self, name: str, layer: LoRALinear) -> None:
        """Keep adapter `name`: the A, B, dropout and scaling of a LoRALinear around this very W0."""
        if layer.base is not self.base:
            raise ValueError(f"adapter {name!r} wraps another nn.Linear than this layer's W0")
        for parts, module in ((self.lora_A, layer.lora_A), (self.lora_B, layer.lora_B),
                              (self.lora_dropout, layer.dropout)):
            parts[name] = module.requires_grad_(False)  # served, not trained: no graph is built for them
        self.scaling[name] = layer.scaling

    def remove(self, name: str) -> None:
        for parts in (self.lora_A, self.lora_B, self.lora_dropout):
            del parts[name]
        del self.scaling[name]

    def update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s B A x~ for adapter `name` (x~: its dropout of x): (..., d_in) -> (..., d_out)."""
        return self.scaling[name] * self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, ..., d_in) -> (B, ..., d_out)
        h = self.base(x)  # W0 x + b for every row: the one big product, shared
        rows = self.rows
        if rows.batch_size is not None and x.shape[0] != rows.batch_size:
            raise RuntimeError(f"a mixed batch of {rows.batch_size} rows met an input of {x.shape[0]} rows in this "
                               f"layer: every adapted layer must see the batch's rows along dim 0")
        for name, index in rows.groups:
            if name not in self.lora_A:  # this adapter does not target this layer
                continue
            if index is None:
                h = h + self.update(name, x)  # LoRALinear's own expression: bit for bit the same
            else:
                h = h.index_add(0, index, self.update(name, x.index_select(0, index)))
        return h

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.lora_A[n].out_features}, scaling={s:g}" for n, s in self.scaling.items())


class Resident:
    """The resident LoRA adapters of `model`: a MultiLoRALinear for every layer one of them targets,
    by the layer's path in the bare model, put into the model (`install`) only while they serve."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: dict[str, MultiLoRALinear] = {}
        self.installed = False

    def add(self, name: str, layers: dict[str, LoRALinear]) -> None:
        """Keep adapter `name` from the LoRALinears `lora.load` put at these paths of the bare model."""
        for path, layer in layers.items():
            self.layers.setdefault(path, MultiLoRALinear(layer.base)).add(name, layer)

    def remove(self, name: str) -> None:
        for path, layer in list(self.layers.items()):
            if name in layer.scaling:
                layer.remove(name)
            if not layer.scaling:  # no adapter targets this layer any more: the plain nn.Linear again
                if self.installed:
                    params.replace_module(self.model, path, layer.base)
                del self.layers[path]

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s A and B under the bare model's keys, as `lora.adapter_state_dict` (detached)."""
        return {f"{path}.{part}.weight": getattr(layer, part)[name].weight.detach()
                for path, layer in self.layers.items() if name in layer.scaling for part in ("lora_A", "lora_B")}

    def install(self, rows: Rows) -> None:
        """Route every layer's rows, and put the layers into the model (if they are not in it)."""
        for layer in self.layers.values():
            layer.rows = rows
        if self.installed:
            return
        for path, layer in self.layers.items():
            w = layer.base.weight  # the model may have moved (model.to) while the layers were out of it
            if any((A.weight.device, A.weight.dtype) != (w.device, w.dtype) for A in layer.lora_A.values()):
                layer.to(device=w.device, dtype=w.dtype)
            params.replace_module(self.model, path, layer.train(layer.base.training))
        self.installed = True

    def uninstall(self) -> None:
        """The bare model back: every layer's own nn.Linear in its place."""
        if self.installed:
            params.unwrap(self.model, self.layers)
            self.installed = False
        for layer in self.layers.values():
            layer.rows = BASE
