"""Exchange LoRA, DoRA and IA3 adapters with HF peft, without importing peft.

A peft adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`. Our LoRA
layers use peft's parameter names, so a key maps by a prefix only:

    ours: model.layers.0.self_attn.q_proj.lora_A.weight
    peft: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight

(`base_model.model.` is peft's wrapper; the module path after it is the HF model's, which our
Llama and Bert mirror: `LlamaForCausalLM` <-> `Llama`, `BertModel` <-> `Bert`.) DoRA is peft's
LoRA with `use_dora: true`, its magnitude at `...q_proj.lora_magnitude_vector` in both; IA3 is
peft_type IA3, its vectors at `...k_proj.ia3_l`, shaped as peft's.

peft itself loads leniently: a key with a wrong prefix is skipped with a warning and lora_B
stays zero, so the "finetuned" model silently equals the base model. `load_peft` refuses instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

from safetensors.torch import save as serialize
from torch import nn

from pefttutor import checkpoint, params
from pefttutor.methods import applied, dora, ia3, lora

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"  # peft's old format: unpickling it could run any code, so we never do
# The adapter_config.json fields the weights depend on, also kept in the weights' metadata (under
# WRITTEN_WITH), so that a folder whose two files come from different saves is refused.
WEIGHTS_DEPEND_ON = ("r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save")
IA3_WEIGHTS_DEPEND_ON = ("target_modules", "feedforward_modules", "modules_to_save")
WRITTEN_WITH = "pefttutor_adapter_config"

ANY = None
# Every field peft's LoraConfig (0.21) writes, with the values we accept; ANY: informational, or
# read by `load_peft`. A field not listed (a newer peft's feature) is refused, never ignored.
FIELDS = {
    **dict.fromkeys(("peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision",
                     "auto_mapping", "inference_mode", "r", "lora_alpha", "lora_dropout", "use_rslora",
                     "target_modules", "modules_to_save"), ANY),
    "megatron_core": ANY, "qalora_group_size": ANY,  # used only with megatron_config / use_qalora, which must be off
    # what we do not implement, with the values that switch it off
    "use_dora": (False, True),
    **dict.fromkeys(("fan_in_fan_out", "lora_bias", "use_qalora", "ensure_weight_tying"), (False,)),
    "bias": ("none",),
    **dict.fromkeys(("rank_pattern", "alpha_pattern", "loftq_config"), ({}, None)),
    **dict.fromkeys(("layers_pattern", "exclude_modules", "target_parameters"), (None, [])),
    **dict.fromkeys(("layers_to_transform", "layer_replication", "trainable_token_indices",
                     "alora_invocation_tokens", "megatron_config", "eva_config", "corda_config", "lora_ga_config",
                     "use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config"), (None,)),
    # Other initialisations (pissa, olora, corda, loftq, ...) also rewrite W0, so the adapter only
    # fits a base model that was changed the same way.
    "init_lora_weights": (True, False, "gaussian"),
}
# Every field peft's IA3Config (0.21) writes; init_ia3_weights only matters before training.
IA3_FIELDS = {
    **dict.fromkeys(("peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision",
                     "auto_mapping", "inference_mode", "target_modules", "feedforward_modules", "modules_to_save",
                     "init_ia3_weights"), ANY),
    "fan_in_fan_out": (False,), "exclude_modules": (None, []),
}
_KINDS = {"LORA": (FIELDS, WEIGHTS_DEPEND_ON), "IA3": (IA3_FIELDS, IA3_WEIGHTS_DEPEND_ON)}
# how to give tied modules their own weights, for the refusals of `_tied`
_UNTIE = ("untie it with a copy of its own, e.g. "
          "model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())")


def _one_of(value, accepted) -> bool:
    # by type too: layers_to_transform=0 is a layer, not False
    return any(type(value) is type(a) and value == a for a in accepted)


def _tied(model: nn.Module, train) -> list[str]:
    """'a = b' for each parameter of the `train` modules that is also a parameter outside them
    (tied embeddings): peft's modules_to_save copies only the listed module, so it would unshare them."""
    heads = params.find_modules(model, train, nn.Module) if train else {}
    names = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)

    def inside(name: str) -> bool:
        return any(name.startswith(h + ".") for h in heads)

    return [" = ".join(group) for group in names.values() if any(map(inside, group)) and not all(map(inside, group))]


def _method(model: nn.Module):
    """The model's LoRA, DoRA or IA3 (a peft folder holds one adapter)."""
    found = [m for m in (lora.METHOD, dora.METHOD, ia3.METHOD) if m.name in applied(model)]
    if len(found) > 1:
        raise ValueError(f"this model has {[m.title for m in found]}: a peft folder holds one adapter; save them apart")
    return found[0] if found else lora.METHOD  # with none, get_config says what to apply


def _peft_config(method, config, task_type, base_model_name_or_path) -> dict:
    """adapter_config.json for our config, with every switch we do not implement off (in peft's order)."""
    head = {"task_type": task_type, "base_model_name_or_path": base_model_name_or_path}
    if method is ia3.METHOD:
        return {"peft_type": "IA3", **head, "target_modules": list(config.targets),
                "feedforward_modules": list(config.feedforward), "fan_in_fan_out": False,
                "modules_to_save": list(config.train) or None, "inference_mode": True}
    return {"peft_type": "LORA", **head, "r": config.r, "lora_alpha": config.alpha,
            "target_modules": list(config.targets), "lora_dropout": config.dropout, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": config.rslora, "use_dora": method is dora.METHOD,
            "modules_to_save": list(config.train) or None, "rank_pattern": {}, "alpha_pattern": {},
            "inference_mode": True}


