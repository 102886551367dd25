"""Attention core shared by Llama and Bert, and the one extension point PEFT methods plug into.

The base model knows nothing of any method. Every attention module (`LlamaAttention`,
`BertSelfAttention`) and every model (`Llama`, `Bert`) has `peft`, an `nn.ModuleDict` that is
empty by default (so state_dict keys stay Hugging Face's); a method puts its module there under
its registry name, and the host calls whichever of these the modules define, in insertion order,
so methods stack:

* attention, `kv_prefix(batch_size) -> (k, v)`, each (B, n_kv_heads, P, head_dim) (prefix
  tuning): prepended to the layer's keys/values, always visible (no causal or padding mask
  applies to them), no rotary embedding. Llama shifts the rope positions of the real tokens by P,
  as Hugging Face does when the prefix is handed in as a key/value cache of length P. A prefix
  never enters the KV cache: it is prepended again at every decoding step.
* attention, `attention_delta(q, attn) -> extra` (LLaMA-Adapter): q the queries after rotary
  (B, n_heads, T, head_dim), `attn` the attention module; the returned (B, n_heads, T, head_dim)
  is added to the attention output before the output projection.
* model, `input_prefix(batch_size) -> (B, P, d)` (prompt tuning): virtual tokens prepended to the
  embedded input (see `Llama` and `Bert`).
* model, `start_forward()` / `end_forward()`: called around each forward of the model (prefix
  tuning computes every layer's prefix once per forward).

Masks are boolean, True = may attend, broadcastable to (B, 1, T, S).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class Attention(nn.Module):
    """Base of our attention modules: head sizes every method may read, and the `peft` extension point."""

    def __init__(self, n_heads: int, n_kv: int, hd: int):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv, hd  # H, Hkv (= H without grouped-query), head_dim
        self.peft = nn.ModuleDict()


def extensions(peft: nn.ModuleDict, hook: str) -> list:
    """The `hook` methods of the modules in a `peft` extension point, in insertion order."""
    return [getattr(m, hook) for m in peft.values() if hasattr(m, hook)]


@contextlib.contextmanager
def forward_scope(peft: nn.ModuleDict):
    """Run a model forward between its extensions' `start_forward()` and `end_forward()`."""
    for start in extensions(peft, "start_forward"):
        start()
    try:
        yield
    finally:
        for end in extensions(peft, "end_forward"):
            end()


def _native_gqa(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether SDPA's fast kernel shares the kv heads itself (`enable_gqa`, torch >= 2.5): the CPU
    flash kernel does, with or without a mask; on GPUs only flash attention does, which takes no mask
    (with one, SDPA would fall back to its slow math kernel, so k and v are repeated instead)."""
    return _SDPA_HAS_GQA and (mask is None or q.device.type == "cpu")


def get_prefix(attn: Attention, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every extension's prefix (k, v), concatenated along the key axis; None when there is none (P == 0)."""
    parts = [kv_prefix(batch_size) for kv_prefix in extensions(attn.peft, "kv_prefix")]
    parts = [(k, v) for k, v in parts if k.shape[2]]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)


def attend(
    attn: Attention,
    q: torch.Tensor,  # (B, H, T, hd)
    k: torch.Tensor,  # (B, Hkv, S, hd)  S = cached + new tokens
    v: torch.Tensor,  # (B, Hkv, S, hd)
    mask: torch.Tensor | None,  # bool, broadcastable to (B, 1, T, S); None = all visible
    is_causal: bool = False,  # only with mask=None and S == T (no cache)
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,  # from get_prefix
    dropout_p: float = 0.0,
) -> torch.Tensor:  # (B, H, T, hd)
    """Scaled dot-product attention with the extensions' prefixes and attention deltas applied."""
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
    for delta in extensions(attn.peft, "attention_delta"):
        out = out + delta(q, attn)
    return out


def input_prefix(peft: nn.ModuleDict, batch_size: int) -> torch.Tensor | None:
    """Every model extension's virtual tokens, concatenated: (B, P, d), or None when there are none."""
    parts = [prefix(batch_size) for prefix in extensions(peft, "input_prefix")]
    return torch.cat(parts, dim=1) if parts else None
