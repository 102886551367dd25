"""Exercises of notebook 03 (prefix tuning). Checkers derive answers from the configs and from the package,
or (the experiment) by measuring on the reader's model themselves."""

from __future__ import annotations

import functools

import torch

from pefttutor import attention_maps
from pefttutor.methods.prefix_tuning import LayerPrefix, PrefixEncoder
from pefttutor.models import LlamaConfig

from . import FUNCTION, INT, Exercise, exact_count, expects


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


def prefix_attention_layer(model, input_ids: torch.Tensor) -> Exercise:
    """The experiment: which layer of the prefix-tuned `model` gives its prefix the largest share of
    attention on `input_ids` (1, T), averaged over the heads and the query tokens: what the attention
    viewer's left panel shows, row by row. The checker measures it itself (`attention_maps.prefix_mass`,
    once, at the first check), so the answer is verified against the model, not a stored number."""

    @functools.cache
    def shares() -> tuple[float, ...]:
        prefix, _ = attention_maps.prefix_mass(model, input_ids)  # (1, L, H, T)
        return tuple(prefix[0].mean((-2, -1)).tolist())  # (L,): each layer's mean share

    @expects(INT)
    def checker(answer):
        s = shares()
        L, top = len(s), max(s)
        low = min(range(L), key=s.__getitem__)
        if not 0 <= answer < L:
            return False, f"the layers are numbered 0 to {L - 1}"
        if s[answer] == top:
            return True, (f"layer {answer} gives the prefix {top:.1%} of its attention; the least is layer {low}'s, "
                          f"{s[low]:.1%}")
        if answer == low:
            return False, f"layer {answer} is the one that gives the prefix the least ({s[low]:.1%})"
        return False, f"layer {answer} gives the prefix {s[answer]:.1%}; another layer gives it more"

    return Exercise(
        "the layer that attends most to the prefix",
        checker=checker,
        hint="choose the example in the viewer and move the layer slider, reading the share it prints for each "
             "layer; or take attention_viewer.state['prefix'] (layers x heads), average over the heads and find "
             "the largest.",
        solution="attention_viewer.set(example=first_example)\n"
                 "answer = int(attention_viewer.state['prefix'].mean(-1).argmax())\n"
                 "# the same from the pure function: attention_maps.prefix_mass(llm, ids)[0][0].mean((-2, -1)).argmax()",
    )
