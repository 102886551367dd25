"""Exchange adapters with HF peft (0.21's format), without importing peft.

A peft adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`. Each of our
methods maps onto one peft_type (a `Kind`: its config fields and its key/layout conversion):

* LoRA, DoRA (LORA with `use_dora: true`), IA3: our parameter names are peft's behind a prefix,
      ours: model.layers.0.self_attn.q_proj.lora_A.weight
      peft: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
  (`base_model.model.` is peft's wrapper; the rest is the HF model's path, which our Llama and Bert
  mirror: `LlamaForCausalLM` <-> `Llama`, `BertModel` <-> `Bert`). DoRA's magnitude is
  `...q_proj.lora_magnitude_vector`, IA3's vectors `...k_proj.ia3_l`, shaped as peft's.
* prompt tuning (PROMPT_TUNING): `prompt_embeddings` (n_virtual_tokens, hidden), our P_e as is.
* prefix tuning (PREFIX_TUNING): `prompt_embeddings` (n_virtual_tokens, num_layers * 2 * token_dim),
  token_dim = key/value heads * head_dim (peft reads GQA's num_key_value_heads; 3 * 64 = 192 for
  SmolLM2). peft's get_prompt views a row as (num_layers * 2, kv heads, head_dim): layer l's keys
  at 2l, its values at 2l + 1, our P_theta's layout. A prefix with our MLP exports the prefix it
  computes (peft's own save does the same); import gives a prefix without the MLP. peft's Bert
  numbers the real tokens' positions from n_virtual_tokens (the prefix is a cache), ours from 0:
  to reproduce peft's Bert outputs, pass position_ids = arange(P, P + T) (our Llama shifts, as HF).
* LLaMA-Adapter (ADAPTION_PROMPT, top `adapter_layers` layers, as ours):
  `base_model.model.model.layers.{L}.self_attn.adaption_prompt` (1, n_tokens, hidden) and
  `...adaption_gate` (1,): one gate per layer where ours has one per head, so a model whose heads'
  gates differ is refused. peft, like ours, projects the prompt with the layer's k_proj / v_proj
  (no rotary) and repeats the key/value heads for GQA.
  Prompt learning keeps `modules_to_save` at `base_model.<path>` (e.g. `base_model.lm_head.weight`).

peft itself loads leniently: a key with a wrong prefix is skipped with a warning and lora_B
stays zero, so the "finetuned" model silently equals the base model. `load_peft` refuses instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as serialize
from torch import nn

from pefttutor import checkpoint, params
from pefttutor.methods import applied, lora

from ._common import (ANY, CONFIG_NAME, PICKLE_NAME, PREFIX, UNTIE, WEIGHTS_NAME, WRITTEN_WITH, Kind, one_of,
                      tied)
from ._lora import FIELDS, IA3, IA3_FIELDS, IA3_WEIGHTS_DEPEND_ON, WEIGHTS_DEPEND_ON, Lora
from ._prompts import AdaptionPrompt, PrefixTuning, PromptTuning

KINDS: dict[str, Kind] = {k.peft_type: k for k in (Lora(), IA3(), PromptTuning(), PrefixTuning(), AdaptionPrompt())}
_KIND_OF = {m.name: kind for kind in KINDS.values() for m in kind.methods}
_one_of, _tied = one_of, tied  # the names the tests know

__all__ = ["ANY", "CONFIG_NAME", "FIELDS", "IA3_FIELDS", "IA3_WEIGHTS_DEPEND_ON", "KINDS", "PICKLE_NAME", "PREFIX",
           "WEIGHTS_DEPEND_ON", "WEIGHTS_NAME", "WRITTEN_WITH", "load_peft", "save_peft"]


def _method(model: nn.Module):
    """The model's one method that peft can hold (a peft folder holds one adapter)."""
    found = [r.method for name, r in applied(model).items() if name in _KIND_OF]
    if len(found) > 1:
        raise ValueError(f"this model has {[m.title for m in found]}: a peft folder holds one adapter; save them apart")
    return found[0] if found else lora.METHOD  # with none, get_config says what to apply


