"""Prefix tuning, from scratch (Li & Liang 2021, arXiv:2101.00190).

Every attention layer l gets P trainable key and value vectors in front of the real tokens' own,
so every token can attend to them, while all pretrained weights stay frozen:

    head = softmax(q [P_k^l ; K]^T / sqrt(hd)) [P_v^l ; V]        P_k^l, P_v^l: (P, kv_dim)

Stacked over the L layers the whole prefix is one matrix P_theta of shape (P, L * 2 * kv_dim),
laid out per layer as keys then values (HF peft's `prompt_embeddings` layout), with
kv_dim = n_kv_heads * head_dim. Trainable: P * L * 2 * kv_dim.

Optimizing P_theta directly is unstable (paper, section 4.3), so by default it is
reparameterized through an MLP from a smaller matrix P'_theta (P x d), here with d = kv_dim
(peft's `token_dim`; the hidden size for models without grouped-query attention):

    P_theta[i, :] = W_2 tanh(W_1 P'_theta[i, :] + b_1) + b_2     W_1: (hidden, d), W_2: (L*2*kv_dim, hidden)

Trainable then: P d + d hidden + hidden + hidden L 2 kv_dim + L 2 kv_dim. After training the
MLP is not needed any more: `drop_reparam` computes P_theta once and keeps only it.

    model = prefix_tuning.apply(model, n_tokens=10)          # freeze all, add the prefix (with MLP)
    ...train...
    prefix_tuning.drop_reparam(model)                         # keep only P_theta: P L 2 kv_dim numbers
    prefix_tuning.save(model, "prefix.safetensors")

The prefix enters each layer through the `attn.prefix` hook (`pefttutor/models/attention.py`):
always visible, no rotary embedding, never stored in the KV cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from pefttutor import checkpoint, params
from pefttutor.models.bert import BertSelfAttention
from pefttutor.models.llama import LlamaAttention

_METADATA_KEY = "pefttutor.prefix_tuning"  # the PrefixConfig as JSON in the safetensors header
ENCODER = "prefix_encoder"  # the attribute of the model that holds every layer's prefix


@dataclass(frozen=True)
class PrefixConfig:
    """What `apply` did; kept on the model as `model.prefix_config` and saved with the weights."""

    n_tokens: int  # P, the prefix length (virtual tokens per layer)
    reparam: bool = True  # P_theta = MLP(P'_theta) while training
    hidden: int = 512  # the MLP's width (the paper's 512)
    train: tuple[str, ...] = ()  # modules trained in full beside the prefix (e.g. a classifier head)


class PrefixEncoder(nn.Module):
    """All layers' prefixes P_theta (P, L * 2 * kv_dim): a free Parameter, or the MLP of P'_theta."""

    def __init__(self, n_tokens: int, n_layers: int, kv_dim: int, reparam: bool = True, hidden: int = 512):
        super().__init__()
        self.n_tokens, self.n_layers, self.kv_dim = n_tokens, n_layers, kv_dim
        width = n_layers * 2 * kv_dim
        if reparam:
            self.embedding = nn.Embedding(n_tokens, kv_dim)  # P'_theta: (P, d), d = kv_dim; N(0, 1) as in peft
            self.transform = nn.Sequential(  # the MLP, with PyTorch's (and peft's) default init
                nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, width)
            )
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(n_tokens, width))  # P_theta: N(0, 1) as in peft
        self._layers: tuple[torch.Tensor, ...] | None = None  # P_theta split per layer during one model forward

    @property
    def reparam(self) -> bool:
        return hasattr(self, "transform")

    def forward(self) -> torch.Tensor:
        """P_theta, every layer at once: (P, L * 2 * kv_dim)."""
        if not self.reparam:
            return self.prompt_embeddings
        return self.transform(self.embedding.weight)

    def split(self) -> tuple[torch.Tensor, ...]:
        """P_theta split into the L layers' (P, 2 * kv_dim) blocks (views of one computation)."""
        return self().split(2 * self.kv_dim, dim=1)

    def layer(self, i: int) -> torch.Tensor:
        """Layer i's keys then values, (P, 2 * kv_dim): columns [i * 2 kv_dim, (i+1) * 2 kv_dim) of P_theta.

        Inside a model forward, P_theta was computed and split once by the model's forward pre-hook
        (`_compute_prefix`) and every layer takes its block. One split matters for speed: its
        backward is one concatenation, while L separate slices (of P_theta, or of the MLP's last
        Linear) would each write a zero-filled gradient of the whole tensor, L times per step.
        """
        return (self._layers if self._layers is not None else self.split())[i]

    def extra_repr(self) -> str:
        return f"P={self.n_tokens}, layers={self.n_layers}, kv_dim={self.kv_dim}, reparam={self.reparam}"


