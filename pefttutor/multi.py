"""Many adapters on one base model, by name: add, switch, mix in one batch, combine, delete, never
going back to disk. The API is HF peft's multi-adapter one (`load_adapter`, `set_adapter`,
`disable_adapter`, `delete_adapter`, `adapter_names=`, `add_weighted_adapter`).

    multi = MultiAdapter(model)                               # a base model: no method applied
    multi.load_adapter("sql.safetensors", "sql")              # any method's file (it names its method)
    multi.add_adapter("chat", trained)                        # or the adapter another model holds
    multi.set_adapter("sql")                                  # one adapter active ...
    multi.set_adapter(None)                                   # ... or none: the base model, bit for bit
    multi.generate(ids, 20, attention_mask=mask, adapter_names=["sql", "chat", None])  # one row each (LoRA)
    multi.add_weighted_adapter(["sql", "chat"], [1.0, 0.5], "both", combination_type="cat")
    multi.delete_adapter("chat")

Each adapter is checked once, when added, by loading it through the method contract
(`Method._load`: the same base model, its config, exact keys, shapes and dtypes) and taking it off
again. Plain LoRA adapters (no `train` modules) then stay *resident*: their A and B sit side by side
in `MultiLoRALinear` layers (`pefttutor.mixed_batch`), put into the model while one of them is active
or a mixed batch runs, so switching between them moves no tensor, and the rows of one batch may use
different ones (S-LoRA). Every other adapter (DoRA, IA3, bottleneck adapters, prompt and prefix
tuning, LLaMA-Adapter, LoRA with `train` modules) is kept as its method, config and tensors, applied
through the contract when it becomes active and removed when it stops being, so adapters of
different methods switch freely and the model never holds two at once. What an active adapter
learns or changes in place (training, `prefix_tuning.drop_reparam`) is kept when it is switched out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pefttutor import checkpoint, combine, generation, methods, swap
from pefttutor.methods import lora
from pefttutor.methods.base import Config, Method, applied, check_base, identity
from pefttutor.mixed_batch import MultiLoRALinear, Resident, Rows

BASE_NAME = "__base__"  # peft's name for "no adapter" in adapter_names; None works too
_TAKEN = frozenset(dir(nn.ModuleDict()))  # names a ModuleDict refuses as keys: its attributes


@dataclass(frozen=True)
class _Entry:
    method: Method
    config: Config
    state: dict[str, torch.Tensor] | None  # its tensors (canonical keys); None: resident in MultiLoRALinear layers


class MultiAdapter:
    """Named adapters of any method on one base model (see the module docstring). `model` is used in
    place: it always holds exactly the active adapter, or none."""

    def __init__(self, model: nn.Module):
        if applied(model):
            raise ValueError(f"MultiAdapter takes a base model; this one has {list(applied(model))} applied: "
                             "save each, remove it, and load_adapter the files")
        if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
            raise ValueError("this model is already served by another MultiAdapter")
        self.model = model
        self._base = identity(model)  # what every added adapter must have been saved from
        self._entries: dict[str, _Entry] = {}
        self._resident = Resident(model)  # the plain LoRA adapters' layers
        self._active: str | None = None
        self._mixing = False  # inside mixed_batch: the adapters and the active one are fixed
        self._kept: dict[str, torch.Tensor] = {}  # the base values of the active adapter's `train` modules

    # --- what is loaded

    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def configs(self) -> dict[str, Config]:
        """Every adapter's config, by name, in the order added (the config's class says its method)."""
        return {name: e.config for name, e in self._entries.items()}

    def method(self, adapter_name: str) -> str:
        """The registry name of the adapter's method ("lora", "prompt_tuning", ...)."""
        return self._entry(adapter_name).method.name

    def resident(self, adapter_name: str) -> bool:
        """Whether the adapter stays in the model's layers (plain LoRA): only those mix in a batch."""
        return self._entry(adapter_name).state is None

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the base model's keys, as `Method.adapter_state_dict` (detached)."""
        entry = self._entry(adapter_name)
        return self._resident.state_dict(adapter_name) if entry.state is None else dict(entry.state)

    def save_adapter(self, adapter_name: str, path: str | os.PathLike) -> None:
        """Write the adapter as its method's `save` does: `methods.load` or `load_adapter` read it."""
        checkpoint.save(self.adapter_state_dict(adapter_name), path, self._header(adapter_name))

    def __repr__(self) -> str:
        listed = ", ".join(f"{n}: {e.method.name}" for n, e in self._entries.items()) or "none"
        return f"MultiAdapter({type(self.model).__name__}, adapters: {listed}; active: {self._active})"

    # --- adding and deleting

    def load_adapter(self, path: str | os.PathLike, adapter_name: str) -> MultiAdapter:
        """Add the adapter file `path` (any method's, written by its `save`) as `adapter_name`."""
        self._check_new_name(adapter_name)
        header, tensors = checkpoint.read(path)
        return self._add(adapter_name, header, tensors, path)

    def add_adapter(self, adapter_name: str, model: nn.Module, method: str | None = None) -> MultiAdapter:
        """Add the adapter `model` holds (another copy of the base model with a method applied, e.g.
        just trained) as `adapter_name`: a copy of its current values. `method` picks one of several."""
        self._check_new_name(adapter_name)
        if model is self.model:
            raise ValueError("that is this MultiAdapter's own model: apply and train the method on a copy of the "
                             "base model (copy.deepcopy), or save it and load_adapter the file")
        records = applied(model)
        if method is None:
            if len(records) != 1:
                raise ValueError(f"the model holds {list(records) or 'no methods'}: pass method= to pick one")
            method = next(iter(records))
        m = methods.get(method)
        record = m._record(model)
        header = {"method": m.name, "config": dataclasses.asdict(record.config), "base": record.base}
        return self._add(adapter_name, header, m.adapter_state_dict(model), f"the {m.title} of the given model")

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None) -> MultiAdapter:
        """Add a new LoRA adapter combining LoRA `adapters` with `weights`: "svd", "linear" or "cat"
        (peft's; the maths is in `pefttutor.combine`)."""
        self._check_new_name(adapter_name)
        for name in adapters:
            if self._entry(name).method is not lora.METHOD:
                title = self._entry(name).method.title
                raise ValueError(f"adapter {name!r} is {title}: combinations take LoRA adapters")
        config, tensors = combine.weighted_adapter(
            [(self._entries[n].config, self.adapter_state_dict(n)) for n in adapters], weights, combination_type,
            svd_rank, svd_clamp, svd_full_matrices, svd_driver)
        header = {"method": lora.METHOD.name, "config": dataclasses.asdict(config), "base": self._base}
        return self._add(adapter_name, header, tensors, f"the combined adapter {adapter_name!r}")

    def _add(self, name: str, header: dict[str, Any], tensors: dict[str, torch.Tensor], source) -> MultiAdapter:
        self._not_mixing()
        m = methods.get(header["method"])  # an unknown method lists the valid ones
        check_base(header["base"], self._base, source)  # before anything changes
        with self._bare():
            kept = swap.put_on(self.model, m, header, tensors, source)  # checks it as a file load would
            try:
                resident = m is lora.METHOD and not lora.get_config(self.model).train
                layers = lora.lora_layers(self.model) if resident else {}
            finally:
                config, state = swap.take_off(self.model, m, kept)
            self._resident.add(name, layers)  # at the bare model's paths: the wrappers go exactly there
            self._entries[name] = _Entry(m, config, None if resident else state)
        return self

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget the adapter (if active, the model becomes the base model)."""
        entry = self._entry(adapter_name)
        self._not_mixing()
        if self._active == adapter_name:
            self._deactivate()
        if entry.state is None:
            self._resident.remove(adapter_name)
        del self._entries[adapter_name]

    # --- which adapter runs

    def set_adapter(self, adapter_name: str | None) -> None:
        """Make `adapter_name` the active adapter of every forward; None: the base model, bit for bit
        (its modules, parameters and outputs)."""
        self._not_mixing()
        if adapter_name is not None:
            self._entry(adapter_name)
        if adapter_name != self._active:
            self._deactivate()
            self._activate(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within: the base model; afterwards the active adapter again (peft's `disable_adapter`)."""
        previous = self._active
        self.set_adapter(None)
        try:
            yield self.model
        finally:
            self.set_adapter(previous)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Sequence[str | None]):
        """Within: every forward runs row i with the resident LoRA adapter `adapter_names[i]` (None or
        "__base__": the base model), h_i = W0 x_i + b + s_{a(i)} B_{a(i)} A_{a(i)} x_i. Inference only."""
        names = [None if n == BASE_NAME else n for n in adapter_names]
        if not names:
            raise ValueError("adapter_names is empty: give one adapter name (or None) per row")
        for name in dict.fromkeys(n for n in names if n is not None):
            entry = self._entry(name)
            if entry.state is not None:
                raise ValueError(f"adapter {name!r} is {entry.method.title}: a mixed batch takes plain LoRA adapters "
                                 f"(no `train` modules), which stay resident; set_adapter({name!r}) runs it on a batch")
        if self.model.training:
            raise ValueError("a mixed batch is for inference: call model.eval() first")
        self._not_mixing()
        previous = self._active
        self._deactivate()
        self._mixing = True
        try:
            self._resident.install(Rows.of(names, _device(self.model)))
            yield self.model
        finally:
            self._resident.uninstall()
            self._mixing = False
            self._activate(previous)

    def __call__(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """The model's forward; with `adapter_names`, as a mixed batch (one name per row)."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs) -> torch.Tensor:
        """The model's KV-cached `generate`; with `adapter_names`, every row with its own adapter."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.model.generate(*args, **kwargs)

    def complete(self, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                 adapter_names: Sequence[str | None] | None = None, add_special_tokens: bool = True,
                 batch_size: int = 16) -> list[str]:
        """`generation.complete` (greedy, left-padded batches), each prompt with its adapter if named."""
        if adapter_names is None:
            return generation.complete(self.model, tokenizer, prompts, max_new_tokens, add_special_tokens, batch_size)
        if len(adapter_names) != len(prompts):
            raise ValueError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts: give one per prompt")
        was_training, out = self.model.training, []
        self.model.eval()
        try:
            for i in range(0, len(prompts), batch_size):
                with self.mixed_batch(adapter_names[i:i + batch_size]):
                    out += generation.complete(self.model, tokenizer, prompts[i:i + batch_size], max_new_tokens,
                                               add_special_tokens, batch_size)
        finally:
            self.model.train(was_training)
        return out

    # --- mechanics

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            listed = ", ".join(map(repr, self._entries)) or "none yet"
            raise ValueError(f"no adapter named {name!r}; adapters: {listed}")
        return self._entries[name]

    def _check_new_name(self, name: Any) -> None:
        # a name becomes a key of the layers' ModuleDicts: no '.', and no ModuleDict attribute ("keys", "train")
        if not isinstance(name, str) or not name or "." in name or name == BASE_NAME or name in _TAKEN:
            raise ValueError(f"an adapter name must be a non-empty string without '.', not {BASE_NAME!r} and no "
                             f"nn.ModuleDict attribute, got {name!r}")
        if name in self._entries:
            raise ValueError(f"an adapter named {name!r} is already loaded ({self._entries[name].method.name}): "
                             f"pick another name, or delete_adapter({name!r}) first")

    def _not_mixing(self) -> None:
        if self._mixing:
            raise RuntimeError("inside mixed_batch the adapters are fixed: add, delete or switch after it")

    def _header(self, name: str) -> dict[str, Any]:
        entry = self._entry(name)
        return {"method": entry.method.name, "config": dataclasses.asdict(entry.config), "base": self._base}

    @contextlib.contextmanager
    def _bare(self):
        """The base model within, the active adapter back afterwards."""
        active = self._active
        self._deactivate()
        try:
            yield
        finally:
            self._activate(active)

    def _activate(self, name: str | None) -> None:
        if name is None:
            return
        entry = self._entries[name]
        if entry.state is None:
            self._resident.install(Rows.of([name]))
        else:
            self._kept = swap.put_on(self.model, entry.method, self._header(name), entry.state, f"adapter {name!r}")
        self._active = name

    def _deactivate(self) -> None:
        name = self._active
        if name is None:
            return
        entry = self._entries[name]
        if entry.state is None:
            self._resident.uninstall()
        else:  # kept as it is now: trained in place, its config changed
            config, state = swap.take_off(self.model, entry.method, self._kept)
            self._entries[name], self._kept = dataclasses.replace(entry, config=config, state=state), {}
        self._active = None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
