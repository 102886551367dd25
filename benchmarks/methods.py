"""What is compared: the two implementations, the training methods and the inference variants, each
as pefttutor applies it and as peft does, and the labels RESULTS.md gives them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pefttutor import params, quant, quantized
from pefttutor.methods import adapters, dora, ia3, llama_adapter, lora, prefix_tuning, prompt_tuning, qlora

from kits import Kit

IMPLS = ("pefttutor", "peft")


def _peft(model: nn.Module, config) -> nn.Module:
    import peft

    return peft.get_peft_model(model, config)


def _task_type(kit: Kit) -> str:
    return "CAUSAL_LM" if kit.causal else "FEATURE_EXTRACTION"


def _full(model: nn.Module, kit: Kit) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_ours(targets: str, r: int = 8) -> Callable:
    return lambda model, kit: lora.apply(model, getattr(kit, targets), r=r, alpha=2 * r, train=kit.train_heads)


def lora_peft(targets: str, r: int = 8, use_dora: bool = False) -> Callable:
    def apply(model, kit):
        import peft

        return _peft(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(getattr(kit, targets)),
                                            use_dora=use_dora))

    return apply


def _dora_ours(targets: str, r: int = 8) -> Callable:
    return lambda model, kit: dora.apply(model, getattr(kit, targets), r=r, alpha=2 * r, train=kit.train_heads)


# IA3 as peft lays it out: keys, values and the feed-forward output projection, whose input is scaled
# (BERT's "output.dense" also names the attention's output projection: peft scales both, and so do we)
IA3_LAYOUT = {"smollm2": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
              "minilm": (("key", "value", "output.dense"), ("output.dense",))}


def _ia3_ours(model, kit):
    targets, feedforward = IA3_LAYOUT[kit.name]
    return ia3.apply(model, targets, feedforward=feedforward, train=kit.train_heads)


def _ia3_peft(model, kit):
    import peft

    targets, feedforward = IA3_LAYOUT[kit.name]
    return _peft(model, peft.IA3Config(target_modules=list(targets), feedforward_modules=list(feedforward)))


def _qlora_ours(model, kit):
    quantized.quantize_model(model, kit.all_linear)  # NF4, double quantization: QLoRA's format
    return qlora.apply(model, kit.all_linear, r=8, alpha=16)


def _to_bnb_4bit(model: nn.Module, targets: tuple[str, ...]) -> nn.Module:
    """Each targeted nn.Linear of a transformers model as bitsandbytes' Linear4bit (NF4, double
    quantization, blocks of 64), what `from_pretrained(quantization_config=BitsAndBytesConfig(...))`
    builds; its compute dtype follows the input (autocast's, where on)."""
    import bitsandbytes as bnb

    for path, linear in params.find_modules(model, targets).items():
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compress_statistics=True, quant_type="nf4", device="cpu")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=quant.BLOCK)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().cpu(), requires_grad=False)
        params.replace_module(model, path, layer.to(linear.weight.device))
    return model


def _qlora_peft(model, kit):
    import peft

    return _peft(_to_bnb_4bit(model, kit.all_linear), peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(kit.all_linear)))


def _prompt_tuning_peft(model, kit):
    import peft

    return _peft(model, peft.PromptTuningConfig(task_type=_task_type(kit), num_virtual_tokens=20))


def _prefix_peft(model, kit):
    import peft

    return _peft(model, peft.PrefixTuningConfig(
        task_type=_task_type(kit), num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=512))


def _llama_adapter_peft(model, kit):
    import peft

    return _peft(model, peft.AdaptionPromptConfig(
        task_type="CAUSAL_LM", adapter_len=10, adapter_layers=model.config.num_hidden_layers))


@dataclass(frozen=True)
class Method:
    """One benchmarked method: `ours(model, kit)` / `peft(hf_model, kit)` return the model to train."""

    label: str
    ours: Callable[[nn.Module, Kit], nn.Module]
    peft: Callable[[nn.Module, Kit], nn.Module] | None  # None: peft has no such method
    models: tuple[str, ...] = ("smollm2", "minilm")

    def apply(self, impl: str) -> Callable[[nn.Module, Kit], nn.Module]:
        return self.ours if impl == "pefttutor" else self.peft

    @property
    def impls(self) -> tuple[str, ...]:
        return IMPLS if self.peft is not None else ("pefttutor",)


