"""peft_type LORA (our LoRA; DoRA with use_dora) and IA3: our parameter names are peft's, behind `PREFIX`."""

from __future__ import annotations

from pefttutor.methods import dora, ia3, lora

from ._common import ANY, PREFIX, Kind, our_keys, peft_keys

WEIGHTS_DEPEND_ON = ("r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save")
IA3_WEIGHTS_DEPEND_ON = ("target_modules", "feedforward_modules", "modules_to_save")

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


class _Targeted(Kind):
    """LoRA and IA3: parameters inside the target modules, under the model's own paths."""

    def to_peft(self, model, method):
        return peft_keys(method.adapter_state_dict(model), PREFIX)

    def to_ours(self, model, method, tensors):
        return our_keys(tensors, PREFIX)

    def check(self, model, config, path):
        targets = config.get("target_modules")
        if not isinstance(targets, list) or not targets:
            raise ValueError(f"{path}: target_modules must be a list of names, got {targets!r}")


class Lora(_Targeted):
    peft_type, methods, fields, depends_on = "LORA", (lora.METHOD, dora.METHOD), FIELDS, WEIGHTS_DEPEND_ON

    def peft_config(self, model, method, head):
        config = method.get_config(model)
        return {"peft_type": "LORA", "task_type": head["task_type"],
                "base_model_name_or_path": head["base_model_name_or_path"], "r": config.r, "lora_alpha": config.alpha,
                "target_modules": list(config.targets), "lora_dropout": config.dropout, "bias": "none",
                "fan_in_fan_out": False, "use_rslora": config.rslora, "use_dora": method is dora.METHOD,
                "modules_to_save": list(config.train) or None, "rank_pattern": {}, "alpha_pattern": {},
                "inference_mode": True}

    def apply(self, model, config, train):
        method = dora.METHOD if config.get("use_dora") else lora.METHOD
        method.apply(model, config["target_modules"], r=config.get("r", 8), alpha=config.get("lora_alpha", 8),
                     dropout=config.get("lora_dropout", 0.0), rslora=config.get("use_rslora", False), train=train)
        return method


class IA3(_Targeted):
    peft_type, methods, fields, depends_on = "IA3", (ia3.METHOD,), IA3_FIELDS, IA3_WEIGHTS_DEPEND_ON

    def peft_config(self, model, method, head):
        config = method.get_config(model)
        return {"peft_type": "IA3", "task_type": head["task_type"],
                "base_model_name_or_path": head["base_model_name_or_path"], "target_modules": list(config.targets),
                "feedforward_modules": list(config.feedforward), "fan_in_fan_out": False,
                "modules_to_save": list(config.train) or None, "inference_mode": True}

    def apply(self, model, config, train):
        ia3.METHOD.apply(model, config["target_modules"], config.get("feedforward_modules") or (), train=train)
        return ia3.METHOD
