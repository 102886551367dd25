"""Attention weights of our models, recorded where attention is computed, without touching the model.

Every attention layer of `Llama` and `Bert` ends in one call of `F.scaled_dot_product_attention`
(`pefttutor/models/attention.py`), whose fused kernel never materializes the weights

    A = softmax(q [P_k ; K]^T / sqrt(hd) + mask)        (B, H, T, P + S)

`AttentionRecorder` is a `TorchFunctionMode` (PyTorch's hook on every torch function call): inside
`with AttentionRecorder() as rec:` each such call runs unchanged and `rec.weights` receives A,
recomputed from the very q, k and mask the call got: after rotary, with a prefix's keys in front
and the prefix columns always visible, grouped-query heads shared. One entry per layer, in layer
order. The model knows nothing of it; nothing is registered on it.

    mass, real = attention_maps.prefix_mass(model, ids, mask)   # (B, L, H, T) each; mass + real = 1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .methods import prefix_tuning


def sdpa_weights(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False) -> torch.Tensor:
    """The attention weights (B, H, T, S) that `F.scaled_dot_product_attention` with these arguments
    multiplies `value` by, in fp32."""
    if dropout_p:
        raise ValueError("attention dropout is on: record attention weights in eval mode (model.eval())")
    if key.shape[-3] != query.shape[-3]:  # grouped-query attention: each kv head serves H / Hkv query heads
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    scores = query.float() @ key.float().transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:  # SDPA aligns the causal mask top-left
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1)


class AttentionRecorder(TorchFunctionMode):
    """Within `with AttentionRecorder() as rec:`, every attention call appends its weights to `rec.weights`."""

    def __init__(self):
        super().__init__()
        self.weights: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:  # torch calls made in here bypass the mode
            self.weights.append(sdpa_weights(*args, **kwargs))
        return func(*args, **kwargs)


@torch.no_grad()
def prefix_mass(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """How much attention each query token pays to the prefix-tuned model's P prefix slots, and to
    the real tokens: (prefix, real), each (B, L, H, T), summing to 1 (rows of padding included:
    they see the prefix too)."""
    P = prefix_tuning.get_config(model).n_tokens
    with AttentionRecorder() as recorder:
        model(input_ids, attention_mask)
    layers = len(prefix_tuning.attention_layers(model))
    if len(recorder.weights) != layers:
        raise RuntimeError(f"expected one attention call per layer ({layers}), recorded {len(recorder.weights)}")
    A = torch.stack(recorder.weights, dim=1)  # (B, L, H, T, P + S)
    return A[..., :P].sum(-1), A[..., P:].sum(-1)