def save_peft(
    model: nn.Module,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the model's adapter (LoRA, DoRA, IA3, prompt tuning, prefix tuning, LLaMA-Adapter) as a
    peft folder that `PeftModel.from_pretrained` loads.

    `train` modules become peft's `modules_to_save`; one tied to another module (a tied lm_head)
    is refused, since peft would copy it alone. `task_type` is peft's ("CAUSAL_LM",
    "FEATURE_EXTRACTION", "SEQ_CLS", ...); the prompt-style methods default to our Llama's
    CAUSAL_LM or Bert's FEATURE_EXTRACTION (peft's PeftModel without one ignores a prompt). What peft
    cannot express exactly is refused before anything is written (LLaMA-Adapter heads with different
    gates). A new folder appears atomically (written to a temporary folder, then renamed); into an
    existing folder each file is replaced atomically, and a failure between the two leaves a mixed
    folder that `load_peft` refuses. Files are 0666 less the umask.
    """
    method = _method(model)
    kind, config = _KIND_OF[method.name], method.get_config(model)
    bad = tied(model, config.train)
    if bad:
        raise ValueError(f"cannot export `train` weights tied to other modules ({'; '.join(bad)}): peft's "
                         "modules_to_save copies only the listed module, so peft's outputs would differ from this "
                         f"model's; {UNTIE} (before {method.name}.apply and training), or train without it")
    kind.exportable(model, method)
    head = {"task_type": task_type or kind.default_task_type(model), "base_model_name_or_path": base_model_name_or_path}
    adapter_config = kind.peft_config(model, method, head)
    written_with = json.dumps({k: adapter_config[k] for k in kind.depends_on})
    weights = serialize({k: v.contiguous() for k, v in kind.to_peft(model, method).items()},
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
    """Apply the method a peft adapter folder names to `model`, then load its weights strictly.

    peft_type LORA (DoRA with `use_dora`), IA3, PROMPT_TUNING, PREFIX_TUNING (always as our prefix
    without the MLP: the folder holds the prefix only) or ADAPTION_PROMPT (our per-head gates all
    get peft's one gate per layer); others raise NotImplementedError. Every key must match:
    missing, unexpected or wrongly shaped keys raise ValueError naming them. ValueError, before the
    model is touched, for: a config field we do not know (`KINDS[...].fields`), a feature we do not
    implement (bias training, per-layer ranks, an encoder-decoder's prompt, ...), a prefix laid out
    for other layers or heads, a pickled adapter_model.bin, weights and config from different
    `save_peft` calls, and `modules_to_save` tied to other modules in `model`. After a key error the
    method is removed again: on any failure the model is as before. Returns the model.
    """
    path = Path(path)
    config_path = path / CONFIG_NAME
    config = json.loads(config_path.read_text())
    kind = KINDS.get(config.get("peft_type")) if isinstance(config, dict) else None
    if kind is None:
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise NotImplementedError(f"{config_path}: peft_type {found!r}; only {', '.join(KINDS)} adapters can be "
                                  "imported")
    unknown = sorted(config.keys() - kind.fields.keys())
    if unknown:
        raise ValueError(f"{config_path}: unknown fields {unknown} (from a newer peft?); pefttutor refuses "
                         "what it does not know rather than ignore a feature that changes the outputs")
    used = {k: v for k, v in config.items() if kind.fields[k] is not ANY and not one_of(v, kind.fields[k])}
    if used:
        raise ValueError(f"{config_path} uses {kind.peft_type} features pefttutor does not implement: {used}")
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
    kind.check(model, config, config_path)
    # peft ignores modules_to_save names that match nothing (e.g. "score" added for SEQ_CLS next
    # to "classifier"); so do we. Their weights, if any, would still fail the strict key check.
    paths = [p for p, _ in model.named_modules()]
    train = [n for n in config.get("modules_to_save") or () if any(params._matches(p, n) for p in paths)]
    bad = tied(model, train)
    if bad:
        raise ValueError(f"{config_path}: modules_to_save {train} are tied to other modules in this model "
                         f"({'; '.join(bad)}), but peft trained a copy of them alone; {UNTIE}, then load")
    method = kind.apply(model, config, train)
    try:
        expected = {k: torch.empty_like(v) for k, v in kind.to_peft(model, method).items()}  # peft's keys and shapes
        checkpoint.load_strict(expected, tensors)  # refusals name the file's keys
        method.load_adapter_state_dict(model, kind.to_ours(model, method, expected))
    except BaseException:
        method.remove(model)
        raise
    return model
