"""Tiny random models for the method tests: seeded, in eval mode, small enough to run in milliseconds.

Grouped-query attention (4 query heads share 2 key/value heads) so that GQA bugs show up.
"""

from dataclasses import replace

import torch

from pefttutor.models.bert import Bert, BertConfig
from pefttutor.models.llama import Llama, LlamaConfig

LLAMA = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
BERT = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=32)


def tiny_llama(seed: int = 0, **overrides) -> Llama:
    """A random `Llama` of shape LLAMA (fields in `overrides` replaced)."""
    torch.manual_seed(seed)
    return Llama(replace(LLAMA, **overrides)).eval()


def tiny_bert(seed: int = 0, **overrides) -> Bert:
    """A random `Bert` of shape BERT (fields in `overrides` replaced)."""
    torch.manual_seed(seed)
    return Bert(replace(BERT, **overrides)).eval()


def tiny_hf(family: str, seed: int = 0):
    """transformers' twin of `tiny_llama` / `tiny_bert` (same shapes, its own random weights), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    if family == "llama":
        c = LLAMA
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, tie_word_embeddings=False)).eval()
    c = BERT
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings)).eval()
