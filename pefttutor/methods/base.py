"""The contract every PEFT method keeps, written once (litgpt's "every method the same small API").

A method is a `Method` subclass in its own file, with a frozen `Config` dataclass (validated in
`check`, the same on `apply` and on `load`) and three hooks: `attach` puts its modules into a
model, `detach` takes them out again, `modules` says what it trains and saves. The rest is here:

    apply(model, ..., train=())        validate, attach, freeze all but the method and `train` modules
    get_config(model)                  what `apply` recorded
    trainable(model)                   the parameters the method trains, by name (the trainable filter)
    adapter_state_dict(model)          what an adapter file holds, under the model's own keys
    load_adapter_state_dict(model, tensors, prefix="")   exact keys and shapes, or nothing changes
    save(model, path), load(model, path)   safetensors with the method, its config, the base's identity
    merge(model), unmerge(model)       into the frozen weights where the maths allows; else a refusal saying why
    remove(model)                      the base model back, bit for bit

`apply` and `load` are transactional: on any failure the model is exactly as before. Methods
stack: a second one keeps the first one's parameters trainable, each saves its own file, and they
come off in the reverse order. Each method file ends with `METHOD.export(globals())`, so that
`lora.apply(...)`, `lora.save(...)` and the rest are plain functions of its module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pefttutor import checkpoint, checks, params

API = ("apply", "get_config", "trainable", "adapter_state_dict", "load_adapter_state_dict", "save", "load",
       "merge", "unmerge", "remove")
_APPLIED = "peft_methods"  # the model attribute that records every applied method, in order


@dataclass(frozen=True)
class Config:
    """Base of every method's config. `train`: modules trained in full beside the method (e.g. a head)."""

    train: tuple[str, ...] = field(default=(), kw_only=True)

    def __post_init__(self):
        self._set("train", checks.names(self.train, "train"))
        self.check()

    def check(self) -> None:
        """Validate (and normalise, with `_set`) the method's own settings; ValueError on bad ones."""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # a frozen dataclass normalising its own fields


@dataclass(frozen=True)
class Applied:
    """What applying a method to a model recorded."""

    method: Method
    config: Config
    flags: tuple[tuple[nn.Parameter, bool], ...]  # every parameter's requires_grad before, for `remove`
    base: dict[str, Any]  # the base model's identity (`identity`), stored in adapter files


def applied(model: nn.Module) -> dict[str, Applied]:
    """The methods applied to `model`, by name, in the order they were applied (a copy)."""
    return dict(getattr(model, _APPLIED, {}))


def identity(model: nn.Module) -> dict[str, Any]:
    """The base model's architecture and parameter names and shapes: what an adapter file fits.

    Files are refused by parameter count and the digest of names and shapes; the class name is
    informational, so a file from our Llama loads into transformers' LlamaForCausalLM (same keys).
    The identity recorded when the first method was applied (wrappers change the paths), else the model's own.
    """
    records = applied(model)
    if records:
        return next(iter(records.values())).base
    named = list(model.named_parameters())
    shapes = "\n".join(f"{name}:{tuple(p.shape)}" for name, p in named)
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for _, p in named),
            "shapes": hashlib.sha256(shapes.encode()).hexdigest()[:16]}


def check_base(saved: Any, base: dict[str, Any], source) -> None:
    """Refuse an adapter whose recorded base identity `saved` is not `base` (by parameter count and
    digest of names and shapes): ValueError naming `source` and both models."""
    if not isinstance(saved, dict) or any(saved.get(k) != base[k] for k in ("parameters", "shapes")):
        raise ValueError(f"{source} was saved from another base model: file {_describe(saved)}, "
                         f"this model {_describe(base)}")


def host(model: nn.Module, title: str) -> nn.Module:
    """The one pefttutor model (Llama, Bert) inside `model`, or `model` itself: the module whose
    forward serves the model-level `peft` extension point (`pefttutor/models/attention.py`)."""
    from pefttutor.models import Bert, Llama

    hosts = [m for m in model.modules() if isinstance(m, (Llama, Bert))]
    if len(hosts) != 1:
        raise ValueError(f"{title} needs exactly one pefttutor Llama or Bert in the model (convert a transformers "
                         f"model with Llama.from_hf / Bert.from_hf); found {len(hosts)} in {type(model).__name__}")
    return hosts[0]


def host_extension(model: nn.Module, name: str, title: str) -> dict[str, nn.Module]:
    """{path: module} of the module a method put in the host's extension point under `name`."""
    model_host = host(model, title)
    path = next(p for p, m in model.named_modules() if m is model_host)
    return {f"{path}.peft.{name}" if path else f"peft.{name}": model_host.peft[name]}


