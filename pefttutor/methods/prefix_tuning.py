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

The prefix enters each layer as a `kv_prefix` in its `attn.peft` extension point
(`pefttutor/models/attention.py`): always visible, no rotary embedding, never stored in the KV
cache. The `PrefixEncoder` sits in the model's own extension point, which computes P_theta once
per forward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from pefttutor import checks
from pefttutor.models.attention import Attention

from .base import Config, Method, host, host_extension


@dataclass(frozen=True)
class PrefixConfig(Config):
    """What `apply` did, saved with the weights."""

    n_tokens: int  # P, the prefix length (virtual tokens per layer)
    reparam: bool = True  # P_theta = MLP(P'_theta) while training
    hidden: int = 512  # the MLP's width (the paper's 512)

    def check(self) -> None:
        checks.positive_int(self.n_tokens, "n_tokens")
        checks.boolean(self.reparam, "reparam")
        checks.positive_int(self.hidden, "hidden")


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

        Inside a model forward, P_theta was computed and split once (`start_forward`, called by the
        model) and every layer takes its block. One split matters for speed: its backward is one
        concatenation, while L separate slices (of P_theta, or of the MLP's last Linear) would each
        write a zero-filled gradient of the whole tensor, L times per step.
        """
        return (self._layers if self._layers is not None else self.split())[i]

    def start_forward(self) -> None:
        self._layers = self.split()

    def end_forward(self) -> None:  # drop the blocks: their autograd graph lives on in the output's
        self._layers = None

    def extra_repr(self) -> str:
        return f"P={self.n_tokens}, layers={self.n_layers}, kv_dim={self.kv_dim}, reparam={self.reparam}"


class LayerPrefix(nn.Module):
    """Layer i's `kv_prefix`: its slice of the model's PrefixEncoder as (k, v).

    It holds the encoder without registering it, so the encoder's parameters belong to the model
    once (in the model's extension point), not once per layer.
    """

    def __init__(self, encoder: PrefixEncoder, i: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.__dict__["encoder"] = encoder  # not a submodule (see above)
        self.i, self.n_kv_heads, self.head_dim = i, n_kv_heads, head_dim

    def kv_prefix(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:  # each (B, Hkv, P, hd)
        kv = self.encoder.layer(self.i)  # (P, 2 * kv_dim): keys then values
        P = kv.shape[0]
        k, v = kv.view(P, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)  # each (Hkv, P, hd)
        return k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)


def attention_layers(model: nn.Module) -> list[Attention]:
    """The attention modules (Llama or Bert), in layer order."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def prefix_encoder(model: nn.Module) -> PrefixEncoder:
    """The model's PrefixEncoder; ValueError if prefix tuning was never applied."""
    METHOD.get_config(model)
    return host(model, METHOD.title).peft[METHOD.name]


@torch.no_grad()
def drop_reparam(model: nn.Module) -> nn.Module:
    """Replace the MLP by the prefix it computes: P_theta = MLP(P'_theta), once, as a plain Parameter.

    The paper keeps only P_theta after training ("these reparametrization parameters can be
    dropped, and only the prefix needs to be saved"); outputs do not change, and the trainable
    count falls to P * L * 2 * kv_dim. The config becomes reparam=False (saving now writes only
    P_theta). A no-op without the MLP.
    """
    config, encoder = METHOD.get_config(model), prefix_encoder(model)
    if encoder.reparam:
        table = encoder().detach().clone()  # (P, L * 2 * kv_dim)
        del encoder.embedding, encoder.transform
        encoder.prompt_embeddings = nn.Parameter(table)
        METHOD._set_config(model, replace(config, reparam=False))
    return model


class PrefixTuning(Method):
    """Give every attention layer a trainable prefix of `n_tokens` keys and values; freeze the rest.

    One `PrefixEncoder`, in the model's extension point, produces every layer's prefix once per
    model forward; each layer's `LayerPrefix` reads its block. `load` needs n_tokens, reparam and
    (with the MLP) hidden to equal the file's.
    """

    name, title, Config = "prefix_tuning", "prefix tuning", PrefixConfig
    cannot_merge = ("the prefix adds keys and values to every layer's softmax, which no frozen weight "
                    "can express (drop_reparam folds the MLP into the prefix instead)")

    def _must_match(self, saved: PrefixConfig) -> tuple[str, ...]:
        return ("n_tokens", "reparam", "hidden") if saved.reparam else ("n_tokens", "reparam")

    def check(self, model: nn.Module, config: PrefixConfig) -> PrefixConfig:
        host(model, self.title)
        if not attention_layers(model):
            raise ValueError("this model has no Llama or Bert attention layers to give a prefix")
        return config

    def attach(self, model: nn.Module, config: PrefixConfig, init: bool = True) -> None:
        layers = attention_layers(model)
        n_kv, hd = layers[0].n_kv, layers[0].hd
        p = next(model.parameters())
        encoder = PrefixEncoder(config.n_tokens, len(layers), n_kv * hd, config.reparam, config.hidden)
        host(model, self.title).peft[self.name] = encoder.to(device=p.device, dtype=p.dtype)
        for i, attn in enumerate(layers):
            attn.peft[self.name] = LayerPrefix(encoder, i, attn.n_kv, attn.hd)

    def detach(self, model: nn.Module) -> None:
        for module in (host(model, self.title), *attention_layers(model)):
            if self.name in module.peft:
                del module.peft[self.name]

    def modules(self, model: nn.Module, config: PrefixConfig) -> dict[str, nn.Module]:
        return host_extension(model, self.name, self.title)


METHOD = PrefixTuning()
METHOD.export(globals())
