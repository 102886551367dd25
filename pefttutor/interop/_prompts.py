"""peft_type PROMPT_TUNING, PREFIX_TUNING and ADAPTION_PROMPT: our soft prompt, prefix and LLaMA-Adapter.

Prompt learning (the first two) keeps one bare key, `prompt_embeddings`, and `modules_to_save`
under `base_model.` (peft wraps no tuner around the model there); the adaption prompt lives in the
model, under `PREFIX` like LoRA. The layouts, as peft 0.21's `get_prompt` and
`tuners/adaption_prompt` read them, are in the package docstring.
"""

from __future__ import annotations

import torch

from pefttutor.methods import llama_adapter, prefix_tuning, prompt_tuning
from pefttutor.methods.base import host
from pefttutor.models import Bert, Llama

from ._common import ANY, HEAD, PREFIX, Kind, our_keys, own_and_train, peft_keys

LEARNING_PREFIX = "base_model."  # prompt learning's modules_to_save: peft's base_model is the model itself
# Every field peft's PromptLearningConfig (0.21) writes; the model's sizes are checked by the kinds
# (or by the weights' shapes). num_transformer_submodules 2 is an encoder-decoder's: we have none.
PROMPT_LEARNING_FIELDS = {**dict.fromkeys(HEAD, ANY), "num_virtual_tokens": ANY, "token_dim": ANY,
                          "num_transformer_submodules": (1, None), "num_attention_heads": ANY, "num_layers": ANY,
                          "modules_to_save": ANY}
INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # ours: peft's PromptTuningInit


def _dims(model) -> tuple[int, int, int, int]:
    """(layers, query heads, key/value heads, head_dim) of the model's attention."""
    layers = prefix_tuning.attention_layers(model)
    if not layers:
        raise ValueError(f"a prompt-style adapter needs a pefttutor Llama or Bert, got {type(model).__name__}")
    return len(layers), layers[0].n_heads, layers[0].n_kv, layers[0].hd


def _head(peft_type: str, head: dict) -> dict:
    return {"task_type": head["task_type"], "peft_type": peft_type, "auto_mapping": None, "peft_version": None,
            "base_model_name_or_path": head["base_model_name_or_path"], "revision": None, "inference_mode": True}


def _learning(config, token_dim: int, heads: int, layers: int) -> dict:
    return {"num_virtual_tokens": config.n_tokens, "token_dim": token_dim, "num_transformer_submodules": 1,
            "num_attention_heads": heads, "num_layers": layers, "modules_to_save": list(config.train) or None}


class _PromptLearning(Kind):
    """One tensor `prompt_embeddings`, plus the `train` modules under `base_model.`."""

    def default_task_type(self, model):
        # peft's PeftModel without a task type never adds the prompt: pick the one our host model is
        task = "CAUSAL_LM" if isinstance(model, Llama) else "FEATURE_EXTRACTION" if isinstance(model, Bert) else None
        if task is None:
            raise ValueError(f"pass peft's task_type for a {type(model).__name__} (e.g. 'SEQ_CLS'): without one, "
                             "peft's PeftModel silently runs the base model without the prompt")
        return task

    def prompt(self, model, method) -> torch.Tensor:
        (tensor,) = own_and_train(model, method)[0].values()
        return tensor

    def to_peft(self, model, method):
        train = own_and_train(model, method)[1]
        return {"prompt_embeddings": self.prompt(model, method), **peft_keys(train, LEARNING_PREFIX)}

    def to_ours(self, model, method, tensors):
        rest = dict(tensors)
        (key,) = own_and_train(model, method)[0]  # import applies the plain form: one tensor
        return {key: rest.pop("prompt_embeddings"), **our_keys(rest, LEARNING_PREFIX)}


class PromptTuning(_PromptLearning):
    """P_e (n_virtual_tokens, hidden): the same tensor in both."""

    peft_type, methods = "PROMPT_TUNING", (prompt_tuning.METHOD,)
    fields = {**PROMPT_LEARNING_FIELDS, "prompt_tuning_init": tuple(INITS.values()), "prompt_tuning_init_text": ANY,
              "tokenizer_name_or_path": ANY, "tokenizer_kwargs": ANY}  # the init only matters before training
    depends_on = ("num_virtual_tokens", "token_dim", "modules_to_save")

    def peft_config(self, model, method, head):
        config, (layers, heads, _, _) = method.get_config(model), _dims(model)
        text = config.init == "text"
        if text and not head["base_model_name_or_path"]:
            raise ValueError("a soft prompt initialised from text exports as peft's TEXT init, which peft refuses "
                             "without a tokenizer name: pass base_model_name_or_path (the tokenizer's)")
        return {**_head(self.peft_type, head),
                **_learning(config, host(model, method.title).get_input_embeddings().weight.shape[1], heads, layers),
                "prompt_tuning_init": INITS[config.init], "prompt_tuning_init_text": config.init_text,
                "tokenizer_name_or_path": head["base_model_name_or_path"] if text else None, "tokenizer_kwargs": None}

    def apply(self, model, config, train):
        init = {v: k for k, v in INITS.items()}[config.get("prompt_tuning_init", "RANDOM")]
        text = config.get("prompt_tuning_init_text") if init == "text" else None
        method = prompt_tuning.METHOD
        method._apply(model, method.Config(config.get("num_virtual_tokens"), init, text, train=train), init=False)
        return method


