"""In-context learning with a causal LM: demonstrations, and label scores with a shared-prefix cache.

The model reads an instruction, k solved examples ("demonstrations") and the query, and the
predicted class is the label word whose token gets the highest next-token logit. Notebooks 01 and
02 score thousands of such prompts; these functions make that cheap and keep both on one set of
demonstrations:

* `balanced_demonstrations`: n training examples whose labels cycle through the classes in a
  seeded order; the k-shot prompt uses the first k, so each larger prompt extends the smaller one,
  and another `seed` is another draw (what "order sensitivity" varies).
* `label_scores`: every prompt's label logits, the tokens all prompts share (instruction and
  demonstrations) run **once** and kept as a KV cache (prompt caching); equal to
  `label_scores_uncached` (tested), which runs every prompt in full, alone: the reference, and what
  a query costs without a cache (`ms_per_query`).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import data


def balanced_demonstrations(pool: Sequence[Mapping[str, Any]], n: int = 8, seed: int = 0,
                            n_classes: int = len(data.LABELS)) -> list[Mapping[str, Any]]:
    """n examples of `pool` whose labels cycle through the classes in a seeded random order; each
    class's examples drawn at random (n per class are drawn, so a prefix of k <= n is balanced)."""
    rng = random.Random(seed)
    by_label = [rng.sample([ex for ex in pool if ex["label"] == c], n) for c in range(n_classes)]
    order = rng.sample(range(n_classes), n_classes)
    return [by_label[order[i % n_classes]][i // n_classes] for i in range(n)]


def shared_prefix(ids: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every sequence shares, leaving each at least one token of its own."""
    n = 0
    while all(len(x) > n + 1 and x[n] == ids[0][n] for x in ids):
        n += 1
    return n


def _last(ids: torch.Tensor) -> torch.Tensor:
    """`logits_at` for the last position of every row (prompts are left-padded): (B, T) bool."""
    at = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    at[:, -1] = True
    return at


@torch.no_grad()
def label_scores(model: nn.Module, tokenizer, prompts: Sequence[str], label_ids: Sequence[int],
                 batch_size: int = 16) -> torch.Tensor:
    """Next-token logits of the label words after each prompt, (n, len(label_ids)), float32 on CPU.

    The shared prefix runs once (batch 1) and its keys and values are expanded over each batch, so
    each batch feeds only its prompts' own tokens, left-padded; prompts of similar length share a
    batch. Only the last position goes through the LM head (`logits_at`)."""
    device = next(model.parameters()).device
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    n = shared_prefix(ids)
    _, cache = model(torch.tensor([ids[0][:n]], device=device), use_cache=True)  # (k, v) per layer, batch 1
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    scores = torch.empty(len(ids), len(label_ids))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        tail, tail_mask = data.left_pad([ids[i][n:] for i in rows], data.pad_id_of(tokenizer))
        B = len(rows)
        mask = torch.cat([torch.ones(B, n, dtype=torch.long), tail_mask], dim=1)  # prefix, pads, query
        past = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in cache]
        tail = tail.to(device)
        logits = model(tail, mask.to(device), past_key_values=past, logits_at=_last(tail))  # (B, vocab)
        scores[rows] = logits[:, list(label_ids)].float().cpu()
    return scores


@torch.no_grad()
def label_scores_uncached(model: nn.Module, tokenizer, prompts: Sequence[str], label_ids: Sequence[int]) -> torch.Tensor:
    """The same scores, every prompt in full and alone (no cache, no padding): the reference."""
    device = next(model.parameters()).device
    out = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p)["input_ids"]], device=device)
        out.append(model(ids, logits_at=_last(ids))[0, list(label_ids)].float().cpu())
    return torch.stack(out)


def ms_per_query(model: nn.Module, tokenizer, prompts: Sequence[str], label_ids: Sequence[int],
                 repeats: int = 3) -> float:
    """Milliseconds to score one prompt in full, alone, without a cache: the median over `prompts`
    of each one's best of `repeats` runs (the run least disturbed by whatever shares the CPU)."""
    times = []
    for p in prompts:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            label_scores_uncached(model, tokenizer, [p], label_ids)
            best = min(best, 1000 * (time.perf_counter() - t0))
        times.append(best)
    return statistics.median(times)
