"""LLaMA-Adapter: zero-init gated adaption prompts, from scratch (Zhang et al. 2023, arXiv:2303.16199).

In each of the top `n_layers` attention layers l, a learnable *adaption prompt* P_l (L tokens x d)
goes through the layer's frozen key and value projections, and every real token attends to it
with its own softmax, scaled by a learnable gate g_l (one per head, initialized to zero):

    K_l = P_l W_k,   V_l = P_l W_v                          (L, kv_dim): no rotary, always visible
    out = softmax(q K^T / sqrt(hd) + causal mask) V         the frozen layer's attention, unchanged
        + g_l * softmax(q K_l^T / sqrt(hd)) V_l             the gated adaption attention, per head

The sum goes through o_proj as usual. The paper writes it as one attention whose scores over the
prompts are softmax-ed separately and multiplied by g_l; since the real tokens' softmax is not
touched, that is exactly the sum above. With g_l = 0 the model computes exactly the base model,
so training starts from it and the gate opens as far as the prompts help ("zero-init attention").
The paper's ablation (ScienceQA): random-init gates 40.8% vs zero-init 83.9% accuracy.

Trainable: n_layers * n_tokens * d (prompts) + n_layers * n_heads (gates). LLaMA-7B, as in the
paper (L = 10 tokens in the top 30 of 32 layers, d = 4096, 32 heads): 1,228,800 + 960 = 1,229,760.

    model = llama_adapter.apply(model, n_tokens=10)          # freeze all, add prompts and zero gates
    ...train...
    llama_adapter.gates(model)                                # (n_layers, n_heads): how far each opened
    llama_adapter.save(model, "llama_adapter.safetensors")

As in the reference code and HF peft (`adaption_prompt`), the prompts start standard normal and
the softmax runs in fp32. Grouped-query attention: each prompt key/value head serves
n_heads / n_kv_heads query heads. Gates are per head, as in the reference code
(`torch.zeros(1, n_heads, 1, 1)`); peft uses one scalar gate per layer. `n_layers=None` adapts
every layer: the paper's 30 of 32 is nearly all of LLaMA-7B, and the calculator uses the same
default. The prompts enter as an `attention_delta` in each adapted layer's `attn.peft` extension
point (`pefttutor/models/attention.py`), computed afresh at every step, so padding and the KV
cache need no special care.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from pefttutor import checks
from pefttutor.models.llama import Llama, LlamaAttention

from .base import Config, Method

GATE_INITS = ("zero", "random")  # or a number: every gate starts at that value


@dataclass(frozen=True)
class LlamaAdapterConfig(Config):
    """What `apply` did, saved with the weights."""

    n_tokens: int = 10  # L, the adaption prompt length per layer
    n_layers: int | None = None  # adapted layers, counted from the top (None: all, resolved by apply)
    init_gate: str | float = "zero"  # "zero" (the method), "random" (N(0, 1), the ablation) or a number

    def check(self) -> None:
        checks.positive_int(self.n_tokens, "n_tokens (the prompt length)")
        if self.n_layers is not None:
            checks.positive_int(self.n_layers, "n_layers")
        if self.init_gate not in GATE_INITS:
            if isinstance(self.init_gate, str):
                raise ValueError(f"init_gate must be one of {GATE_INITS} or a number, got {self.init_gate!r}")
            checks.number(self.init_gate, "init_gate")


class AdaptionPrompt(nn.Module):
    """One layer's adaption prompt P_l (L, d) and gates g_l (H,), in `attn.peft["llama_adapter"]`."""

    def __init__(self, attn: LlamaAttention, n_tokens: int):
        super().__init__()
        like = {"device": attn.k_proj.weight.device, "dtype": attn.k_proj.weight.dtype}
        self.adaption_prompt = nn.Parameter(torch.randn(n_tokens, attn.k_proj.in_features, **like))  # P_l: (L, d)
        self.adaption_gate = nn.Parameter(torch.zeros(attn.n_heads, **like))  # g_l: (H,), one per query head

    def attention_delta(self, q: torch.Tensor, attn: LlamaAttention) -> torch.Tensor:  # q (B, H, T, hd), post-rotary
        L, H, hd = self.adaption_prompt.shape[0], attn.n_heads, attn.hd
        k = attn.k_proj(self.adaption_prompt).view(L, attn.n_kv, hd).transpose(0, 1)  # (Hkv, L, hd), no rotary
        v = attn.v_proj(self.adaption_prompt).view(L, attn.n_kv, hd).transpose(0, 1)
        k = k.repeat_interleave(H // attn.n_kv, dim=0).to(q.dtype)  # (H, L, hd): GQA, as for real keys
        v = v.repeat_interleave(H // attn.n_kv, dim=0).to(q.dtype)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, L): every prompt token visible
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)  # its own softmax, in fp32
        return (self.adaption_gate.to(q.dtype).view(H, 1, 1) * probs) @ v  # (B, H, T, hd)

    def extra_repr(self) -> str:
        L, d = self.adaption_prompt.shape
        return f"n_tokens={L}, d={d}, heads={self.adaption_gate.numel()}"


def adapters(model: nn.Module) -> dict[str, AdaptionPrompt]:
    """Every AdaptionPrompt in the model, by module path (bottom layer first)."""
    return {path: m for path, m in model.named_modules() if isinstance(m, AdaptionPrompt)}


def gates(model: nn.Module) -> torch.Tensor:
    """The gates of the adapted layers, bottom to top: (n_layers, n_heads), detached, on CPU in fp32."""
    METHOD.get_config(model)
    return torch.stack([a.adaption_gate.detach().float().cpu() for a in adapters(model).values()])


class LlamaAdapter(Method):
    """Add an adaption prompt and gates to the top `n_layers` layers (None: all) of a pefttutor Llama.

    `init_gate`: "zero" (LLaMA-Adapter), "random" (standard normal, the paper's ablation) or a
    number for every gate. `load` needs n_tokens and n_layers to equal the file's (init_gate may
    differ: the loaded gates replace it).
    """

    name, title, Config = "llama_adapter", "LLaMA-Adapter", LlamaAdapterConfig
    must_match = ("n_tokens", "n_layers")
    cannot_merge = ("the gated adaption attention is a second softmax over the prompts, added to every "
                    "adapted layer's attention output: no frozen weight can hold it")

    def check(self, model: nn.Module, config: LlamaAdapterConfig) -> LlamaAdapterConfig:
        if not isinstance(model, Llama):
            raise ValueError(f"LLaMA-Adapter needs a pefttutor Llama (pefttutor.models.Llama; convert a transformers "
                             f"model with Llama.from_hf), got {type(model).__name__}")
        n = len(model.model.layers)
        if config.n_layers is None:
            return replace(config, n_layers=n)
        if config.n_layers > n:
            raise ValueError(f"n_layers must be an integer from 1 to the model's {n} layers, got {config.n_layers!r}")
        return config

    def attach(self, model: nn.Module, config: LlamaAdapterConfig, init: bool = True) -> None:
        layers = model.model.layers
        for layer in layers[len(layers) - config.n_layers:]:
            layer.self_attn.peft[self.name] = AdaptionPrompt(layer.self_attn, config.n_tokens)
        if config.init_gate != "zero":  # drawn after all prompts, so a seed gives the same prompts whatever the gates
            with torch.no_grad():
                for adapter in adapters(model).values():
                    if config.init_gate == "random":
                        adapter.adaption_gate.normal_()
                    else:
                        adapter.adaption_gate.fill_(float(config.init_gate))

    def detach(self, model: nn.Module) -> None:
        for layer in model.model.layers:
            if self.name in layer.self_attn.peft:
                del layer.self_attn.peft[self.name]

    def modules(self, model: nn.Module, config: LlamaAdapterConfig) -> dict[str, nn.Module]:
        return adapters(model)


METHOD = LlamaAdapter()
METHOD.export(globals())