def _compute_prefix(model: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of the model: compute P_theta once for all layers of this forward."""
    encoder = getattr(model, ENCODER)
    encoder._layers = encoder.split()


def _release_prefix(model: nn.Module, args, kwargs, output) -> None:
    """Forward hook of the model: drop the blocks (their autograd graph lives on in the output's)."""
    getattr(model, ENCODER)._layers = None


class LayerPrefix:
    """The `attn.prefix` hook of layer i: its slice of the model's PrefixEncoder as (k, v).

    A plain object, not an nn.Module, so the encoder's parameters belong to the model once (at
    `model.prefix_encoder`), not once per layer.
    """

    def __init__(self, encoder: PrefixEncoder, i: int, n_kv_heads: int, head_dim: int):
        self.encoder, self.i, self.n_kv_heads, self.head_dim = encoder, i, n_kv_heads, head_dim

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:  # each (B, Hkv, P, hd)
        kv = self.encoder.layer(self.i)  # (P, 2 * kv_dim): keys then values
        P = kv.shape[0]
        k, v = kv.view(P, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)  # each (Hkv, P, hd)
        return k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules with a prefix hook (Llama or Bert), in layer order."""
    return [m for m in model.modules() if isinstance(m, (LlamaAttention, BertSelfAttention))]


def _kv_heads(attn: nn.Module) -> int:
    return attn.n_kv if isinstance(attn, LlamaAttention) else attn.n_heads  # Bert: no grouped-query attention


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def apply(
    model: nn.Module,
    n_tokens: int,
    reparam: bool = True,
    hidden: int = 512,
    train: str | Iterable[str] = (),
) -> nn.Module:
    """Give every attention layer a trainable prefix of `n_tokens` keys and values; freeze the rest.

    One `PrefixEncoder` at `model.prefix_encoder` produces every layer's prefix, once per model
    forward (a forward pre-hook on the model); each layer's `attn.prefix` hook reads its block.
    Modules named in `train` (e.g. "classifier") stay fully trainable. Bad sizes, unknown `train`
    names and applying twice raise ValueError.
    Returns the model (changed in place), with the settings recorded as `model.prefix_config`.
    """
    layers = attention_layers(model)
    if not layers:
        raise ValueError("this model has no Llama or Bert attention layers to give a prefix")
    if hasattr(model, "prefix_config") or any(attn.prefix is not None for attn in layers):
        raise ValueError("this model already has a prefix; apply prefix tuning once, to a fresh model")
    config = PrefixConfig(
        n_tokens=_positive_int(n_tokens, "n_tokens"),
        reparam=bool(reparam),
        hidden=_positive_int(hidden, "hidden"),
        train=(train,) if isinstance(train, str) else tuple(train),
    )
    if config.train:
        params.find_modules(model, config.train, nn.Module)  # raises, listing valid names, on a typo
    n_kv, hd = _kv_heads(layers[0]), layers[0].hd
    p = next(model.parameters())
    encoder = PrefixEncoder(config.n_tokens, len(layers), n_kv * hd, config.reparam, config.hidden)
    params.freeze(model)
    setattr(model, ENCODER, encoder.to(device=p.device, dtype=p.dtype))
    for i, attn in enumerate(layers):
        attn.prefix = LayerPrefix(encoder, i, _kv_heads(attn), attn.hd)
    model.register_forward_pre_hook(_compute_prefix, with_kwargs=True)
    model.register_forward_hook(_release_prefix, with_kwargs=True)
    params.unfreeze(model, config.train)
    model.prefix_config = config
    return model


def get_config(model: nn.Module) -> PrefixConfig:
    """The model's PrefixConfig; ValueError if prefix tuning was never applied."""
    return checkpoint.attached_config(
        model, "prefix_config", PrefixConfig, "this model has no prefix:"
        " call prefix_tuning.apply(model, n_tokens) first"
    )


def prefix_encoder(model: nn.Module) -> PrefixEncoder:
    """The model's PrefixEncoder (`model.prefix_encoder`); ValueError if prefix tuning was never applied."""
    get_config(model)
    return getattr(model, ENCODER)


@torch.no_grad()
def drop_reparam(model: nn.Module) -> nn.Module:
    """Replace the MLP by the prefix it computes: P_theta = MLP(P'_theta), once, as a plain Parameter.

    The paper keeps only P_theta after training ("these reparametrization parameters can be
    dropped, and only the prefix needs to be saved"); outputs do not change, and the trainable
    count falls to P * L * 2 * kv_dim. The config becomes reparam=False (saving now writes only
    P_theta). A no-op without the MLP.
    """
    config, encoder = get_config(model), prefix_encoder(model)
    if encoder.reparam:
        table = encoder().detach().clone()  # (P, L * 2 * kv_dim)
        del encoder.embedding, encoder.transform
        encoder.prompt_embeddings = nn.Parameter(table)
        model.prefix_config = replace(config, reparam=False)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: the PrefixEncoder's parameters plus the `train` modules' state.

    Keys are the model's own state_dict keys (`prefix_encoder.prompt_embeddings`, or
    `prefix_encoder.embedding.weight` and `prefix_encoder.transform.*` with the MLP, and e.g.
    `classifier.weight`); the tensors share memory with the model.
    """
    return checkpoint.module_state(model, (ENCODER, *get_config(model).train))


def load_adapter_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy `tensors` into the model's prefix strictly (`checkpoint.load_strict`)."""
    checkpoint.load_strict(adapter_state_dict(model), tensors, prefix)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write only the adapter (see `adapter_state_dict`) and its PrefixConfig to a safetensors file, atomically."""
    checkpoint.save(adapter_state_dict(model), path, _METADATA_KEY, asdict(get_config(model)))


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter written by `save`. Returns the model.

    On a model without a prefix, prefix tuning is first applied with the saved settings. On a model
    that has one, n_tokens, reparam and (with the MLP) hidden must equal the saved ones. Keys and
    shapes are checked strictly.
    """
    saved, tensors = checkpoint.read(path, _METADATA_KEY, "prefix tuning", PrefixConfig)
    if not hasattr(model, "prefix_config"):
        apply(model, **asdict(saved))
    names = ("n_tokens", "reparam", "hidden") if saved.reparam else ("n_tokens", "reparam")
    checkpoint.require_same(get_config(model), saved, names, path, "prefix")
    load_adapter_state_dict(model, tensors)
    return model
