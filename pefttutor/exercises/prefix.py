"""Exercises of notebook 03 (prefix tuning). Checkers derive answers from the configs and from the package."""

from __future__ import annotations

import torch

from pefttutor.methods.prefix_tuning import LayerPrefix, PrefixEncoder
from pefttutor.models import LlamaConfig

from . import FUNCTION, Exercise, exact_count, expects


def prefix_params(n_tokens: int, n_layers: int, kv_dim: int, reparam: bool = False, hidden: int = 512) -> int:
    """Trainable parameters of a prefix: P L 2 kv_dim, or with the MLP (from P' of width d = kv_dim)
    P d + d hidden + hidden + hidden L 2 kv_dim + L 2 kv_dim."""
    width = n_layers * 2 * kv_dim
    if not reparam:
        return n_tokens * width
    d = kv_dim
    return n_tokens * d + d * hidden + hidden + hidden * width + width


def _kv_dim(cfg: LlamaConfig) -> int:
    return cfg.num_key_value_heads * cfg.head_dim


def smollm2_params(cfg: LlamaConfig = LlamaConfig(), n_tokens: int = 10) -> Exercise:
    """The prefix of SmolLM2 after training (no MLP): grouped-query attention makes kv_dim 192, not 576."""
    return Exercise(
        "SmolLM2 prefix parameters",
        checker=exact_count(prefix_params(n_tokens, cfg.num_hidden_layers, _kv_dim(cfg))),
        hint="every layer stores P keys and P values; a key is n_kv_heads x head_dim = 3 x 64 = 192 numbers "
             "(grouped-query attention: not the hidden size 576).",
        solution=f"{n_tokens} * {cfg.num_hidden_layers} * 2 * {cfg.num_key_value_heads} * {cfg.head_dim}"
                 f"  # = {prefix_params(n_tokens, cfg.num_hidden_layers, _kv_dim(cfg)):,}",
    )


def smollm2_mlp_params(cfg: LlamaConfig = LlamaConfig(), n_tokens: int = 10, hidden: int = 512) -> Exercise:
    """The same prefix while training with the reparameterization MLP (P' of width d = kv_dim, hidden 512)."""
    kv, L = _kv_dim(cfg), cfg.num_hidden_layers
    return Exercise(
        "SmolLM2 prefix parameters with the MLP",
        checker=exact_count(prefix_params(n_tokens, L, kv, reparam=True, hidden=hidden)),
        hint=f"P' is ({n_tokens} x {kv}); Linear({kv} -> {hidden}) and Linear({hidden} -> L*2*kv_dim = {L * 2 * kv}), "
             "both with biases.",
        solution=f"{n_tokens} * {kv} + {kv} * {hidden} + {hidden} + {hidden} * {L * 2 * kv} + {L * 2 * kv}"
                 f"  # = {prefix_params(n_tokens, L, kv, True, hidden):,}",
    )


def layer_prefix() -> Exercise:
    """Implement `layer_kv(P_theta, i, n_kv_heads, head_dim)`: layer i's (keys, values), each (n_kv_heads, P, head_dim)."""

    @expects(FUNCTION)
    def checker(fn):
        with torch.random.fork_rng(devices=[]):  # leave the reader's RNG alone
            torch.manual_seed(0)
            encoder = PrefixEncoder(n_tokens=5, n_layers=4, kv_dim=3 * 2, reparam=False)
        table = encoder.prompt_embeddings.detach()  # (P, L * 2 * kv_dim) = (5, 48)
        for i in range(4):
            want_k, want_v = (t[0] for t in LayerPrefix(encoder, i, n_kv_heads=3, head_dim=2).kv_prefix(1))
            k, v = fn(table.clone(), i, 3, 2)
            assert tuple(k.shape) == tuple(v.shape) == (3, 5, 2), \
                f"shapes {tuple(k.shape)}, {tuple(v.shape)}; expected (n_kv_heads, P, head_dim) = (3, 5, 2)"
            if not (torch.equal(k, want_k) and torch.equal(v, want_v)):
                return False, f"layer {i}: the values differ from prefix_tuning.LayerPrefix's"
        return True

    return Exercise(
        "one layer's prefix",
        checker=checker,
        hint="layer i owns columns [i * 2 kv_dim, (i+1) * 2 kv_dim): keys first, then values; view each "
             "(P, kv_dim) block as (P, n_kv_heads, head_dim) and move the head axis first.",
        solution="def layer_kv(P_theta, i, n_kv_heads, head_dim):\n"
                 "    kv = n_kv_heads * head_dim\n"
                 "    block = P_theta[:, 2 * i * kv:(2 * i + 2) * kv]                 # (P, 2 kv_dim)\n"
                 "    k, v = block[:, :kv], block[:, kv:]\n"
                 "    shape = (P_theta.shape[0], n_kv_heads, head_dim)\n"
                 "    return k.reshape(shape).transpose(0, 1), v.reshape(shape).transpose(0, 1)",
    )
