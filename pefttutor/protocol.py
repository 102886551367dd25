"""One protocol per task: the data, batching, evaluation, budget and stopping rule that every
notebook and the study (`pefttutor.study`) share, so the same method and budget give the same
number everywhere.

* `TweetTask`: MiniLM + a linear head, 3-class tweet sentiment. Train on all 6,000 training tweets
  (batch 32, length-grouped, reshuffled per epoch); select on the whole validation split (1,050);
  report on the whole test split (2,100; the standard error of an accuracy p is sqrt(p(1-p)/n),
  1.0 point near 0.7).
* `RestaurantTask`: SmolLM2-135M-Instruct, data-to-text. Train on every (MR, reference) pair of the
  training MRs (7,958; batch 8, the loss on the target tokens); select on the validation loss of
  the first reference of 100 validation MRs (BLEU on 50 of them is logged too); report BLEU and
  ROUGE-L of greedy decoding on all 300 test MRs (restaurants unseen in training) with their
  bootstrap standard errors. The untuned baseline is the instruct model with its chat template.

Stopping rule (both tasks): evaluate on validation every `eval_every` steps; stop once `patience`
evaluations in a row bring no new best (`improved`), or at `max_steps` (the cap: 3 epochs of
tweets). The learning rate warms up over the first 6% of the cap, then follows a cosine to zero at
the cap. The test metric is reported at the best validation point and at the end.

`PEFTTUTOR_FAST=1` shrinks data and budgets (the tests), keeping every mechanism.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import config, data, generation, metrics, train

Batch = dict[str, torch.Tensor]

# Scoring SmolLM2 prompts on tweets (in-context learning, hard and soft prompts: notebooks 01, 02)
# costs ~0.1 s a query, so those read this balanced subset of the test split (`data.load_tweets("test",
# limit=ICL_TWEETS)`; one standard error of an accuracy near 0.5: 2.9 points), the same in every notebook.
ICL_TWEETS = 300


@dataclass(frozen=True)
class Budget:
    """How long a run may train and how it stops (see the module docstring)."""

    max_steps: int
    eval_every: int
    patience: int  # evaluations in a row without a new best validation metric
    warmup: float = 0.06  # fraction of max_steps


def improved(value: float, best: float, mode: str) -> bool:
    """Whether `value` is a new best: strictly higher ("max") or lower ("min")."""
    return value > best if mode == "max" else value < best


def plateaued(curve: list[tuple[int, dict[str, float]]], key: str, mode: str, patience: int) -> bool:
    """The stopping rule: the last `patience` evaluations in `curve` brought no new best `key`."""
    values = [m[key] for _, m in curve]
    if len(values) <= patience:
        return False
    best_before = max(values[:-patience]) if mode == "max" else min(values[:-patience])
    return not any(improved(v, best_before, mode) for v in values[-patience:])


def classification_scores(preds: list[int], gold: list[int]) -> dict[str, float]:
    """accuracy, macro-F1 over the 3 classes, n, and the accuracy's binomial standard error."""
    acc = metrics.accuracy(preds, gold)
    return {"accuracy": acc, "macro_f1": metrics.macro_f1(preds, gold, classes=range(len(data.LABELS))),
            "n": len(gold), "accuracy_se": math.sqrt(acc * (1 - acc) / len(gold))}


def _fixed_batch(tokenizer, texts: list[str], length: int = 64) -> Batch:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _sorted_batches(n_items: int, lengths: list[int]) -> list[int]:
    """Evaluation order: by length, so each batch pads little (results are put back in order)."""
    return sorted(range(n_items), key=lengths.__getitem__)