def save_peft(
    model: nn.Module,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the model's LoRA, DoRA or IA3 adapter as a peft folder that `PeftModel.from_pretrained` loads.

    `train` modules become peft's `modules_to_save`; one tied to another module (a tied lm_head)
    is refused, since peft would copy it alone. `task_type` is peft's ("CAUSAL_LM",
    "FEATURE_EXTRACTION", "SEQ_CLS", ...). A new folder appears atomically (written to a temporary
    folder, then renamed); into an existing folder each file is replaced atomically, and a failure
    between the two leaves a mixed folder that `load_peft` refuses. Files are 0666 less the umask.
    """
    method = _method(model)
    config = method.get_config(model)
    tied = _tied(model, config.train)
    if tied:
        raise ValueError(f"cannot export `train` weights tied to other modules ({'; '.join(tied)}): peft's "
                         "modules_to_save copies only the listed module, so peft's outputs would differ from this "
                         f"model's; {_UNTIE} (before lora.apply and training), or train without it")
    adapter_config = _peft_config(method, config, task_type, base_model_name_or_path)
    written_with = json.dumps({k: adapter_config[k] for k in _KINDS[adapter_config["peft_type"]][1]})
    weights = serialize({PREFIX + k: v.contiguous() for k, v in method.adapter_state_dict(model).items()},
                        metadata={"format": "pt", WRITTEN_WITH: written_with})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.temporary_path(path)
    tmp.mkdir()
    try:
        (tmp / WEIGHTS_NAME).write_bytes(weights)
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
        try:
            os.rename(tmp, path)  # fails onto a folder with files in it (or onto a file)
        except OSError:
            if not path.is_dir():
                raise
            for name in (WEIGHTS_NAME, CONFIG_NAME):  # config last: it announces the weights
                os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply LoRA (DoRA with `use_dora`) or IA3 to `model` as a peft adapter folder says, then load its weights strictly.

    Every key must match: missing, unexpected or wrongly shaped keys raise ValueError naming
    them. Other peft types raise NotImplementedError. ValueError, before the model is touched,
    for: a config field we do not know (`FIELDS`), a LoRA variant we do not implement (bias
    training, per-layer ranks, ...), a pickled adapter_model.bin, weights and config from different
    `save_peft` calls, and `modules_to_save` tied to other modules in `model`. After a key error
    LoRA is removed again: on any failure the model is as before. Returns the model.
    """
    path = Path(path)
    config_path = path / CONFIG_NAME
    config = json.loads(config_path.read_text())
    kind = config.get("peft_type")
    if kind not in _KINDS:
        raise NotImplementedError(f"{config_path}: peft_type {kind!r}; only {' and '.join(_KINDS)} adapters can be imported")
    fields = _KINDS[kind][0]
    unknown = sorted(config.keys() - fields.keys())
    if unknown:
        raise ValueError(f"{config_path}: unknown fields {unknown} (from a newer peft?); pefttutor refuses "
                         "what it does not know rather than ignore a feature that changes the outputs")
    used = {k: v for k, v in config.items() if fields[k] is not ANY and not _one_of(v, fields[k])}
    if used:
        raise ValueError(f"{config_path} uses {kind} features pefttutor does not implement: {used}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise ValueError(f"{config_path}: target_modules must be a list of names, got {targets!r}")
    if not (path / WEIGHTS_NAME).exists() and (path / PICKLE_NAME).exists():
        raise ValueError(f"{path} holds {PICKLE_NAME} but no {WEIGHTS_NAME}: pickle files are refused on purpose "
                         "(loading one can run arbitrary code); where you trust it, load it with peft and "
                         "save_pretrained(..., safe_serialization=True)")
    metadata, tensors = checkpoint.read_file(path / WEIGHTS_NAME)
    written_with = json.loads(metadata.get(WRITTEN_WITH, "{}"))  # only our own exports record it
    mixed = [f"{k}: weights {v!r}, config {config.get(k)!r}" for k, v in written_with.items() if config.get(k) != v]
    if mixed:
        raise ValueError(f"{path}: {WEIGHTS_NAME} and {CONFIG_NAME} come from different saves (a save_peft that "
                         f"failed half way, or an edited config): {'; '.join(mixed)}; save the adapter again")
    # peft ignores modules_to_save names that match nothing (e.g. "score" added for SEQ_CLS next
    # to "classifier"); so do we. Their weights, if any, would still fail the strict key check.
    paths = [p for p, _ in model.named_modules()]
    train = [n for n in config.get("modules_to_save") or () if any(params._matches(p, n) for p in paths)]
    tied = _tied(model, train)
    if tied:
        raise ValueError(f"{config_path}: modules_to_save {train} are tied to other modules in this model "
                         f"({'; '.join(tied)}), but peft trained a copy of them alone; {_UNTIE}, then load")
    if kind == "IA3":
        method = ia3.METHOD
        method.apply(model, targets, config.get("feedforward_modules") or (), train=train)
    else:
        method = dora.METHOD if config.get("use_dora") else lora.METHOD
        method.apply(model, targets, r=config.get("r", 8), alpha=config.get("lora_alpha", 8),
                     dropout=config.get("lora_dropout", 0.0), rslora=config.get("use_rslora", False), train=train)
    try:
        method.load_adapter_state_dict(model, tensors, prefix=PREFIX)
    except BaseException:
        method.remove(model)
        raise
    return model