class PrefixTuning(_PromptLearning):
    """P_theta (n_virtual_tokens, num_layers * 2 * token_dim), token_dim = kv heads * head_dim: the same layout.

    Export writes the prefix itself; with our MLP (reparam) that is the prefix the MLP computes, as
    peft's own save does (its folder then says prefix_projection: true, and holds no MLP either).
    Import always gives our prefix without the MLP (reparam=False), whatever prefix_projection says.
    """

    peft_type, methods = "PREFIX_TUNING", (prefix_tuning.METHOD,)
    fields = {**PROMPT_LEARNING_FIELDS, "init_weights": ANY, "encoder_hidden_size": ANY, "prefix_projection": ANY}
    depends_on = ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "modules_to_save")

    def peft_config(self, model, method, head):
        config, (layers, _, kv_heads, head_dim) = method.get_config(model), _dims(model)
        return {**_head(self.peft_type, head), **_learning(config, kv_heads * head_dim, kv_heads, layers),
                "init_weights": None, "encoder_hidden_size": config.hidden if config.reparam else kv_heads * head_dim,
                "prefix_projection": config.reparam}

    def prompt(self, model, method):
        with torch.no_grad():
            return prefix_tuning.prefix_encoder(model)().detach()  # the MLP's output, or the plain prefix

    def check(self, model, config, path):
        layers, _, kv_heads, head_dim = _dims(model)
        file = tuple(config.get(k) for k in ("num_layers", "num_attention_heads", "token_dim"))
        if file != (layers, kv_heads, kv_heads * head_dim):
            need = (layers, kv_heads, kv_heads * head_dim)
            raise ValueError(f"{path}: its prefix is laid out for (num_layers, num_attention_heads, token_dim) = "
                             f"{file}, this model's attention needs {need} ({layers} layers, {kv_heads} key/value "
                             f"heads of {head_dim}): the columns would land in the wrong heads")

    def apply(self, model, config, train):
        method = prefix_tuning.METHOD
        method._apply(model, method.Config(config.get("num_virtual_tokens"), reparam=False, train=train), init=False)
        return method


class AdaptionPrompt(Kind):
    """Per adapted layer: peft `{layer}.self_attn.adaption_prompt` (1, L, d), ours (L, d); peft's one
    `adaption_gate` (1,), ours one per head (n_heads,): exact only where our heads' gates are equal."""

    peft_type, methods = "ADAPTION_PROMPT", (llama_adapter.METHOD,)
    fields = {**dict.fromkeys(HEAD, ANY), "target_modules": ("self_attn",), "adapter_len": ANY, "adapter_layers": ANY}
    depends_on = ("target_modules", "adapter_len", "adapter_layers")

    def default_task_type(self, model):
        return "CAUSAL_LM"

    def check(self, model, config, path=None):
        if isinstance(model, Llama):
            c = model.config
            if c.num_attention_heads * c.head_dim != c.hidden_size:
                raise ValueError(f"{path or 'this model'}: peft's adaption_prompt splits the prompt's keys into heads "
                                 f"of {c.hidden_size} // num_attention_heads, which is not this model's head_dim "
                                 f"{c.head_dim} ({c.num_attention_heads} heads, hidden {c.hidden_size}): peft cannot "
                                 "compute this adapter")

    def exportable(self, model, method):
        if method.get_config(model).train:
            raise ValueError("peft's adaption prompt has no modules_to_save: export LLaMA-Adapter without `train` "
                             "modules")
        self.check(model, {})

    def peft_config(self, model, method, head):
        config = method.get_config(model)
        return {**_head(self.peft_type, head), "target_modules": "self_attn", "adapter_len": config.n_tokens,
                "adapter_layers": config.n_layers}

    @staticmethod
    def _peft_key(key: str) -> str:  # model.layers.3.self_attn.peft.llama_adapter.x -> model.layers.3.self_attn.x
        return PREFIX + key.replace(f".peft.{llama_adapter.METHOD.name}.", ".")

    def to_peft(self, model, method):
        out = {}
        for key, t in own_and_train(model, method)[0].items():
            if key.endswith("adaption_gate"):
                if not torch.equal(t, t[:1].expand_as(t)):
                    raise ValueError(f"{key} holds one gate per head, {t.tolist()}, and they differ: peft's adaption "
                                     "prompt has one gate per layer, so it cannot hold these; nothing was written")
                t = t[:1].clone()  # (1,)
            out[self._peft_key(key)] = t[None] if key.endswith("adaption_prompt") else t  # prompt (1, L, d)
        return out

    def apply(self, model, config, train):
        method = llama_adapter.METHOD
        method._apply(model, method.Config(config.get("adapter_len"), config.get("adapter_layers"), train=train),
                      init=False)
        return method

    def to_ours(self, model, method, tensors):
        return {key: tensors[self._peft_key(key)][0] if key.endswith("adaption_prompt")
                else tensors[self._peft_key(key)].expand_as(t)  # peft's one gate for every head
                for key, t in own_and_train(model, method)[0].items()}