class TweetTask:
    """MiniLM tweet sentiment under one protocol (see the module docstring)."""

    name = "minilm-tweets"
    metric, mode = "accuracy", "max"  # what model selection maximizes, on validation
    batch_size, max_length, eval_batch_size = 32, 64, 128
    max_epochs, evals_per_epoch, patience = 3, 2, 2

    def __init__(self, device: torch.device | str | None = None):
        from .models import load_minilm

        self.device = torch.device(device) if device is not None else config.get_device()
        self.encoder, self.tokenizer = load_minilm(device=self.device)
        fast = config.is_fast()
        self.train_set = data.load_tweets("train", limit=256 if fast else None)
        self.splits = {"validation": data.load_tweets("validation", limit=48 if fast else None),
                       "test": data.load_tweets("test", limit=96 if fast else None)}
        self._lengths = {s: self._token_lengths(ex) for s, ex in {"train": self.train_set, **self.splits}.items()}
        self.steps_per_epoch = math.ceil(len(self.train_set) / self.batch_size)
        self._eval_batches = {s: self._batches_for_eval(s) for s in self.splits}

    def _token_lengths(self, examples) -> list[int]:
        ids = self.tokenizer([ex["text"] for ex in examples], truncation=True, max_length=self.max_length)["input_ids"]
        return [len(i) for i in ids]

    def _batches_for_eval(self, split: str) -> tuple[list[int], list[Batch]]:
        order = _sorted_batches(len(self.splits[split]), self._lengths[split])
        examples = [self.splits[split][i] for i in order]
        return order, data.classification_batches(examples, self.tokenizer, self.eval_batch_size, self.max_length)

    def budget(self, epochs: float | None = None) -> Budget:
        """The cap (`epochs`, default `max_epochs`) and the evaluation schedule, in steps."""
        epochs = self.max_epochs if epochs is None else epochs
        every = max(1, self.steps_per_epoch // self.evals_per_epoch)
        return Budget(max_steps=max(1, round(epochs * self.steps_per_epoch)), eval_every=every, patience=self.patience)

    def new_model(self, seed: int) -> nn.Module:
        """A fresh classifier: a copy of the pretrained encoder and a seeded linear head."""
        from .models import BertClassifier

        config.seed_everything(seed)
        return BertClassifier(copy.deepcopy(self.encoder), num_classes=len(data.LABELS), pooling="mean")

    def train_batches(self, seed: int) -> Callable[[int], list[Batch]]:
        """`f(epoch)`: length-grouped batches, reshuffled per epoch and seed."""
        def batches(epoch: int) -> list[Batch]:
            order = data.length_grouped_order(self._lengths["train"], self.batch_size, seed=1000 * seed + epoch)
            return data.classification_batches([self.train_set[i] for i in order], self.tokenizer,
                                               self.batch_size, self.max_length)
        return batches

    loss = staticmethod(train.classification_loss)

    def predict(self, model: nn.Module, split: str) -> list[int]:
        """Predicted class ids of `split`, in the split's order."""
        order, batches = self._eval_batches[split]
        preds, _ = train.predict_classes(model, batches, device=self.device)
        out = [0] * len(order)
        for i, p in zip(order, preds):
            out[i] = p
        return out

    def evaluate(self, model: nn.Module, split: str, predictions: bool = False) -> dict:
        """accuracy, macro-F1, n and the accuracy's standard error on `split` (and, with
        `predictions`, the predicted class ids in the split's order, for paired comparisons)."""
        preds = self.predict(model, split)
        gold = [ex["label"] for ex in self.splits[split]]
        out = classification_scores(preds, gold)
        return {**out, "predictions": preds} if predictions else out

    def validate(self, model: nn.Module) -> dict[str, float]:
        """What model selection reads every `eval_every` steps."""
        return self.evaluate(model, "validation")

    def latency_batch(self) -> Batch:
        """The inference-latency batch: 16 test tweets padded or cut to 64 tokens."""
        return _fixed_batch(self.tokenizer, [ex["text"] for ex in self.splits["test"][:16]])


class RestaurantTask:
    """SmolLM2 data-to-text under one protocol (see the module docstring)."""

    name = "smollm2-restaurants"
    metric, mode = "loss", "min"  # validation loss selects
    batch_size, max_length, eval_batch_size, gen_batch_size = 8, 128, 16, 16
    max_new_tokens = 72  # the longest test reference is 63 tokens (+ eos)
    max_steps, eval_every, patience = 600, 50, 3
    n_val_loss, n_val_bleu = 100, 50

    def __init__(self, device: torch.device | str | None = None):
        from .models import load_smollm2

        self.device = torch.device(device) if device is not None else config.get_device()
        self.base, self.tokenizer = load_smollm2(device=self.device)
        fast = config.is_fast()
        train_mrs = data.load_restaurants("train", limit=16 if fast else None)
        self.prompts, self.targets = data.restaurant_pairs(train_mrs)
        self._lengths = [len(p) + len(t) for p, t in zip(self.tokenizer(self.prompts)["input_ids"],
                                                         self.tokenizer(self.targets, add_special_tokens=False)["input_ids"])]
        val = data.load_restaurants("validation", limit=self.n_val_loss if not fast else 8)
        vp, vt = data.restaurant_pairs(val, all_refs=False)
        self._val_loss_batches = data.causal_lm_batches(vp, vt, self.tokenizer, self.eval_batch_size, self.max_length)
        self.splits = {"validation": val[: self.n_val_bleu if not fast else 4],
                       "test": data.load_restaurants("test", limit=6 if fast else None)}
        if fast:
            self.max_new_tokens, self.max_steps, self.eval_every, self.patience = 8, 6, 2, 2
        self.steps_per_epoch = math.ceil(len(self.prompts) / self.batch_size)

    def budget(self, epochs: float | None = None) -> Budget:
        steps = self.max_steps if epochs is None else max(1, round(epochs * self.steps_per_epoch))
        return Budget(max_steps=steps, eval_every=self.eval_every, patience=self.patience)

    def new_model(self, seed: int) -> nn.Module:
        config.seed_everything(seed)
        return copy.deepcopy(self.base)

    def train_batches(self, seed: int) -> Callable[[int], list[Batch]]:
        def batches(epoch: int) -> list[Batch]:
            order = data.length_grouped_order(self._lengths, self.batch_size, seed=1000 * seed + epoch)
            return data.causal_lm_batches([self.prompts[i] for i in order], [self.targets[i] for i in order],
                                          self.tokenizer, self.batch_size, self.max_length)
        return batches

    loss = staticmethod(train.causal_lm_loss)

    def prompts_of(self, split: str, chat: bool = False) -> list[str]:
        """Each MR of `split` as the finetuned models' plain prompt, or the untuned model's chat prompt."""
        if chat:
            return [data.restaurant_chat_prompt(self.tokenizer, ex["mr"]) for ex in self.splits[split]]
        return [data.restaurant_prompt(ex["mr"]) for ex in self.splits[split]]

    def generate(self, model: nn.Module, split: str, chat: bool = False) -> list[str]:
        """Greedy continuations, `max_new_tokens` at most (the protocol's decoding settings)."""
        return generation.complete(model, self.tokenizer, self.prompts_of(split, chat), self.max_new_tokens,
                                   add_special_tokens=not chat, batch_size=self.gen_batch_size)

    def evaluate(self, model: nn.Module, split: str, chat: bool = False, se: bool = True,
                 predictions: bool = False) -> dict:
        """BLEU and ROUGE-L (0-100) on `split`, with bootstrap standard errors (`se`), one example
        (and, with `predictions`, every hypothesis in the split's order)."""
        hyps = self.generate(model, split, chat)
        refs = [ex["refs"] for ex in self.splits[split]]
        out = {"BLEU": metrics.bleu(hyps, refs), "ROUGE-L": metrics.rouge_l(hyps, refs), "n": len(hyps)}
        if se:
            out["BLEU_se"] = metrics.bootstrap_se(metrics.bleu, hyps, refs)
            out["ROUGE-L_se"] = metrics.bootstrap_se(metrics.rouge_l, hyps, refs)
        out["example"] = hyps[0]
        return {**out, "predictions": hyps} if predictions else out

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        """Mean target-token cross-entropy over the validation pairs (each token counts once)."""
        total, count = 0.0, 0
        for batch in self._val_loss_batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
            total += float(self.loss(model, batch)) * n
            count += n
        return total / count

    def latency_batch(self) -> Batch:
        """The inference-latency batch: 16 test prompts padded or cut to 64 tokens."""
        return _fixed_batch(self.tokenizer, self.prompts_of("test")[:16])

    def validate(self, model: nn.Module) -> dict[str, float]:
        scores = self.evaluate(model, "validation", se=False)
        return {"loss": self.validation_loss(model), "BLEU": scores["BLEU"], "ROUGE-L": scores["ROUGE-L"]}


TASKS = {t.name: t for t in (TweetTask, RestaurantTask)}


def task(name: str, device: torch.device | str | None = None):
    """The protocol of task `name` (a typo lists the valid names)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name](device)

