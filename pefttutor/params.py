"""Parameter mechanics shared by every method: find modules by name, freeze, count."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def _matches(path: str, suffix: str) -> bool:
    # "q_proj" matches "model.layers.0.self_attn.q_proj" but not "model.layers.0.self_attn.xq_proj".
    return path == suffix or path.endswith("." + suffix)


def module_names(model: nn.Module, cls: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Module) -> list[str]:
    """Distinct short names (last path component) of the submodules of type `cls`, sorted."""
    return sorted({path.rsplit(".", 1)[-1] for path, m in model.named_modules() if path and isinstance(m, cls)})


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
    found: dict[str, nn.Module] = {}
    unmatched = []
    for target in targets:
        hits = {p: m for p, m in model.named_modules() if isinstance(m, cls) and _matches(p, target)}
        if not hits:
            unmatched.append(target)
        found.update(hits)
    if unmatched:
        kind = cls.__name__ if isinstance(cls, type) else "/".join(c.__name__ for c in cls)
        raise ValueError(
            f"no {kind} module matches {unmatched}; valid names: {module_names(model, cls)}"
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
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():  # parameters() already de-duplicates tied tensors
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """One line like 'trainable 1,234 of 22,713,216 parameters (0.0054%)'."""
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.4f}%)"
