"""BERT encoder (all-MiniLM-L6-v2) in one file: post-LN transformer, exact GELU, pooling helpers.

Module names mirror Hugging Face's `BertModel` (pooler included, or left out as HF's
`add_pooling_layer=False` does), so `state_dict()` keys are identical and weights move across
with a strict `load_state_dict`. Shapes: B batch, T tokens, H heads, hd head dim, d hidden_size.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, attend, forward_scope, get_prefix, input_prefix


@dataclass
class BertConfig:
    vocab_size: int = 30522  # defaults: all-MiniLM-L6-v2
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, hf) -> BertConfig:
        """From a transformers `BertConfig` or a config.json dict."""
        c = hf if isinstance(hf, dict) else hf.to_dict()
        if c.get("hidden_act", "gelu") != "gelu" or c.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only GELU with absolute position embeddings is implemented")
        return cls(**{f.name: c[f.name] for f in fields(cls) if c.get(f.name) is not None})


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, inputs_embeds=None, position_ids=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        T = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device)[None]  # (1, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(position_ids)  # single-segment input
        x = x + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(Attention):
    """Bidirectional multi-head self-attention.

    Extensions in `self.peft` (contract in `pefttutor/models/attention.py`): a `kv_prefix` is
    prepended to this layer's keys/values and always visible. Positions are not shifted (pass
    `position_ids` to Bert.forward to reproduce HF, which starts positions at P when the prefix
    comes in as a cache). An `attention_delta(q, attn)` is added to the attention output before
    `attention.output.dense`.
    """

    def __init__(self, cfg: BertConfig):
        n_heads = cfg.num_attention_heads
        super().__init__(n_heads, n_heads, cfg.hidden_size // n_heads)  # no grouped-query attention
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x, mask):  # x (B, T, d), mask bool (B, 1, 1, T) or None
        B, T, d = x.shape
        q, k, v = (lin(x).view(B, T, self.n_heads, self.hd).transpose(1, 2) for lin in (self.query, self.key, self.value))
        y = attend(self, q, k, v, mask, prefix=get_prefix(self, B), dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)


class AddNorm(nn.Module):
    """Project, dropout, add the residual, then LayerNorm (BERT is post-LN)."""

    def __init__(self, d_in: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)  # HF's name, hence "attention.self.query"
        self.output = AddNorm(cfg.hidden_size, cfg)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT was trained


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = AddNorm(cfg.intermediate_size, cfg)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertPooler(nn.Module):
    """HF's pooler: tanh(dense(first token)). Kept so checkpoints load strictly; `forward` skips it."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden):  # (B, T, d) -> (B, d)
        return torch.tanh(self.dense(hidden[:, 0]))


