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
default. The prompts enter through the `attn.adapter` hook (`pefttutor/models/attention.py`),
which is computed afresh at every step, so padding and the KV cache need no special care.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pefttutor import checkpoint, params
from pefttutor.models.llama import Llama, LlamaAttention

_METADATA_KEY = "pefttutor.llama_adapter"  # the LlamaAdapterConfig as JSON in the safetensors header
GATE_INITS = ("zero", "random")  # or a number: every gate starts at that value


@dataclass(frozen=True)
class LlamaAdapterConfig:
    """What `apply` did; kept on the model as `model.llama_adapter_config` and saved with the weights."""

    n_tokens: int  # L, the adaption prompt length per layer
    n_layers: int  # adapted layers, counted from the top
    init_gate: str | float = "zero"  # "zero" (the method), "random" (N(0, 1), the ablation) or a number
    train: tuple[str, ...] = ()  # modules trained in full beside the adapter (e.g. "lm_head")


class AdaptionPrompt(nn.Module):
    """One layer's adaption prompt P_l (L, d) and gates g_l (H,); `forward` is the `attn.adapter` hook."""

    def __init__(self, attn: LlamaAttention, n_tokens: int):
        super().__init__()
        like = {"device": attn.k_proj.weight.device, "dtype": attn.k_proj.weight.dtype}
        self.adaption_prompt = nn.Parameter(torch.randn(n_tokens, attn.k_proj.in_features, **like))  # P_l: (L, d)
        self.adaption_gate = nn.Parameter(torch.zeros(attn.n_heads, **like))  # g_l: (H,), one per query head

    def forward(self, q: torch.Tensor, attn: LlamaAttention) -> torch.Tensor:  # q (B, H, T, hd), post-rotary
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


def apply(
    model: nn.Module,
    n_tokens: int = 10,
    n_layers: int | None = None,
    init_gate: str | float = "zero",
    train: str | Iterable[str] = (),
) -> nn.Module:
    """Add an adaption prompt and gates to the top `n_layers` layers (None: all) of a pefttutor Llama.

    Freezes every other parameter; modules named in `train` stay trainable. `init_gate`: "zero"
    (LLaMA-Adapter), "random" (standard normal, the paper's ablation) or a number for every gate.
    Returns the model (changed in place), with the settings recorded as `model.llama_adapter_config`.
    """
    if not isinstance(model, Llama):
        raise ValueError(f"LLaMA-Adapter needs a pefttutor Llama (pefttutor.models.Llama; convert a transformers "
                         f"model with Llama.from_hf), got {type(model).__name__}")
    if adapters(model) or hasattr(model, "llama_adapter_config"):
        raise ValueError("this model already has LLaMA-Adapter prompts; apply it once, to a fresh model")
    layers = model.model.layers
    n_layers = len(layers) if n_layers is None else n_layers
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= len(layers):
        raise ValueError(f"n_layers must be an integer from 1 to the model's {len(layers)} layers, got {n_layers!r}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens (the prompt length) must be a positive integer, got {n_tokens!r}")
    if not (init_gate in GATE_INITS or isinstance(init_gate, (int, float)) and not isinstance(init_gate, bool)):
        raise ValueError(f"init_gate must be one of {GATE_INITS} or a number, got {init_gate!r}")
    if any(layer.self_attn.adapter is not None for layer in layers):
        raise ValueError("an attention layer's `adapter` hook is already in use")
    config = LlamaAdapterConfig(n_tokens=n_tokens, n_layers=n_layers, init_gate=init_gate,
                                train=(train,) if isinstance(train, str) else tuple(train))
    if config.train:
        params.find_modules(model, config.train, nn.Module)  # raises, listing valid names, before any change
    params.freeze(model)
    for layer in layers[len(layers) - n_layers:]:
        layer.self_attn.adapter = AdaptionPrompt(layer.self_attn, n_tokens)
    if init_gate != "zero":  # drawn after all prompts, so a seed gives the same prompts whatever the gates
        with torch.no_grad():
            for adapter in adapters(model).values():
                if init_gate == "random":
                    adapter.adaption_gate.normal_()
                else:
                    adapter.adaption_gate.fill_(float(init_gate))
    params.unfreeze(model, config.train)
    model.llama_adapter_config = config
    return model


def get_config(model: nn.Module) -> LlamaAdapterConfig:
    """The model's LlamaAdapterConfig; ValueError if LLaMA-Adapter was never applied."""
    return checkpoint.attached_config(
        model, "llama_adapter_config", LlamaAdapterConfig, "this model has no LLaMA-Adapter:"
        " call llama_adapter.apply(model) first"
    )


def gates(model: nn.Module) -> torch.Tensor:
    """The gates of the adapted layers, bottom to top: (n_layers, n_heads), detached, on CPU in fp32."""
    get_config(model)
    return torch.stack([a.adaption_gate.detach().float().cpu() for a in adapters(model).values()])


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: every layer's prompt and gates, plus the `train` modules' state.

    Keys are the model's own state_dict keys (`model.layers.29.self_attn.adapter.adaption_prompt`,
    `....adaption_gate`, `<train path>.weight`, ...); the tensors share memory with the model.
    """
    config = get_config(model)
    state = {}
    for path, adapter in adapters(model).items():
        state[f"{path}.adaption_prompt"] = adapter.adaption_prompt.detach()
        state[f"{path}.adaption_gate"] = adapter.adaption_gate.detach()
    state.update(checkpoint.module_state(model, config.train))
    return state


def load_adapter_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy `tensors` into the model's adapter, strictly (`checkpoint.load_strict`): exactly the keys
    of `adapter_state_dict(model)`, each with `prefix` in front, else ValueError and nothing loaded."""
    checkpoint.load_strict(adapter_state_dict(model), tensors, prefix)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write only the adapter (see `adapter_state_dict`) and its config to a safetensors file, atomically."""
    checkpoint.save(adapter_state_dict(model), path, _METADATA_KEY, asdict(get_config(model)))


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter written by `save`. Returns the model.

    On a model without LLaMA-Adapter, it is first applied with the saved settings. On a model that
    has it, n_tokens and n_layers must equal the saved ones (init_gate may differ: the loaded gates
    replace it). Keys and shapes are checked strictly (`load_adapter_state_dict`).
    """
    saved, tensors = checkpoint.read(path, _METADATA_KEY, "LLaMA-Adapter", LlamaAdapterConfig)
    if not hasattr(model, "llama_adapter_config"):
        apply(model, **asdict(saved))
    checkpoint.require_same(get_config(model), saved, ("n_tokens", "n_layers"), path, "LLaMA-Adapter")
    load_adapter_state_dict(model, tensors)
    return model
