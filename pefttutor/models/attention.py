"""Attention core shared by Llama and Bert, and the two hooks PEFT methods plug into.

Every attention module (`LlamaAttention`, `BertSelfAttention`) has two attributes, both None
by default, and calls `attend` below, so the hook contract lives in this one file:

* `attn.prefix` (prefix tuning): a callable/module, `prefix(batch_size) -> (k, v)`, each
  (B, n_kv_heads, P, head_dim). They are prepended to the layer's keys/values, are always
  visible (no causal or padding mask applies to them) and get no rotary embedding. Llama
  shifts the rope positions of the real tokens by P, as Hugging Face does when the prefix is
  handed in as a key/value cache of length P. The prefix never enters the KV cache: it is
  prepended again at every decoding step.
* `attn.adapter` (LLaMA-Adapter): a callable/module, `adapter(q, attn) -> extra`, with q the
  queries after rotary (B, n_heads, T, head_dim) and `attn` the attention module itself; the
  returned (B, n_heads, T, head_dim) is added to the attention output before the output
  projection (o_proj / attention.output.dense).

Masks are boolean, True = may attend, broadcastable to (B, 1, T, S).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _native_gqa(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether SDPA's fast kernel shares the kv heads itself (`enable_gqa`, torch >= 2.5): the CPU
    flash kernel does, with or without a mask; on GPUs only flash attention does, which takes no mask
    (with one, SDPA would fall back to its slow math kernel, so k and v are repeated instead)."""
    return _SDPA_HAS_GQA and (mask is None or q.device.type == "cpu")


def get_prefix(attn: nn.Module, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's prefix (k, v), or None when there is none or it is empty (P == 0)."""
    if attn.prefix is None:
        return None
    k, v = attn.prefix(batch_size)
    return None if k.shape[2] == 0 else (k, v)


def attend(
    attn: nn.Module,
    q: torch.Tensor,  # (B, H, T, hd)
    k: torch.Tensor,  # (B, Hkv, S, hd)  S = cached + new tokens
    v: torch.Tensor,  # (B, Hkv, S, hd)
    mask: torch.Tensor | None,  # bool, broadcastable to (B, 1, T, S); None = all visible
    is_causal: bool = False,  # only with mask=None and S == T (no cache)
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,  # from get_prefix
    dropout_p: float = 0.0,
) -> torch.Tensor:  # (B, H, T, hd)
    """Scaled dot-product attention with the prefix and adapter hooks applied."""
    if prefix is not None:
        pk, pv = prefix
        P, T, S = pk.shape[2], q.shape[2], k.shape[2]
        k = torch.cat([pk.to(k.dtype), k], dim=2)  # (B, Hkv, P+S, hd)
        v = torch.cat([pv.to(v.dtype), v], dim=2)
        if is_causal:  # SDPA's is_causal aligns top-left, wrong once keys outnumber queries
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            is_causal = False
        if mask is not None:  # prefix columns always visible
            mask = torch.cat([mask.new_ones(*mask.shape[:-1], P), mask], dim=-1)
    gqa = {}
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves H/Hkv query heads
        if _native_gqa(q, mask):
            gqa = {"enable_gqa": True}  # shared inside the kernel: no H-head copies of k, v saved for backward
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p, **gqa)
    if attn.adapter is not None:
        out = out + attn.adapter(q, attn)
    return out