class Bert(nn.Module):
    """Encoder: embeddings (word + position + token type) -> N x post-LN blocks; last hidden states.

    Extensions in `self.peft` (contract in `pefttutor/models/attention.py`): an `input_prefix(B)`
    -> (B, P, d) gives virtual tokens, prepended to the word embeddings *before* position and
    token-type embeddings are added, as HF peft does: virtual tokens take positions 0..P-1 and
    token type 0, real tokens start at P. P ones are prepended to the attention mask; hidden
    states come back for the real tokens only.
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))))
        self.pooler = BertPooler(config) if add_pooling_layer else None  # as HF; sentence-embedding models lack one
        self.peft = nn.ModuleDict()  # the model-level extension point
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # HF's initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, config, add_pooling_layer: bool = True) -> Bert:
        """Randomly initialised, from our `BertConfig` or a transformers one."""
        return cls(config if isinstance(config, BertConfig) else BertConfig.from_hf(config), add_pooling_layer)

    @classmethod
    def from_hf(cls, hf_model) -> Bert:
        """Copy a transformers `BertModel` (with its pooler if it has one; same dtype and device)."""
        p = next(hf_model.parameters())
        model = cls.from_config(hf_model.config, hf_model.pooler is not None).to(device=p.device, dtype=p.dtype)
        state = {k: v for k, v in hf_model.state_dict().items() if k != "embeddings.position_ids"}
        model.load_state_dict(state, strict=True)
        return model.train(hf_model.training)

    def get_input_embeddings(self) -> nn.Embedding:
        """The word embedding matrix (vocab, d), as transformers names the accessor."""
        return self.embeddings.word_embeddings

    def _prepend_soft_prompt(self, input_ids, attention_mask, token_type_ids, inputs_embeds, position_ids):
        """The extensions' `input_prefix`: the same five inputs, each extended by the P virtual tokens, and P."""
        B = (input_ids if inputs_embeds is None else inputs_embeds).shape[0]
        prompt = input_prefix(self.peft, B)  # (B, P, d) or None
        if prompt is None:
            return input_ids, attention_mask, token_type_ids, inputs_embeds, position_ids, 0
        x = self.embeddings.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        prompt = prompt.to(x.dtype)
        B, P = prompt.shape[:2]
        front = torch.zeros(B, P, dtype=torch.long, device=x.device)  # (B, P)
        if attention_mask is not None:
            attention_mask = torch.cat([torch.ones_like(front).to(attention_mask.dtype), attention_mask], dim=1)
        if token_type_ids is not None:
            token_type_ids = torch.cat([front, token_type_ids.expand(B, -1)], dim=1)
        if position_ids is not None:  # virtual tokens at 0..P-1, the given positions shifted by P
            virtual = torch.arange(P, device=x.device).expand(B, P)
            position_ids = torch.cat([virtual, position_ids.expand(B, -1) + P], dim=1)
        return None, attention_mask, token_type_ids, torch.cat([prompt, x], dim=1), position_ids, P

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 real / 0 pad
        token_type_ids: torch.Tensor | None = None,  # (B, T), default all 0
        inputs_embeds: torch.Tensor | None = None,  # (B, T, d) instead of input_ids
        position_ids: torch.Tensor | None = None,  # (B|1, T), default 0..T-1
    ) -> torch.Tensor:  # last hidden states (B, T, d)
        with forward_scope(self.peft):
            return self._forward(input_ids, attention_mask, token_type_ids, inputs_embeds, position_ids)

    def _forward(self, input_ids, attention_mask, token_type_ids, inputs_embeds, position_ids):
        input_ids, attention_mask, token_type_ids, inputs_embeds, position_ids, P = self._prepend_soft_prompt(
            input_ids, attention_mask, token_type_ids, inputs_embeds, position_ids)
        x = self.embeddings(input_ids, token_type_ids, inputs_embeds, position_ids)  # (B, P + T, d)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, P + T)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x[:, P:]  # the real tokens' states (B, T, d)

    def embed(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Sentence embeddings as sentence-transformers' all-MiniLM: mean pool, L2-normalise. (B, d)"""
        return F.normalize(mean_pool(self(input_ids, attention_mask), attention_mask), dim=-1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Average of the real tokens' states: (B, T, d), (B, T) -> (B, d)."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor) -> torch.Tensor:
    """The first ([CLS]) token's state: (B, T, d) -> (B, d)."""
    return hidden[:, 0]


class BertClassifier(nn.Module):
    """A linear `classifier` on pooled Bert states; PEFT methods train it with train=("classifier",)."""

    def __init__(self, bert: Bert, num_classes: int, pooling: str = "mean", dropout: float | None = None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.bert, self.pooling = bert, pooling
        self.dropout = nn.Dropout(bert.config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(bert.config.hidden_size, num_classes)
        p = next(bert.parameters())
        self.classifier.to(device=p.device, dtype=p.dtype)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids, inputs_embeds)  # (B, T, d)
        pooled = mean_pool(hidden, attention_mask) if self.pooling == "mean" else cls_pool(hidden)
        return self.classifier(self.dropout(pooled))  # (B, num_classes)
