"""Parameter mechanics shared by every method: find modules by name, freeze, count.

Methods that wrap a module (LoRA, bottleneck adapters) keep it whole as the wrapper's `base` and
subclass `Wrapper`; names match *through* wrappers (`canonical_path`), so `q_proj` still finds
the projection once it is wrapped, and methods stack in either order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class Wrapper(nn.Module):
    """A module that wraps a frozen module, kept as `self.base` (its path gains a `.base`)."""

    base: nn.Module
    reads_base_weight = False  # True: it computes with or merges into base.weight, so base must stay a plain Linear


class LinearWrapper(Wrapper):
    """A wrapper of an nn.Linear that can merge into its weight (LoRA, DoRA, IA3).

    It shows the wrapped layer's shape and weight, so code that reads a projection's shape works on
    it too; whether it is merged travels with its `state_dict()` (an extra state), so a merged
    model's weights loaded into an unmerged model do not count the update twice.
    """

    reads_base_weight = True
    merged = False
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def refuse_training_when_merged(self, method: str) -> None:
        if self.merged and self.training:  # the update is gone into W0: no dropout, no gradient to it
            raise RuntimeError(f"a merged {method} layer is for inference: call model.eval(), "
                               f"or {method.lower()}.unmerge(model) to train")

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.merged)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.merged = bool(state)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def wrap_linears(model: nn.Module, targets, make, cls: type[nn.Module] = nn.Linear) -> None:
    """Replace every nn.Linear (or `cls`: QLoRA's 4-bit layer) matching `targets` by `make(linear)`
    (in the same train/eval mode).

    Refused inside a wrapper that reads its base's weight (LoRA, DoRA, IA3 on one layer): the outer
    one would compute with, or merge into, a W0 that no longer is the layer.
    """
    found = find_modules(model, targets, cls)  # a typo lists the valid names
    taken = {p: type(model.get_submodule(p.rpartition(".")[0])).__name__ for p in found
             if getattr(model.get_submodule(p.rpartition(".")[0]), "reads_base_weight", False)}
    if taken:
        raise ValueError(f"{sorted(taken)} already carry {sorted(set(taken.values()))}: one low-rank or scaling "
                         "update per layer (it reads and merges into W0)")
    for path, linear in found.items():
        replace_module(model, path, make(linear).train(linear.training))


def unwrap(model: nn.Module, wrappers: dict[str, Wrapper]) -> None:
    """Put back what each wrapper (by path) wraps."""
    for path, wrapper in wrappers.items():
        replace_module(model, path, wrapper.base)


def canonical_path(model: nn.Module, path: str) -> str:
    """`path` without the `.base` steps into wrappers: the path the module had before any wrapping."""
    kept, module = [], model
    for part in path.split(".") if path else ():
        if not (part == "base" and isinstance(module, Wrapper)):
            kept.append(part)
        module = getattr(module, part)
    return ".".join(kept)


def _matches(path: str, suffix: str) -> bool:
    # "q_proj" matches "model.layers.0.self_attn.q_proj" but not "model.layers.0.self_attn.xq_proj".
    return path == suffix or path.endswith("." + suffix)


def module_names(model: nn.Module, cls: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Module) -> list[str]:
    """Distinct short names (last path component) of the submodules of type `cls`, sorted."""
    return sorted({path.rsplit(".", 1)[-1] for path, m in _canonical_modules(model) if path and isinstance(m, cls)})


def _canonical_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(canonical path, module) for every submodule, in `named_modules` order (a wrapper before what it wraps)."""
    return [(canonical_path(model, p), m) for p, m in model.named_modules()]


def find_modules(
    model: nn.Module,
    targets: str | Iterable[str],
    cls: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear,
) -> dict[str, nn.Module]:
    """Every submodule of type `cls` whose dotted path ends with one of `targets`.

    A target may be a short name ("q_proj") or a longer suffix ("layers.0.self_attn.q_proj").
    Raises ValueError naming each target that matched nothing, with the valid names listed,
    so a typo never silently trains nothing.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("no target module names given")
    modules = [(c, p, m) for (c, m), (p, _) in zip(_canonical_modules(model), model.named_modules()) if isinstance(m, cls)]
    found: dict[str, nn.Module] = {}
    claimed: set[str] = set()  # canonical paths found: the outermost module of type cls stands for the rest
    unmatched = []
    for target in targets:
        hits = [(c, p, m) for c, p, m in modules if _matches(c, target)]
        if not hits:
            unmatched.append(target)
        for c, p, m in hits:
            if c not in claimed:
                claimed.add(c)
                found[p] = m
    if unmatched:
        kind = "module" if cls is nn.Module else cls.__name__ if isinstance(cls, type) else "/".join(c.__name__ for c in cls)
        raise ValueError(
            f"no {kind} matches {unmatched}; valid names: {module_names(model, cls)}"
        )
    return found


def freeze(model: nn.Module) -> nn.Module:
    """Set requires_grad=False on every parameter; returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unfreeze(model: nn.Module, names: str | Iterable[str] = ()) -> list[str]:
    """Make trainable every module whose path ends with one of `names` (any module type).

    Returns the matched module paths. Unknown names raise like `find_modules`.
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        return []
    found = find_modules(model, names, cls=nn.Module)
    for m in found.values():
        for p in m.parameters():
            p.requires_grad_(True)
    return sorted(found)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() de-duplicates tied tensors
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """One line like 'trainable 1,234 of 22,713,216 parameters (0.0054%)'."""
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.4f}%)"
