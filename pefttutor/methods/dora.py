"""DoRA: Weight-Decomposed Low-Rank Adaptation, from scratch (Liu et al. 2024, arXiv:2402.09353).

DoRA splits each adapted weight into a magnitude and a direction, and adapts the direction with LoRA:

    W' = m * (W0 + s B A) / ||W0 + s B A||        m: (d_out,), ||.|| the L2 norm of each output row

m starts at ||W0|| (per row) and B at zero, so W' = W0 at the start; m, A and B train. As in the
paper (section 4.3) and HF peft, the norm is treated as a constant in backward (it is detached),
which saves memory at no loss of accuracy. Without gradients (validation, generation) the norm is
computed once and reused until a weight changes in place, moves or is replaced. Trainable: LoRA's
r (d_in + d_out) plus d_out per adapted matrix. W' is a plain matrix, so `merge` folds it into W0
and `unmerge` takes it out.

    model = dora.apply(model, ("q_proj", "v_proj"), r=8, alpha=16)
    ...train...
    dora.merge(model)                                  # W0 <- W'

Written like peft's `LoraConfig(use_dora=True)`, whose magnitude is `lora_magnitude_vector`; the
output, with the bias b and dropout on the input of the adapted path only:

    h = W0 x + b + (m / ||W0 + s B A|| - 1) W0 x~ + (m / ||W0 + s B A||) s B A x~,   x~ = dropout(x)

which is W' x + b without dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method
from .lora import LoRA, LoRAConfig, LoRALinear


class DoRALinear(LoRALinear):
    """A LoRALinear whose update is split into magnitude m (`lora_magnitude_vector`, peft's name) and direction."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base, r, alpha, dropout, rslora)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().detach())  # m = ||W0||: (d_out,)
        self._merged_norm: torch.Tensor | None = None  # ||W0 + s B A|| at merge time, to unmerge exactly
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None  # (weights' identity and versions, norm)

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A|| per output row: (d_out,)."""
        return torch.linalg.norm(self.base.weight + self.delta_weight(), dim=1)

    def _norm(self) -> torch.Tensor:
        """The detached norm; without gradients, cached: generation would redo it for every token."""
        weights, device = (self.base.weight, self.lora_A.weight, self.lora_B.weight), self.base.weight.device.type
        if torch.is_grad_enabled() or any(w.is_inference() for w in weights):  # inference tensors have no version
            self._norm_cache = None
            return self.weight_norm().detach()
        # an optimizer step or a load bumps _version, .to() or a new tensor changes data_ptr, autocast the dtype
        key = tuple((w.data_ptr(), w._version) for w in weights) + (self.scaling,
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = key, self.weight_norm()
        return self._norm_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        if self.merged:
            return super().forward(x)  # W0 holds W'; refuses training mode
        scale = self.lora_magnitude_vector / self._norm()  # m / ||W0 + s B A||: (d_out,)
        x_ = self.dropout(x)
        base = self.base(x)  # W0 x + b
        base_ = F.linear(x_, self.base.weight) if x_ is not x else base - (0 if self.base.bias is None else self.base.bias)
        return base + (scale - 1) * base_ + scale * self.scaling * self.lora_B(self.lora_A(x_))

    def get_extra_state(self) -> torch.Tensor:
        # merged: the norm unmerging needs (it cannot be recovered from W'); unmerged: nothing
        return self._merged_norm if self.merged else torch.empty(0)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.merged = state.numel() > 0
        self._merged_norm = state if self.merged else None

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- m (W0 + s B A) / ||W0 + s B A||. A no-op when merged."""
        if not self.merged:
            self._merged_norm = self.weight_norm()
            self.base.weight.copy_((self.lora_magnitude_vector / self._merged_norm)[:, None]
                                   * (self.base.weight + self.delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W' ||W0 + s B A|| / m - s B A, with the norm kept from `merge` (equal up to rounding)."""
        if self.merged:
            self.base.weight.copy_(self.base.weight * (self._merged_norm / self.lora_magnitude_vector)[:, None]
                                   - self.delta_weight())
            self._merged_norm, self.merged = None, False


class DoRA(LoRA):
    """LoRA's targets and settings, each adapted nn.Linear a DoRALinear (see the module docstring)."""

    name, title = "dora", "DoRA"
    layer = DoRALinear

    def modules(self, model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
        return {**super().modules(model, config), **{
            f"{path}.lora_magnitude_vector": layer.lora_magnitude_vector for path, layer in self.layers(model).items()}}


METHOD: Method = DoRA()
METHOD.export(globals())
