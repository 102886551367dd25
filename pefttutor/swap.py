"""Swapping an adapter held in memory into a base model and out again, through the method contract.

`put_on` is `Method._load` (the same checks as loading a file: base model, config, exact keys,
shapes and dtypes; nothing changes on failure) and `take_off` is `Method.remove`, plus two things
they leave out because a file is loaded once and removed at most once:

* `train` modules (a trained head, bottleneck adapters' norms) are the base model's own modules,
  which loading overwrites with the adapter's values and `remove` leaves so: `put_on` keeps their
  base values and `take_off` puts them back, so that the model is the base model bit for bit again.
* applying a method draws initial values, overwritten at once by the adapter's: the caller's random
  streams are kept as they were, so that switching adapters never shifts a seeded run.

`take_off` returns the adapter as it is then (config and tensors), so what it learned or changed in
place while on (training, `prefix_tuning.drop_reparam`) is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pefttutor.methods.base import Config, Method


def put_on(model: nn.Module, method: Method, header: dict[str, Any], tensors: dict[str, torch.Tensor],
           source) -> dict[str, torch.Tensor]:
    """Apply the adapter (`header`: method, config, base; `tensors`: its state dict) to the bare
    `model`; returns the base values of the modules it overwrote, for `take_off`. `source` names it."""
    own = model.state_dict()  # the bare model's keys are the adapters' canonical keys
    kept = {k: own[k].clone() for k in tensors if k in own}
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        method._load(model, source, header, tensors)
    return kept


def take_off(model: nn.Module, method: Method, kept: dict[str, torch.Tensor]) -> tuple[Config, dict[str, torch.Tensor]]:
    """The applied adapter's config and tensors now, then the bare model back (`kept` restored)."""
    config = method.get_config(model)
    # its own modules leave the model with it, so their tensors need no copy; `train` modules stay
    state = {k: v.clone() if k in kept else v for k, v in method.adapter_state_dict(model).items()}
    method.remove(model)
    own = model.state_dict()
    with torch.no_grad():
        for k, v in kept.items():
            own[k].copy_(v)
    return config, state
