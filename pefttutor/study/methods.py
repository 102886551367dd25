"""What the study does to a fresh model for each method, and what the method stores per task.

A spec is a JSON-able dict, `{"method": name, **settings}`; `build(model, spec)` changes the model
in place (classifier tasks keep the `classifier` head trainable) and `save(model, spec, path)`
writes what one task needs at inference time: the method's adapter file (with the head), or the
whole model for full finetuning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from .. import methods, params, quantized
from ..methods import prefix_tuning

HEAD = "classifier"
BASELINES = ("untuned", "full", "head", "features")  # no PEFT method: nothing or everything trains
METHODS = (*BASELINES, *methods.METHODS)
MERGED = ("lora", "dora", "ia3")  # merged into W0 for inference


def _head(model: nn.Module) -> tuple[str, ...]:
    return (HEAD,) if hasattr(model, HEAD) else ()


def build(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Apply `spec` to `model` in place and return it."""
    name, settings = spec["method"], {k: v for k, v in spec.items() if k != "method"}
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    if name == "full":
        return model
    if name in ("untuned", "head", "features"):
        params.freeze(model)
        params.unfreeze(model, _head(model))
        return model
    if name == "qlora":  # QLoRA adapts a 4-bit base: quantize its targets first, in the spec's format
        fmt = {k: settings[k] for k in ("quant_type", "double_quant") if settings.get(k) is not None}
        quantized.quantize_model(model, settings.get("targets", quantized.DECODER), **fmt)
    return methods.get(name).apply(model, **settings, train=_head(model))


def for_inference(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """What a deployed model runs: LoRA, DoRA and IA3 merged into W0, the prefix MLP folded into the
    prefix (QLoRA cannot merge into 4-bit weights: it runs unmerged)."""
    if spec["method"] in MERGED:
        methods.get(spec["method"]).merge(model.eval())
    if spec["method"] == "prefix_tuning" and spec.get("reparam", True):
        prefix_tuning.drop_reparam(model)
    return model


def _whole_model(model: nn.Module, path: Path) -> None:
    """Every weight once (SmolLM2's LM head is its embedding matrix: stored once)."""
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            state[k] = v.contiguous()
    save_file(state, path)


def save(model: nn.Module, spec: dict[str, Any], path: Path) -> None:
    """Write what the task stores for `spec` (after `for_inference`) to `path`."""
    name = spec["method"]
    if name == "full":
        _whole_model(model, path)
    elif name in ("head", "features"):
        save_file({k: v.contiguous() for k, v in model.get_submodule(HEAD).state_dict().items()}, path)
    else:
        methods.get(name).save(model, path)
