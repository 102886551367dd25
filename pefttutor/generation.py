"""Batched greedy text generation for evaluation: prompts in, decoded continuations out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pefttutor import data, quantized


@torch.no_grad()
def complete(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
             add_special_tokens: bool = True, batch_size: int = 16) -> list[str]:
    """Greedy continuations of `prompts` with the model's own KV-cache `generate`, decoded and stripped.

    Batches are left-padded (`data.left_pad`), so every row's last real token sits at position -1.
    Chat-templated prompts already hold their special tokens: pass add_special_tokens=False.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with quantized.dequantize_once(model):  # a 4-bit base dequantizes once, not once per token
        for i in range(0, len(prompts), batch_size):
            ids = tokenizer(list(prompts[i:i + batch_size]), add_special_tokens=add_special_tokens)["input_ids"]
            ids, mask = data.left_pad(ids, data.pad_id_of(tokenizer))
            seqs = model.generate(ids.to(device), max_new_tokens, attention_mask=mask.to(device),
                                  eos_token_id=tokenizer.eos_token_id)
            out += [tokenizer.decode(s[ids.shape[1]:], skip_special_tokens=True).strip() for s in seqs]
    model.train(was_training)
    return out
