"""From-scratch models whose state_dict keys equal Hugging Face's, and loaders for the real weights."""

from .bert import Bert, BertClassifier, BertConfig, cls_pool, mean_pool
from .llama import Llama, LlamaConfig
from .loading import load_minilm, load_minilm_hf, load_smollm2, load_smollm2_hf

__all__ = [
    "Bert",
    "BertClassifier",
    "BertConfig",
    "Llama",
    "LlamaConfig",
    "cls_pool",
    "load_minilm",
    "load_minilm_hf",
    "load_smollm2",
    "load_smollm2_hf",
    "mean_pool",
]
