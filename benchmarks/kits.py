"""Each benchmarked base model in both implementations, with the task a step trains: pefttutor's
from-scratch Llama / Bert and the transformers model with the same weights."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pefttutor.models import Bert, BertClassifier, Llama, mean_pool
from pefttutor.train import causal_lm_loss, classification_loss


class LMTask(nn.Module):
    """Logits (B, T, vocab) of the input's T positions, from either implementation.

    Soft prompts prepend virtual positions; only the last T are scored, by both implementations.
    """

    def __init__(self, model: nn.Module, hf: bool):
        super().__init__()
        self.model, self.hf = model, hf

    def forward(self, input_ids, attention_mask, logits_at=None):  # (B, T), (B, T), bool (B, T) for ours
        if not self.hf:  # ours returns the real tokens' logits only; causal_lm_loss passes logits_at
            return self.model(input_ids=input_ids, attention_mask=attention_mask, logits_at=logits_at)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -input_ids.shape[1]:]


class HFBertClassifier(nn.Module):
    """pefttutor's BertClassifier (mean pool, dropout, linear) on a transformers BertModel."""

    def __init__(self, bert: nn.Module, num_classes: int, dropout: float):
        super().__init__()
        self.bert, self.dropout = bert, nn.Dropout(dropout)
        self.classifier = nn.Linear(bert.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden[:, -input_ids.shape[1]:]  # drop soft-prompt positions, if any: (B, T, d)
        return self.classifier(self.dropout(mean_pool(hidden, attention_mask)))  # (B, C)


@dataclass
class Kit:
    """One base model in both implementations, with what a benchmark needs to train and run it."""

    name: str  # "smollm2" | "minilm" (tiny random models keep these names)
    ours: nn.Module  # pristine, eval mode; copied for every configuration
    hf: nn.Module
    qv: tuple[str, ...]  # LoRA on the attention's query and value projections
    all_linear: tuple[str, ...]  # LoRA on every linear layer of the blocks (not lm_head / pooler)
    vocab: int
    num_classes: int = 2

    @property
    def causal(self) -> bool:
        return self.name == "smollm2"

    @property
    def train_heads(self) -> tuple[str, ...]:  # modules trained in full beside the method
        return () if self.causal else ("classifier",)

    def task(self, model: nn.Module, impl: str) -> nn.Module:
        """Wrap a (method-applied) base model into the module a step calls: logits out."""
        if self.causal:
            return LMTask(model, hf=impl == "peft")
        if impl == "pefttutor":
            return model  # already a BertClassifier (methods are applied to it, head included)
        torch.manual_seed(0)
        head = HFBertClassifier(model, self.num_classes, self.ours.config.hidden_dropout_prob)
        return head.to(next(model.parameters()).device)

    def fresh(self, impl: str) -> nn.Module:
        """A copy of the base model to apply a method to: Llama / BertClassifier, or the HF model."""
        if impl == "peft":
            return copy.deepcopy(self.hf)
        model = copy.deepcopy(self.ours)
        if self.causal:
            return model
        torch.manual_seed(0)
        return BertClassifier(model, self.num_classes)

    def loss(self, task: nn.Module, batch: dict, impl: str) -> torch.Tensor:
        """Each implementation's own loss, as its users train: for the LM, pefttutor.train.causal_lm_loss
        and transformers' loss from `labels` (inside the model; peft adds -100 labels for soft prompts);
        for the classifier, both cross-entropy of the same head's logits."""
        if not self.causal:
            return classification_loss(task, batch)
        if impl == "peft":
            return task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
        return causal_lm_loss(task, batch)

    def batch(self, B: int, T: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Random tokens (ids >= 5: no special tokens), all real (no padding), fixed seed."""
        g = torch.Generator().manual_seed(B * 1000 + T)
        ids = torch.randint(5, self.vocab, (B, T), generator=g)
        labels = ids.clone() if self.causal else torch.randint(0, self.num_classes, (B,), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device)}


# Random-weight stand-ins: "random" has the real models' shapes (pefttutor's config defaults are
# SmolLM2-135M and all-MiniLM-L6-v2), "tiny" is for the harness's own test.
TINY = {"smollm2": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        "minilm": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=64)}


def _random_pair(name: str, weights: str) -> tuple[nn.Module, nn.Module]:
    """(pefttutor model, transformers model) with the same random weights."""
    import transformers

    from pefttutor.models import BertConfig, LlamaConfig

    ours_cls, config_cls = (Llama, LlamaConfig) if name == "smollm2" else (Bert, BertConfig)
    config = asdict(config_cls(**TINY[name])) if weights == "tiny" else asdict(config_cls())
    hf_cls, hf_config = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if name == "smollm2"
                         else (transformers.BertModel, transformers.BertConfig))
    torch.manual_seed(0)
    hf = hf_cls(hf_config(**config, attn_implementation="sdpa")).eval()
    return ours_cls.from_hf(hf).eval(), hf


def load_kit(name: str, device: torch.device, weights: str = "real") -> Kit:
    """SmolLM2 or MiniLM in both implementations: the real checkpoints (`weights="real"`: load_smollm2 /
    load_smollm2_hf, load_minilm / load_minilm_hf) or random weights ("random": the same shapes, for
    machines without the weight packages; "tiny": a few thousand parameters, for tests)."""
    if name not in ("smollm2", "minilm"):
        raise ValueError(f"unknown model {name!r}; valid: smollm2, minilm")
    if weights != "real":
        ours, hf = _random_pair(name, weights)
        ours, hf = ours.to(device), hf.to(device)
    elif name == "smollm2":
        from pefttutor.models import load_smollm2, load_smollm2_hf

        ours, hf = load_smollm2(device=device)[0], load_smollm2_hf(device=device)
    else:
        from pefttutor.models import load_minilm, load_minilm_hf

        ours, hf = load_minilm(device=device)[0], load_minilm_hf(device=device)
    if name == "smollm2":
        attn, mlp = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
        return Kit(name, ours, hf, ("q_proj", "v_proj"), attn + mlp, ours.config.vocab_size)
    # pefttutor's Bert.forward skips the pooler; so must transformers' (its forward runs it when present),
    # and neither keeps its unused weights (they would count as trainable in full finetuning)
    hf.pooler = ours.pooler = None
    # "output.dense" also matches "attention.output.dense"; the pooler's dense stays out of both
    all_linear = ("query", "key", "value", "intermediate.dense", "output.dense")
    return Kit(name, ours, hf, ("query", "value"), all_linear, ours.config.vocab_size)

