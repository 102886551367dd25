"""Exchange LoRA adapters with HF peft, without importing peft.

A peft adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`. Our LoRA
layers use peft's parameter names, so a key maps by a prefix only:

    ours: model.layers.0.self_attn.q_proj.lora_A.weight
    peft: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight

(`base_model.model.` is peft's wrapper; the module path after it is the HF model's, which our
Llama and Bert mirror: `LlamaForCausalLM` <-> `Llama`, `BertModel` <-> `Bert`.)

peft itself loads leniently: a key with a wrong prefix is skipped with a warning and lora_B
stays zero, so the "finetuned" model silently equals the base model. `load_peft` refuses instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from pefttutor import checkpoint, params
from pefttutor.methods import lora

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# adapter_config.json fields that change the math; we support each only when switched off.
UNSUPPORTED = (
    "use_dora", "fan_in_fan_out", "bias", "lora_bias", "rank_pattern", "alpha_pattern",
    "layers_to_transform", "layers_pattern", "exclude_modules", "layer_replication",
    "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "use_qalora",
    "use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config",
)
_OFF = (None, False, "none", {}, [])
# Other initialisations (pissa, olora, corda, loftq, ...) also rewrite W0, so the adapter only
# fits a base model that was changed the same way.
_PLAIN_INITS = (True, False, "gaussian")


def save_peft(
    model: nn.Module,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the model's LoRA adapter as a peft folder that `PeftModel.from_pretrained` loads.

    `train` modules become peft's `modules_to_save`. `task_type` is peft's ("CAUSAL_LM",
    "FEATURE_EXTRACTION", "SEQ_CLS", ...). The folder appears atomically (written to a temporary
    folder, then renamed; into an existing folder each file is replaced atomically).
    """
    config = lora.get_config(model)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "target_modules": list(config.targets),
        "lora_dropout": config.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": config.rslora,
        "use_dora": False,
        "modules_to_save": list(config.train) or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    tensors = {PREFIX + k: v.contiguous() for k, v in lora.adapter_state_dict(model).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
        if path.exists():
            for name in (WEIGHTS_NAME, CONFIG_NAME):  # config last: it announces the weights
                os.replace(tmp / name, path / name)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply LoRA to `model` as a peft adapter folder says, then load its weights strictly.

    Every key must match: missing, unexpected or wrongly shaped keys raise ValueError naming
    them. Non-LoRA peft types raise NotImplementedError; LoRA variants we do not implement
    (DoRA, bias training, per-layer ranks, ...) raise ValueError before the model is touched;
    after a key error LoRA is removed again: on any failure the model is as before.
    Returns the model.
    """
    path = Path(path)
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("peft_type") != "LORA":
        raise NotImplementedError(
            f"{path / CONFIG_NAME}: peft_type {config.get('peft_type')!r}; only LORA adapters can be imported"
        )
    used = {k: config[k] for k in UNSUPPORTED if config.get(k) not in _OFF}
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        used["init_lora_weights"] = config["init_lora_weights"]
    if used:
        raise ValueError(f"{path / CONFIG_NAME} uses LoRA features pefttutor does not implement: {used}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise ValueError(f"{path / CONFIG_NAME}: target_modules must be a list of names, got {targets!r}")
    # peft ignores modules_to_save names that match nothing (e.g. "score" added for SEQ_CLS next
    # to "classifier"); so do we. Their weights, if any, would still fail the strict key check.
    paths = [p for p, _ in model.named_modules()]
    train = [n for n in config.get("modules_to_save") or () if any(params._matches(p, n) for p in paths)]
    lora.apply(
        model, targets, r=config.get("r", 8), alpha=config.get("lora_alpha", 8),
        dropout=config.get("lora_dropout", 0.0), rslora=config.get("use_rslora", False), train=train,
    )
    try:
        lora.load_adapter_state_dict(model, load_file(path / WEIGHTS_NAME), prefix=PREFIX)
    except BaseException:
        lora.remove(model)
        raise
    return model