METHODS: dict[str, Method] = {
    "full": Method("full finetuning", _full, _full),
    "lora_qv": Method("LoRA Wq,Wv r=8", lora_ours("qv"), lora_peft("qv")),
    "lora_all": Method("LoRA all linear r=8", lora_ours("all_linear"), lora_peft("all_linear")),
    "dora_qv": Method("DoRA Wq,Wv r=8", _dora_ours("qv"), lora_peft("qv", use_dora=True)),
    "ia3": Method("IA3 (k, v, feed-forward)", _ia3_ours, _ia3_peft),
    "qlora": Method("QLoRA all linear r=8 (NF4 + double quant; peft on bitsandbytes)", _qlora_ours, _qlora_peft,
                    models=("smollm2",)),
    "prompt_tuning": Method(
        "soft prompt (20 tokens)", lambda m, kit: prompt_tuning.apply(m, 20, train=kit.train_heads), _prompt_tuning_peft),
    "prefix_tuning": Method(
        "prefix (20 tokens, MLP 512)",
        lambda m, kit: prefix_tuning.apply(m, 20, reparam=True, hidden=512, train=kit.train_heads), _prefix_peft),
    "llama_adapter": Method(
        "LLaMA-Adapter (10 tokens, all layers)",
        lambda m, kit: llama_adapter.apply(m, n_tokens=10, n_layers=m.config.num_hidden_layers),
        _llama_adapter_peft, models=("smollm2",)),
}

# Inference variants: base model, LoRA unmerged / merged, bottleneck adapters (pefttutor only: peft
# has no bottleneck adapters). `ours(model, kit)` / `peft(hf, kit)` return the eval-mode model.


def _merged_ours(method, apply: Callable) -> Callable:
    return lambda model, kit: method.merge(apply(model, kit))


def _merged_peft(apply: Callable) -> Callable:
    return lambda model, kit: apply(model, kit).merge_and_unload()


def _adapters(placement: str) -> Callable:
    def apply(model, kit):  # size 64, or less on a tiny model (a bottleneck must be narrower than d)
        size = min(64, kit.ours.config.hidden_size // 4)
        return adapters.apply(model, size, placement=placement, train=kit.train_heads)

    return apply


VARIANTS: dict[str, Method] = {
    "base": Method("base model", lambda m, kit: m, lambda m, kit: m),  # timed in every group's loop
    "lora_qv": Method("LoRA Wq,Wv r=8, unmerged", lora_ours("qv"), lora_peft("qv")),
    "lora_qv_merged": Method("LoRA Wq,Wv r=8, merged", _merged_ours(lora, lora_ours("qv")), _merged_peft(lora_peft("qv"))),
    "lora_all": Method("LoRA all linear r=8, unmerged", lora_ours("all_linear"), lora_peft("all_linear")),
    "lora_all_merged": Method("LoRA all linear r=8, merged", _merged_ours(lora, lora_ours("all_linear")),
                              _merged_peft(lora_peft("all_linear"))),
    "dora_qv": Method("DoRA Wq,Wv r=8, unmerged", _dora_ours("qv"), lora_peft("qv", use_dora=True)),
    "dora_qv_merged": Method("DoRA Wq,Wv r=8, merged", _merged_ours(dora, _dora_ours("qv")),
                             _merged_peft(lora_peft("qv", use_dora=True))),
    "ia3": Method("IA3, unmerged", _ia3_ours, _ia3_peft),
    "ia3_merged": Method("IA3, merged", _merged_ours(ia3, _ia3_ours), _merged_peft(_ia3_peft)),
    **{f"adapters_{p}": Method(f"bottleneck adapters, {p}, size 64", _adapters(p), None)
       for p in ("houlsby", "pfeiffer", "parallel")},
}

# timed together with the base models, one loop per group (a loop holds every model of its group)
LATENCY_GROUPS = (("lora_qv", "lora_qv_merged"), ("lora_all", "lora_all_merged"), ("dora_qv", "dora_qv_merged"),
                  ("ia3", "ia3_merged"),
                  ("adapters_houlsby", "adapters_pfeiffer", "adapters_parallel"))


def base_key(key: str) -> str:
    """The METHODS key of a record's method ("lora_qv+bf16" -> "lora_qv")."""
    return key.split("+", 1)[0]


def label(key: str) -> str:
    """A record's method as RESULTS.md names it (training rows carry "+<autocast>" after the key)."""
    base, _, autocast = key.partition("+")
    if base in METHODS:
        return METHODS[base].label + (f", {autocast} autocast" if autocast else "")
    return VARIANTS[key].label if key in VARIANTS else key