class Method:
    """One PEFT method. Subclasses set the class attributes and implement `attach`, `detach`, `modules`."""

    name: ClassVar[str]  # the one name: module, registry, calculator, study, benchmarks
    title: ClassVar[str]  # for messages, e.g. "LoRA"
    Config: ClassVar[type[Config]]
    must_match: ClassVar[tuple[str, ...]] = ()  # settings a file must share with the model it loads into
    cannot_merge: ClassVar[str | None] = None  # why the method cannot fold into W0; None: `_merge` does it

    # --- what each method writes

    def check(self, model: nn.Module, config: Config) -> Config:
        """Refuse a model that cannot take `config` (before any change); return the config resolved for it."""
        return config

    def attach(self, model: nn.Module, config: Config, init: bool = True, **extras) -> None:
        """Install the method's modules (`init=False`: a file's values will overwrite the initial ones)."""
        raise NotImplementedError

    def detach(self, model: nn.Module) -> None:
        """Take out whatever `attach` installed, also after an `attach` that failed half way."""
        raise NotImplementedError

    def modules(self, model: nn.Module, config: Config) -> dict[str, nn.Module | nn.Parameter]:
        """What the method trains and saves, by path: modules, or single parameters (IA3's vectors)."""
        raise NotImplementedError

    def merged(self, model: nn.Module) -> bool:
        return False

    def _merge(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _unmerge(self, model: nn.Module) -> None:
        raise NotImplementedError

    # --- the contract, the same for every method

    def apply(self, model: nn.Module, *args, train=(), **settings) -> nn.Module:
        """Apply the method with these settings (its `Config`'s fields); returns the model, changed in place."""
        return self._apply(model, self.Config(*args, train=train, **settings))

    def _apply(self, model: nn.Module, config: Config, init: bool = True, **extras) -> nn.Module:
        records = applied(model)
        if self.name in records:
            raise ValueError(f"this model already has {self.title}; apply it once, or {self.name}.remove(model) first")
        heads = _heads(model, config)  # a typo in `train` lists the valid module names
        config = self.check(model, config)
        flags = tuple((p, p.requires_grad) for p in model.parameters())
        keep = {id(p) for r in records.values() for p in r.method.trainable(model).values()}  # stacking
        base = identity(model)
        try:
            self.attach(model, config, init, **extras)
            own = self.modules(model, config)
            clash = sorted(p for p in own for h in heads if p == h or p.startswith(h + "."))
            if clash:
                raise ValueError(f"{clash} belong to {self.title} and to `train` modules {sorted(heads)}: pick one")
            for p in model.parameters():
                if id(p) not in keep:
                    p.requires_grad_(False)
            for module in (*own.values(), *heads.values()):
                module.requires_grad_(True)
        except BaseException:
            self._undo(model, flags)
            raise
        records[self.name] = Applied(self, config, flags, base)
        setattr(model, _APPLIED, records)
        return model

    def _undo(self, model: nn.Module, flags) -> None:
        self.detach(model)
        for p, flag in flags:
            p.requires_grad_(flag)

    def _record(self, model: nn.Module) -> Applied:
        record = applied(model).get(self.name)
        if record is None:
            raise ValueError(f"this model has no {self.title}: call {self.name}.apply(model, ...) first")
        return record

    def _set_config(self, model: nn.Module, config: Config) -> None:
        """Record a changed config (prefix tuning's `drop_reparam`)."""
        records = applied(model)
        records[self.name] = dataclasses.replace(records[self.name], config=config)
        setattr(model, _APPLIED, records)

    def get_config(self, model: nn.Module) -> Config:
        """The config `apply` recorded; ValueError if the method was never applied."""
        return self._record(model).config

    def _named_modules(self, model: nn.Module) -> dict[str, nn.Module | nn.Parameter]:
        config = self.get_config(model)
        return {**self.modules(model, config), **_heads(model, config)}

    def trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the method trains (its own and its `train` modules'), by parameter name."""
        return {_key(path, k): p for path, part in self._named_modules(model).items()
                for k, p in ([("", part)] if isinstance(part, nn.Parameter) else part.named_parameters())}

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What an adapter file holds: the method's modules and the `train` modules, detached (sharing
        memory with the model), under the paths they had before any wrapping (`params.canonical_path`),
        so a file does not depend on the order methods were stacked in."""
        return {_key(params.canonical_path(model, path), k): v.detach()
                for path, part in self._named_modules(model).items()
                for k, v in ({"": part} if isinstance(part, nn.Parameter) else part.state_dict()).items()}

    def load_adapter_state_dict(self, model: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Copy `tensors` into the adapter: exactly the keys of `adapter_state_dict(model)`, each with
        `prefix` in front, and their shapes, else ValueError and nothing is copied."""
        merged = [r.method.title for r in applied(model).values() if r.method.merged(model)]
        if merged:
            raise ValueError(f"cannot load into a model with merged {merged[0]}: unmerge(model) first")
        checkpoint.load_strict(self.adapter_state_dict(model), tensors, prefix)

    def save(self, model: nn.Module, path: str | os.PathLike) -> None:
        """Write the adapter, the method's name and config and the base model's identity to a
        safetensors file, atomically."""
        record = self._record(model)
        checkpoint.save(self.adapter_state_dict(model), path,
                        {"method": self.name, "config": dataclasses.asdict(record.config), "base": record.base})

    def load(self, model: nn.Module, path: str | os.PathLike) -> nn.Module:
        """Load a file written by `save`; returns the model.

        On a model without the method, it is first applied with the saved settings; on one that has
        it, the `must_match` settings must equal the saved ones. The file must come from the same
        base model (`identity`) and fit exactly; on any failure the model is exactly as before.
        """
        return self._load(model, path, *checkpoint.read(path))

    def _load(self, model: nn.Module, path, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
        if header["method"] != self.name:
            raise ValueError(f"{path} holds a {header['method']!r} adapter, not {self.name!r}: "
                             f"load it with pefttutor.methods.{header['method']}.load (or pefttutor.methods.load)")
        saved = self._config_from(header["config"], path)
        check_base(header["base"], identity(model), path)
        if self.name in applied(model):
            current = self.get_config(model)
            diff = [f"{k}: model {getattr(current, k)!r}, file {getattr(saved, k)!r}"
                    for k in self._must_match(saved) if getattr(current, k) != getattr(saved, k)]
            if diff:
                raise ValueError(f"{self.title} config mismatch with {path}: " + "; ".join(diff))
            self.load_adapter_state_dict(model, tensors)
            return model
        self._apply(model, saved, init=False)
        try:
            self.load_adapter_state_dict(model, tensors)
        except BaseException:
            self.remove(model)
            raise
        return model

    def _must_match(self, saved: Config) -> tuple[str, ...]:
        return self.must_match

    def _config_from(self, fields: Any, path) -> Config:
        """The file's config, validated exactly as `apply` validates its arguments."""
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: its {self.title} config is not a JSON object: {fields!r}")
        known = {f.name: f for f in dataclasses.fields(self.Config)}
        unknown = sorted(fields.keys() - known.keys())
        if unknown:
            raise ValueError(f"{path}: unknown {self.title} settings {unknown} (written by another pefttutor version?)")
        missing = sorted(known.keys() - fields.keys())  # `save` writes every field: a gap means a damaged file
        if missing:
            raise ValueError(f"{path}: {self.title} settings {missing} are missing from its config")
        try:
            return self.Config(**fields)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the method into the frozen weights (idempotent; for inference), or refuse saying why."""
        self._mergeable(model)
        self._merge(model)
        return model

    def unmerge(self, model: nn.Module) -> nn.Module:
        """Undo `merge` (idempotent): W0 back up to float rounding."""
        self._mergeable(model)
        self._unmerge(model)
        return model

    def _mergeable(self, model: nn.Module) -> None:
        self._record(model)
        if self.cannot_merge:
            raise ValueError(f"{self.title} cannot be merged into the frozen weights: {self.cannot_merge}")

    def remove(self, model: nn.Module) -> nn.Module:
        """Take the method out: the base model back, bit for bit (modules, weights, requires_grad)."""
        record = self._record(model)
        last = list(applied(model))[-1]
        if last != self.name:
            raise ValueError(f"{last} was applied after {self.title}: remove it first (methods come off in reverse order)")
        if self.merged(model):
            raise ValueError(f"{self.title} is merged into W0: unmerge(model) first (W0 then equals the "
                             "original up to float rounding; remove never changes W0)")
        self._undo(model, record.flags)
        self._forget(model)
        return model

    def _forget(self, model: nn.Module) -> None:
        records = applied(model)
        del records[self.name]
        if records:
            setattr(model, _APPLIED, records)
        else:
            delattr(model, _APPLIED)

    def export(self, namespace: dict[str, Any]) -> None:
        """Make the contract plain functions of the method's module: `lora.apply(...)`, `lora.save(...)`."""
        namespace.update({name: getattr(self, name) for name in API})


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if name else path


def _heads(model: nn.Module, config: Config) -> dict[str, nn.Module]:
    return params.find_modules(model, config.train, nn.Module) if config.train else {}


def _describe(base: Any) -> str:
    if not isinstance(base, dict):
        return repr(base)
    return f"{base.get('architecture')} with {base.get('parameters', 0):,} parameters (shapes {base.get('shapes')})"
