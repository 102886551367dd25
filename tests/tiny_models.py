"""Tiny random models for the method tests: seeded, in eval mode, small enough to run in milliseconds.

Grouped-query attention (4 query heads share 2 key/value heads) so that GQA bugs show up.
"""

from dataclasses import replace

import torch

from pefttutor.models.bert import Bert, BertConfig
from pefttutor.models.llama import Llama, LlamaConfig

LLAMA = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
BERT = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=32)


def tiny_llama(seed: int = 0, **overrides) -> Llama:
    """A random `Llama` of shape LLAMA (fields in `overrides` replaced)."""
    torch.manual_seed(seed)
    return Llama(replace(LLAMA, **overrides)).eval()


def tiny_bert(seed: int = 0, **overrides) -> Bert:
    """A random `Bert` of shape BERT (fields in `overrides` replaced)."""
    torch.manual_seed(seed)
    return Bert(replace(BERT, **overrides)).eval()


def tiny_hf(family: str, seed: int = 0):
    """transformers' twin of `tiny_llama` / `tiny_bert` (same shapes, its own random weights), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    if family == "llama":
        c = LLAMA
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, tie_word_embeddings=False)).eval()
    c = BERT
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings)).eval()


def through_peft(direction: str, method, peft_config, tmp_path, scale: float = 0.05, **settings):
    """(ours, peft's) tiny Llama pair holding the same non-trivial adapter, moved across as a peft folder:
    "export" trains nothing but perturbs ours and `interop.save_peft`s it into peft; "import" perturbs
    peft's and `interop.load_peft`s its `save_pretrained` folder into ours."""
    import copy

    import peft

    from pefttutor import interop

    hf = tiny_hf("llama")
    g = torch.Generator().manual_seed(2)

    def perturb(parameters):
        with torch.no_grad():
            for p in parameters:
                p.add_(scale * torch.randn(p.shape, generator=g))

    if direction == "export":
        ours = method.apply(Llama.from_hf(hf).eval(), **settings)
        perturb(method.trainable(ours).values())
        interop.save_peft(ours, tmp_path / "a", task_type="CAUSAL_LM")
        return ours, peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "a").eval(), hf
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft_config).eval()
    perturb(p for p in theirs.parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path / "a")
    return interop.load_peft(Llama.from_hf(hf).eval(), tmp_path / "a"), theirs, hf


def save_peft_failing_at_the_config(model, folder, monkeypatch) -> None:
    """`interop.save_peft` into `folder` with the disk 'full' when adapter_config.json is put in place:
    the weights are new, the config is the old one."""
    import os

    import pytest

    from pefttutor import interop

    replace = os.replace

    def fail_on_config(src, dst):
        if str(dst).endswith(interop.CONFIG_NAME):
            raise OSError("disk full")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_config)
    with pytest.raises(OSError, match="disk full"):
        interop.save_peft(model, folder)
    monkeypatch.undo()


def two_lora_adapters() -> list[tuple]:
    """(config, state dict) of two LoRA adapters (r = 2, Wq and Wv) on a tiny Llama, A and B random:
    updates of rank 2 each, for the exercises on combining adapters."""
    from pefttutor.methods import lora

    out = []
    for seed in (1, 2):
        model = lora.apply(tiny_llama(), ["q_proj", "v_proj"], r=2, alpha=4)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in lora.trainable(model).values():
                p.normal_()
        out.append((lora.get_config(model), lora.adapter_state_dict(model)))
    return out


class ByteTokenizer:
    """A stand-in tokenizer for a tiny model: one id per byte (mod the vocabulary), pad = eos = 0."""

    pad_token_id = eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [1] + [b % 63 + 1 for b in text.encode()]}


def reversed_demos_exercise(model, tok, label_ids):
    from pefttutor import data
    from pefttutor.exercises import prompts

    tweets, pool = data.load_tweets("test", limit=12), data.load_tweets("train", limit=30)
    demos = [pool[0], pool[1], pool[2], pool[3]]  # labels 0 1 2 0
    return prompts.reversed_demonstrations(model, tok, tweets, demos, label_ids), tweets, demos
