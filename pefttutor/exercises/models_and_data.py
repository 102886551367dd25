"""Exercises of notebook 00 (models and data). Checkers derive answers from the configs, not constants."""

from __future__ import annotations

from pefttutor.models import LlamaConfig

from . import Exercise, close_to, exact_count


def llama_block_params(cfg: LlamaConfig) -> int:
    """Parameters of one decoder block: 4 attention + 3 MLP projections (no biases), 2 RMSNorms."""
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    attention = 2 * d * cfg.num_attention_heads * cfg.head_dim + 2 * d * kv  # q, o and k, v
    return attention + 3 * d * cfg.intermediate_size + 2 * d


def block_params(cfg: LlamaConfig = LlamaConfig()) -> Exercise:
    expected = llama_block_params(cfg)
    return Exercise(
        "parameters of one decoder block",
        checker=exact_count(expected),
        hint="q_proj and o_proj are 576x576, k_proj and v_proj are 192x576 (3 heads x 64), "
        "gate/up/down are 576x1536 each; no biases; two RMSNorm weight vectors of 576.",
        solution="2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576  # = 3,540,096",
    )


def embedding_share(total_params: int, cfg: LlamaConfig = LlamaConfig()) -> Exercise:
    return Exercise(
        "embedding share",
        checker=close_to(cfg.vocab_size * cfg.hidden_size / total_params, rel=1e-2),
        hint="divide 49152 * 576 by the total parameter count printed in section 1",
        solution="49152 * 576 / 134_515_008  # about 0.21: a fifth of a small LM is its vocabulary",
    )
