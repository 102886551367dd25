"""What every peft adapter type shares: file names, the allow-list check, tied modules, the `Kind` hooks."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import torch
from torch import nn

from pefttutor import params
from pefttutor.methods import Method

PREFIX = "base_model.model."  # peft's wrapper in front of the model's own paths (LoRA, IA3, adaption prompt)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # peft's old format: unpickling it could run any code, so we never do
# The weights' metadata keeps the adapter_config.json fields they depend on (each kind's `depends_on`),
# so that a folder whose two files come from different saves is refused.
WRITTEN_WITH = "pefttutor_adapter_config"
ANY = None  # an allow-list value: any value (informational, or read by the kind)
# the fields every peft config writes first, in peft's order (PeftConfig's own)
HEAD = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode")
# how to give tied modules their own weights, for the refusals of `tied`
UNTIE = ("untie it with a copy of its own, e.g. "
         "model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())")


def one_of(value, accepted) -> bool:
    # by type too: layers_to_transform=0 is a layer, not False
    return any(type(value) is type(a) and value == a for a in accepted)


def tied(model: nn.Module, train) -> list[str]:
    """'a = b' for each parameter of the `train` modules that is also a parameter outside them
    (tied embeddings): peft's modules_to_save copies only the listed module, so it would unshare them."""
    heads = params.find_modules(model, train, nn.Module) if train else {}
    names = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)

    def inside(name: str) -> bool:
        return any(name.startswith(h + ".") for h in heads)

    return [" = ".join(group) for group in names.values() if any(map(inside, group)) and not all(map(inside, group))]


def own_and_train(model: nn.Module, method: Method) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The method's `adapter_state_dict`, split into its own tensors and its `train` modules' (by key)."""
    state = method.adapter_state_dict(model)
    own = [params.canonical_path(model, p) for p in method.modules(model, method.get_config(model))]
    mine = {k: v for k, v in state.items() if any(k == p or k.startswith(p + ".") for p in own)}
    return mine, {k: v for k, v in state.items() if k not in mine}


class Kind:
    """One peft_type: its config fields and how our method's tensors map onto peft's keys and layout.

    `fields`: every field the installed peft's config class writes, with the values we accept (ANY:
    any); a field not listed (a newer peft's feature) is refused, never ignored. `depends_on`: the
    fields the weights depend on, kept in the weights' metadata. The hooks run in this order:
    export `exportable`, `peft_config`, `to_peft`; import `check`, `apply`, `to_peft` (the keys and
    shapes the file must have), `to_ours`.
    """

    peft_type: ClassVar[str]
    methods: ClassVar[tuple[Method, ...]]  # ours that export as this kind
    fields: ClassVar[dict[str, Any]]
    depends_on: ClassVar[tuple[str, ...]]

    def default_task_type(self, model: nn.Module) -> str | None:
        """peft's task_type when save_peft is given none."""
        return None

    def exportable(self, model: nn.Module, method: Method) -> None:
        """Refuse (ValueError) a model whose adapter peft cannot express exactly."""

    def peft_config(self, model: nn.Module, method: Method, head: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def to_peft(self, model: nn.Module, method: Method) -> dict[str, torch.Tensor]:
        """The adapter as peft saves it: peft's keys, peft's shapes."""
        raise NotImplementedError

    def check(self, model: nn.Module, config: dict[str, Any], path) -> None:
        """Refuse (ValueError) a config this model cannot take, before anything changes."""

    def apply(self, model: nn.Module, config: dict[str, Any], train: list[str]) -> Method:
        """Apply our method as the config says (its values are overwritten next); returns the method."""
        raise NotImplementedError

    def to_ours(self, model: nn.Module, method: Method, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file's tensors (keys and shapes already those of `to_peft`) under our keys, in our layout."""
        raise NotImplementedError


def peft_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def our_keys(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items()}
