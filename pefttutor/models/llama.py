"""Llama (SmolLM2) in one file: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Module names mirror Hugging Face's `LlamaForCausalLM`, so `state_dict()` keys are identical
and weights move across with a strict `load_state_dict`. Shapes: B batch, T new tokens,
S = cached + new tokens, H query heads, Hkv key/value heads, hd head_dim, d hidden_size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, attend, forward_scope, get_prefix, input_prefix

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v), each (B, Hkv, S, hd), after rotary


@dataclass
class LlamaConfig:
    vocab_size: int = 49152  # defaults: SmolLM2-135M
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 2
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    @classmethod
    def from_hf(cls, hf) -> LlamaConfig:
        """From a transformers `LlamaConfig` (or its `to_dict()`); rejects what we don't implement."""
        c = hf if isinstance(hf, dict) else hf.to_dict()
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only default rope is implemented, got {rope}")
        if c.get("attention_bias") or c.get("mlp_bias") or c.get("hidden_act", "silu") != "silu":
            raise ValueError("only bias-free projections with SiLU are implemented")
        kw = {f.name: c[f.name] for f in fields(cls) if c.get(f.name) is not None}
        kw["rope_theta"] = rope.get("rope_theta", c.get("rope_theta", cls.rope_theta))
        kw["head_dim"] = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        kw.setdefault("num_key_value_heads", c["num_attention_heads"])
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # None is meaningful here
            kw[name] = c.get(name)
        return cls(**kw)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):  # (..., d)
        h = x.float()  # statistics in fp32, as HF does, so bf16 runs stay stable
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables for rotary embeddings; nothing persistent, so state_dict keys equal HF's."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # plain fp32 attribute, not a buffer: `.to(bfloat16)` must not round the frequencies
        # (moved to the input's device on first use; built on CPU even under a meta-device init)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):  # (B|1, T) -> cos, sin (B|1, 1, T, hd)
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # (B|1, T, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # HF layout: rotate the two halves, not pairs
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rotary(x, cos, sin):  # x (B, heads, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LlamaAttention(Attention):
    """Grouped-query causal self-attention with rotary positions.

    Extensions in `self.peft` (contract in `pefttutor/models/attention.py`): a `kv_prefix` is
    prepended to this layer's keys/values, always visible, no rotary; the real tokens' rope
    positions shift by its length P, exactly as HF does when the prefix arrives as
    `past_key_values` of length P (and an attention mask extended by P ones). It is not stored in
    the KV cache but re-prepended every step. An `attention_delta(q, attn)` (q post-rotary) is
    added to the attention output before o_proj.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, rope_at, mask, is_causal, cache=None):  # x (B, T, d)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        prefix = get_prefix(self, B)
        cos, sin = rope_at(0 if prefix is None else prefix[0].shape[2])
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, Hkv, S, hd)
        y = attend(self, q, k, v, mask, is_causal, prefix)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        return self.o_proj(y), (k, v)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):  # SwiGLU: a SiLU gate multiplies a linear "up" path
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope_at, mask, is_causal, cache=None):  # pre-norm residual block
        h, kv = self.self_attn(self.input_layernorm(x), rope_at, mask, is_causal, cache)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class Llama(nn.Module):
    """Decoder-only LM: embed -> N x (attention, SwiGLU) pre-norm blocks -> norm -> lm_head.

    Extensions in `self.peft` (contract in `pefttutor/models/attention.py`): an `input_prefix(B)`
    -> (B, P, d) gives virtual tokens. When there is no cache, they are prepended to the token
    embeddings at positions 0..P-1 (real tokens start at P) and enter the KV cache like any
    token. The attention mask the caller passes covers only the real tokens (cached + new); P ones
    are prepended to it, also while decoding from a cache that holds the virtual tokens. Logits
    are returned for the real tokens only, so losses, scoring and `generate` work unchanged.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(  # the name HF uses, so keys read "model.layers.0..."
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        self.peft = nn.ModuleDict()  # the model-level extension point
        self.apply(self._init_weights)
        if config.tie_word_embeddings:  # one matrix both embeds tokens and scores them
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(m):  # HF's initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    @classmethod
    def from_config(cls, config) -> Llama:
        """Randomly initialised, from our `LlamaConfig` or a transformers one."""
        return cls(config if isinstance(config, LlamaConfig) else LlamaConfig.from_hf(config))

    @classmethod
    def from_hf(cls, hf_model) -> Llama:
        """Copy a transformers `LlamaForCausalLM` (same dtype and device)."""
        p = next(hf_model.parameters())
        model = cls.from_config(hf_model.config).to(device=p.device, dtype=p.dtype)
        model.load_state_dict(hf_model.state_dict(), strict=True)
        return model.train(hf_model.training)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding matrix (vocab, d), as transformers names the accessor."""
        return self.model.embed_tokens

    def _positions_and_mask(self, attention_mask, B, T, past, device):
        """Rope positions (B, T), or (1, T) when every row has the same, and a bool mask
        (B|1, 1, T, past+T) or None with is_causal."""
        if attention_mask is not None and past == 0 and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention, SDPA's is_causal path (as HF does)
        if attention_mask is None:
            positions = torch.arange(past, past + T, device=device)[None]  # (1, T): cos/sin broadcast over B
            if past == 0 or T == 1:  # plain causal, or one new token that sees everything
                return positions, None, past == 0 and T > 1
        else:
            # HF generate's convention: count only real tokens, so a left-padded row starts at 0
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, past:]
        q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(past + T, device=device)[None]  # (1, S)
        mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S) causal
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]  # padding keys hidden
            mask = mask | (k_pos == q_pos)  # a pad query still sees itself: no all-masked rows (NaN)
        return positions, mask, False

    def _prepend_soft_prompt(self, x, attention_mask, past):
        """The extensions' `input_prefix`: (x, attention_mask, P) with the P virtual tokens put in front
        of x (B, T, d) when nothing is cached yet, and P ones in front of the mask (B, past - P + T)."""
        prompt = input_prefix(self.peft, x.shape[0])  # (B, P, d) or None
        if prompt is None:
            return x, attention_mask, 0
        prompt = prompt.to(x.dtype)
        P = prompt.shape[1]
        if past == 0:  # with a cache, the virtual tokens are already in it
            x = torch.cat([prompt, x], dim=1)  # (B, P + T, d)
        if attention_mask is not None:
            if attention_mask.shape[1] + P != past + x.shape[1]:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, expected {past + x.shape[1] - P}: "
                                 f"the real tokens, cached and new, without the {P} virtual ones")
            attention_mask = torch.cat([attention_mask.new_ones(x.shape[0], P), attention_mask], dim=1)
        return x, attention_mask, P

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, past + T), 1 real / 0 pad, left or right; real tokens only
        inputs_embeds: torch.Tensor | None = None,  # (B, T, d) instead of input_ids (soft prompts)
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_at: torch.Tensor | None = None,  # bool (B, T): score only these positions
    ):
        """Logits (B, T, vocab); with use_cache, (logits, cache) where cache covers past + T.

        With `logits_at`, only the selected positions go through the norm and the LM head, and the
        logits come back as (N, vocab), N = logits_at.sum(), in row-major order. Training needs
        scores only where a label is (the target tokens), and the head (d x vocab) is the model's
        largest matrix product per token, so this saves its compute and the (B, T, vocab) logits.
        """
        with forward_scope(self.peft):
            return self._forward(input_ids, attention_mask, inputs_embeds, past_key_values, use_cache, logits_at)

    def _forward(self, input_ids, attention_mask, inputs_embeds, past_key_values, use_cache, logits_at):
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        x, attention_mask, P = self._prepend_soft_prompt(x, attention_mask, past)
        B, T, _ = x.shape
        positions, mask, is_causal = self._positions_and_mask(attention_mask, B, T, past, x.device)
        # cos/sin for positions shifted by a layer's prefix length; computed once per offset
        rope_at = functools.cache(lambda offset: self.rotary(positions + offset, x.dtype))
        cache = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, rope_at, mask, is_causal, None if past_key_values is None else past_key_values[i])
            cache.append(kv)
        if P and past == 0:
            x = x[:, P:]  # drop the virtual tokens' states: (B, T_real, d)
        if logits_at is not None:
            x = x[logits_at]  # (N, d)
        logits = self.lm_head(self.model.norm(x))  # (B, T, vocab), or (N, vocab)
        return (logits, cache) if use_cache else logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,  # (B, T), left-padded for batches
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,  # default: config's
        pad_token_id: int | None = None,  # written after a row's eos; default: config's, else eos
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # (B, T + new), new <= max_new_tokens (stops once every row hit eos)
        """Greedy or sampled decoding with a KV cache; matches HF `generate` for greedy."""
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else self.config.pad_token_id
        pad = pad if pad is not None else (int(eos[0]) if len(eos) else 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        seqs, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits, cache = self(input_ids, attention_mask, use_cache=True)  # prefill the prompt
        for step in range(max_new_tokens):
            scores = logits[:, -1].float()  # (B, vocab)
            if do_sample:
                probs = F.softmax(_filter(scores / temperature, top_k, top_p), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                token = scores.argmax(-1)
            token = token.masked_fill(done, pad)  # finished rows only get padding
            seqs = torch.cat([seqs, token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
            done = done | torch.isin(token, eos)
            if done.all() or step == max_new_tokens - 1:
                break
            logits, cache = self(token[:, None], attention_mask, past_key_values=cache, use_cache=True)
        return seqs


def _filter(scores, top_k, top_p):  # (B, vocab) -> same, excluded tokens at -inf
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, idx = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) > top_p  # keep the smallest set reaching top_p (>= 1 token)
        scores = scores.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return scores
