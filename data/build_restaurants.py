"""Generate the SYNTHETIC data-to-text restaurant corpus in `data/restaurants/` (E2E-style).

Each example is a meaning representation (MR) in the format of the E2E NLG Challenge, e.g.

    name[The Golden Lantern], eatType[coffee shop], food[Italian], priceRange[moderate], near[Café Rouge]

with 3-8 attributes (name always present) and 3-5 reference descriptions written by a hand-built
grammar: several sentence plans (copula, "there is", verb-phrase list, apposition, fronted
location, recommendation), random attribute order, aggregation into one or two sentences,
pronouns / definite descriptions in the second sentence, and several phrasings per attribute
value. Every reference realises exactly the MR's attributes: nothing omitted, nothing added
(tests/test_data.py checks each reference with an independent slot checker).

Restaurant names are built from word lists and split by name: validation names never occur in
train, test names never occur in train or validation. `near[...]` values are landmarks shared by
all splits, as in E2E.

    .venv/bin/python data/build_restaurants.py            # write data/restaurants/{train,validation,test}.jsonl
    .venv/bin/python data/build_restaurants.py --check    # regenerate in a temp dir and compare bytes
    .venv/bin/python data/build_restaurants.py --samples 5  # print a few examples

Deterministic: one `random.Random(seed)` per split (CPython's Mersenne Twister, stable across
3.x), no dependence on set iteration order, JSON keys in a fixed order (mr, refs), `ensure_ascii=False`
and `\\n` line endings.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path

SEED = 2017  # the year of the E2E challenge
OUT_DIR = Path(__file__).resolve().parent / "restaurants"
SIZES = {"train": 2000, "validation": 200, "test": 300}  # number of MRs
NAMES_PER_SPLIT = {"train": 500, "validation": 60, "test": 90}
REFS_PER_MR = (3, 5)

# --- the domain (value sets of the E2E NLG Challenge) ------------------------------------------

ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
VALUES: dict[str, tuple[str, ...]] = {
    "eatType": ("coffee shop", "pub", "restaurant"),
    "food": ("Italian", "French", "Chinese", "Japanese", "Indian", "English", "Fast food"),
    "priceRange": ("cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"),
    "customer rating": ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"),
    "area": ("riverside", "city centre"),
    "familyFriendly": ("yes", "no"),
}
# E2E's near[] values are real places in Cambridge; we reuse such landmark names.
LANDMARKS = (
    "Café Rouge", "Burger King", "The Portland Arms", "Crowne Plaza Hotel", "Express by Holiday Inn",
    "Raja Indian Cuisine", "All Bar One", "The Bakers", "Rainbow Vegetarian Café", "Avalon",
    "Ranch", "The Sorrento", "Clare Hall", "The Six Bells", "Yippee Noodle Bar", "Café Sicilia",
    "The Rice Boat", "Café Brazil", "The Bridge Street Market", "Midsummer House",
)
VALUES["near"] = LANDMARKS

NAME_ADJECTIVES = (
    "Golden", "Silver", "Blue", "Red", "Green", "Old", "Little", "Royal", "Crooked", "Hidden", "Lucky",
    "Jolly", "Rusty", "Velvet", "Copper", "Amber", "Crimson", "Twisted", "Wandering", "Sleeping",
    "Laughing", "Dancing", "Hungry", "Happy", "Black", "White", "Brass", "Ivory", "Scarlet", "Merry",
    "Wild", "Quiet", "Secret", "Painted", "Smiling", "Curious", "Gentle", "Honest", "Bold", "Emerald",
    "Sapphire", "Rosy", "Tiny", "Grand", "Purple", "Dusty", "Sunny", "Misty", "Frosty", "Clever",
)
NAME_NOUNS = (
    "Palace", "Lantern", "Anchor", "Acorn", "Kettle", "Fox", "Swan", "Oak", "Willow", "Crown", "Lion",
    "Stag", "Badger", "Heron", "Sparrow", "Compass", "Harbour", "Mill", "Garden", "Bell", "Spoon",
    "Ladle", "Barrel", "Thistle", "Rose", "Lily", "Moon", "Feather", "Pebble", "Orchard", "Meadow",
    "Teapot", "Plough", "Hare", "Owl", "Raven", "Wren", "Dragon", "Unicorn", "Griffin", "Lighthouse",
    "Gate", "Tower", "Cottage", "Parlour", "Pantry", "Hearth", "Fiddle", "Drum", "Clock", "Key",
    "Otter", "Falcon", "Pelican", "Walrus", "Tortoise", "Pear", "Fig", "Quill", "Saddle",
)


def all_names() -> list[str]:
    """Every name the word lists allow: 'The Golden Lantern', 'Golden Lantern', 'The Fox and Owl'."""
    names = set()
    for adj in NAME_ADJECTIVES:
        for noun in NAME_NOUNS:
            names.add(f"The {adj} {noun}")
            names.add(f"{adj} {noun}")
    for a in NAME_NOUNS:
        for b in NAME_NOUNS:
            if a != b:
                names.add(f"The {a} and {b}")
    assert not names & set(LANDMARKS)
    return sorted(names)


def split_names(seed: int = SEED) -> dict[str, list[str]]:
    """Disjoint name pools: test first, then validation, then train (seeded hash order)."""
    ordered = sorted(all_names(), key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    pools, start = {}, 0
    for split in ("test", "validation", "train"):
        pools[split] = sorted(ordered[start : start + NAMES_PER_SPLIT[split]])
        start += NAMES_PER_SPLIT[split]
    return pools


# --- meaning representations ---------------------------------------------------------------------


def format_mr(mr: dict[str, str]) -> str:
    return ", ".join(f"{a}[{mr[a]}]" for a in ATTRIBUTES if a in mr)


def sample_mr(rng: random.Random, names: list[str]) -> dict[str, str]:
    optional = list(ATTRIBUTES[1:])
    k = rng.randint(2, 7)  # 3-8 attributes with the name
    chosen = set(rng.sample(optional, k))
    mr = {"name": rng.choice(names)}
    for attr in optional:
        if attr in chosen:
            mr[attr] = rng.choice(VALUES[attr])
    return mr


# --- lexicon: how each attribute value can be said --------------------------------------------
# Four syntactic slots:
#   pre    adjective before the head noun          "a cheap Italian pub"
#   post   modifier after the head noun            "a pub in the city centre"
#   vp     verb phrase for a 3rd-person subject    "serves Italian food"
#   clause a stand-alone clause (2nd sentence)     "prices are moderate"
# "rel" marks post-modifiers that are relative clauses (only used as the sole post-modifier).

NUM_WORDS = {"1": "one", "3": "three", "5": "five"}


def lexicon(attr: str, value: str) -> dict[str, list[str]]:
    if attr == "food":
        if value == "Fast food":
            nps, pre = ["fast food"], ["fast food"]
            clause = ["they serve fast food", "the menu is fast food"]
        else:
            nps, pre = [f"{value} food", f"{value} cuisine", f"{value} dishes"], [value]
            clause = [f"the food is {value}", f"they serve {value} food", f"the menu is {value}"]
        return {
            "pre": pre,
            "post": [f"serving {np}" for np in nps] + [f"offering {nps[0]}", f"specialising in {nps[0]}"],
            "rel": [f"that serves {nps[0]}", f"which offers {nps[-1]}"],
            "vp": [f"serves {np}" for np in nps] + [f"offers {nps[0]}", f"specialises in {nps[-1]}",
                                                     f"has {nps[0]} on the menu"],
            "clause": clause,
        }
    if attr == "priceRange":
        table = {
            "cheap": dict(
                pre=["cheap", "inexpensive", "low-priced"],
                post=["with low prices", "with a cheap price range"],
                vp=["is cheap", "is inexpensive", "has low prices", "has a cheap price range", "is cheap to eat at"],
                clause=["prices are low", "the prices are cheap"]),
            "moderate": dict(
                pre=["moderately priced", "mid-priced"],
                post=["with moderate prices", "with a moderate price range", "in the moderate price range"],
                vp=["is moderately priced", "has moderate prices", "has a moderate price range", "charges moderate prices"],
                clause=["prices are moderate", "the prices are moderate"]),
            "high": dict(
                pre=["expensive", "high-priced", "pricey"],
                post=["with high prices", "with a high price range", "in the high price range"],
                vp=["is expensive", "is pricey", "has high prices", "has a high price range", "is on the expensive side"],
                clause=["prices are high", "the prices are high"]),
            "less than £20": dict(
                pre=[],
                post=["with prices under £20", "with prices of less than £20", "where a meal costs less than £20"],
                vp=["has prices under £20", "charges less than £20", "offers meals for less than £20",
                    "has a price range of less than £20", "costs less than £20 per person"],
                clause=["prices are under £20", "meals cost less than £20", "a meal costs less than £20"]),
            "£20-25": dict(
                pre=[],
                post=["with prices of £20-25", "with prices between £20 and £25", "in the £20-25 price range",
                      "where meals cost £20-25"],
                vp=["has prices of £20-25", "charges between £20 and £25", "has a price range of £20-25",
                    "costs £20-25 per person"],
                clause=["prices range from £20 to £25", "meals cost £20-25", "prices are £20-25"]),
            "more than £30": dict(
                pre=[],
                post=["with prices over £30", "with prices of more than £30", "where meals cost more than £30"],
                vp=["charges more than £30", "has prices over £30", "has a price range of more than £30",
                    "costs over £30 per person"],
                clause=["prices are above £30", "meals cost more than £30", "expect to pay more than £30"]),
        }
        return {"rel": [], **table[value]}
    if attr == "customer rating":
        if value[0].isdigit():  # "3 out of 5"
            n = value.split()[0]
            w = NUM_WORDS[n]
            stars = "star" if n == "1" else "stars"
            return {
                "pre": [f"{w}-star", f"{n}-star"],
                "post": [f"with a customer rating of {n} out of 5", f"rated {n} out of 5 by customers",
                         f"with a {n} out of 5 customer rating", f"with a {w}-star rating"],
                "rel": [f"that customers rate {n} out of 5"],
                "vp": [f"has a customer rating of {n} out of 5", f"is rated {n} out of 5 by customers",
                       f"has a {n} out of 5 rating", f"has a {w}-star customer rating"],
                "clause": [f"customers rate it {n} out of 5", f"its customer rating is {n} out of 5",
                           f"customers have given it {w} {stars}"],
            }
        table = {
            "low": dict(
                pre=["poorly rated", "low-rated"],
                post=["with a low customer rating", "with low customer ratings", "rated low by customers"],
                rel=["that is poorly rated by customers"],
                vp=["has a low customer rating", "is poorly rated", "is rated low by customers",
                    "gets low ratings from customers"],
                clause=["customer ratings are low", "customers rate it poorly", "its customer rating is low"]),
            "average": dict(
                pre=["average-rated"],
                post=["with an average customer rating", "with average customer ratings", "rated average by customers"],
                rel=["that customers rate as average"],
                vp=["has an average customer rating", "is rated average by customers", "receives average ratings"],
                clause=["customer ratings are average", "its customer rating is average",
                        "customers rate it as average"]),
            "high": dict(
                pre=["highly rated", "highly-rated"],
                post=["with a high customer rating", "with high customer ratings", "rated highly by customers"],
                rel=["that is highly rated by customers"],
                vp=["has a high customer rating", "is highly rated", "is rated highly by customers",
                    "gets high ratings from customers"],
                clause=["customer ratings are high", "customers rate it highly", "its customer rating is high"]),
        }
        return table[value]
    if attr == "area":
        if value == "riverside":
            return dict(
                pre=["riverside"],
                post=["by the river", "in the riverside area", "on the riverside", "along the river"],
                rel=["that sits by the river"],
                vp=["is located by the river", "is in the riverside area", "is situated on the riverside",
                    "can be found by the river", "sits by the river"],
                clause=["you will find it by the river", "it is on the riverside"])
        return dict(
            pre=["city centre"],
            post=["in the city centre", "in the centre of the city", "in the heart of the city"],
            rel=["that is located in the city centre"],
            vp=["is in the city centre", "is located in the city centre", "can be found in the city centre",
                "is situated in the centre of the city"],
            clause=["you will find it in the city centre", "it is in the heart of the city"])
    if attr == "familyFriendly":
        if value == "yes":
            return dict(
                pre=["family-friendly", "kid-friendly", "child-friendly", "family friendly"],
                post=["suitable for families", "where children are welcome"],
                rel=["that is family-friendly", "that welcomes children", "which is kid friendly"],
                vp=["is family-friendly", "is kid friendly", "welcomes children", "is child-friendly",
                    "is suitable for families", "is great for families"],
                clause=["children are welcome", "families are welcome", "kids are welcome"])
        return dict(
            pre=[],
            post=["not suitable for families"],
            rel=["that is not family-friendly", "which is not kid friendly", "that does not welcome children"],
            vp=["is not family-friendly", "is not child friendly", "isn't kid friendly", "does not welcome children",
                "is not suitable for families", "is adults only"],
            clause=["children are not welcome", "families are not welcome", "it is adults only"])
    if attr == "near":
        x = value
        return dict(
            pre=[],
            post=[f"near {x}", f"close to {x}", f"not far from {x}", f"located near {x}", f"a short walk from {x}"],
            rel=[f"that is close to {x}"],
            vp=[f"is near {x}", f"is located near {x}", f"is close to {x}", f"can be found near {x}",
                f"is not far from {x}", f"is a short walk from {x}"],
            clause=[f"{x} is nearby", f"{x} is close by", f"it is near {x}"])
    raise KeyError(attr)


# Order of pre-modifiers in English: opinion/rating, price, family, area, food (closest to noun).
PRE_ORDER = ("customer rating", "priceRange", "familyFriendly", "area", "food")
GENERIC_HEADS = ("place", "venue", "spot", "eatery", "establishment")


def article(word: str) -> str:
    w = word.lower()
    if w[0] in "aeiou" and not w.startswith(("one", "uni", "eu")):
        return "an"
    return "a"


def join_list(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


# --- sentence planning ---------------------------------------------------------------------------


class Realiser:
    """Turns one MR into one reference; a fresh random plan each call."""

    def __init__(self, mr: dict[str, str], rng: random.Random):
        self.mr, self.rng = mr, rng
        self.name = mr["name"]
        self.eat = mr.get("eatType")
        self.lex = {a: lexicon(a, v) for a, v in mr.items() if a not in ("name", "eatType")}
        self.used_verbs: set[str] = set()  # 'can be found ... and can be found ...' reads badly

    # noun phrases ------------------------------------------------------------------------------
    def head(self) -> str:
        return self.eat or self.rng.choice(GENERIC_HEADS)

    def noun_phrase(self, pre: list[str], post: list[str], rel: str | None, with_article: bool = True) -> str:
        pre_words = [self.rng.choice(self.lex[a]["pre"]) for a in sorted(pre, key=PRE_ORDER.index)]
        if len(pre_words) == 2 and self.rng.random() < 0.3 and "food" not in pre:
            core = f"{pre_words[0]}, {pre_words[1]} {self.head()}"
        else:
            core = " ".join(pre_words + [self.head()])
        posts: list[str] = []
        for a in post:
            p = self.rng.choice(self.lex[a]["post"])
            if posts and posts[-1].startswith("with ") and p.startswith("with "):
                posts[-1] = f"{posts[-1]} and {p[5:]}"
            else:
                posts.append(p)
        np = " ".join([core] + posts)
        if rel:
            np += " " + self.rng.choice(self.lex[rel]["rel"])
        return f"{article(np)} {np}" if with_article else np

    def vp(self, attr: str) -> str:
        if attr == "eatType":
            np = self.noun_phrase([], [], None)
            return f"is {np}"
        options = self.lex[attr]["vp"]
        fresh = [v for v in options if " ".join(v.split()[:2]) not in self.used_verbs]
        choice = self.rng.choice(fresh or options)
        self.used_verbs.add(" ".join(choice.split()[:2]))
        return choice

    def subject2(self) -> str:
        """How the second sentence refers back to the restaurant."""
        options = ["It", "It", self.name]
        if self.eat:
            options += [f"The {self.eat}", f"This {self.eat}"]
        return self.rng.choice(options)

    def second_sentence(self, attrs: list[str]) -> str:
        """VPs under one subject, optionally followed by stand-alone clauses."""
        rng = self.rng
        vps, clauses = [], []
        for a in attrs:
            if a != "eatType" and rng.random() < 0.3 and self.lex[a]["clause"]:
                clauses.append(rng.choice(self.lex[a]["clause"]))
            else:
                vps.append(self.vp(a))
        parts = []
        if vps:
            parts.append(f"{self.subject2()} {join_list(vps)}")
        if clauses:
            if parts:
                return f"{cap(parts[0])}, and {join_list(clauses)}."
            return cap(join_list(clauses)) + "."
        return cap(parts[0]) + "."

    # allocation ---------------------------------------------------------------------------------
    def allocate(self, attrs: list[str], max_pre: int, max_post: int) -> tuple[list[str], list[str], str | None, list[str]]:
        """Put attributes into the NP (pre/post/relative) while there is room; return the leftovers."""
        rng = self.rng
        pre, post, rel, rest = [], [], None, []
        for a in attrs:
            lex = self.lex[a]
            r = rng.random()
            if lex["pre"] and len(pre) < max_pre and r < 0.45:
                pre.append(a)
            elif lex["post"] and len(post) < max_post and r < 0.8:
                post.append(a)
            else:
                rest.append(a)
        if not post and rest and rng.random() < 0.3:
            cand = [a for a in rest if self.lex[a]["rel"]]
            if cand:
                rel = cand[0]
                rest.remove(rel)
        if not self.eat and not (pre or post or rel) and rest:
            # 'X is a place.' says nothing: a generic head needs at least one modifier
            a = rest.pop(0)
            (pre if self.lex[a]["pre"] else post).append(a)
        return pre, post, rel, rest

    def finish(self, first: str, rest: list[str], continue_ok: bool = True) -> str:
        """First sentence given; the leftover attributes go into VPs of the first or a second sentence."""
        if not rest:
            return first + "."
        rng = self.rng
        if continue_ok and len(rest) <= 2 and rng.random() < 0.4:
            vps = [self.vp(a) for a in rest]
            # '..., and it serves Italian food.' or '... that serves ...' style continuation
            return f"{first}, and it {join_list(vps)}."
        return f"{first}. {self.second_sentence(rest)}"

    # plans --------------------------------------------------------------------------------------
    def plan_copula(self, attrs):
        pre, post, rel, rest = self.allocate(attrs, 2, 2)
        return self.finish(f"{self.name} is {self.noun_phrase(pre, post, rel)}", rest)

    def plan_there_is(self, attrs):
        pre, post, rel, rest = self.allocate(attrs, 2, 1)
        called = self.rng.choice(["called", "named", "by the name of"])
        np = self.noun_phrase(pre, [], None)
        tail = (" " + self.rng.choice(self.lex[post[0]]["post"])) if post else ""
        if rel:  # keep 'called X' last in the NP: a relative clause would attach to the name
            rest = [rel] + rest
        return self.finish(f"There is {np} {called} {self.name}{tail}", rest, continue_ok=False)

    def plan_vp_list(self, attrs):
        rng = self.rng
        n1 = len(attrs) if len(attrs) <= 3 or rng.random() < 0.3 else rng.randint(2, 3)
        first, rest = attrs[:n1], attrs[n1:]
        s1 = f"{self.name} {join_list([self.vp(a) for a in first])}."
        return s1 if not rest else f"{s1} {self.second_sentence(rest)}"

    def plan_apposition(self, attrs):
        pre, post, rel, rest = self.allocate(attrs, 2, 1)
        if rel:
            rest = [rel] + rest
        if not rest:  # an apposition needs a main verb; move something out of the NP
            src = post if post else pre
            rest = [src.pop()]
        if not self.eat and not (pre or post):  # 'X, a place, ...' is empty
            return self.plan_vp_list(rest)
        np = self.noun_phrase(pre, post, None)
        main = rest[: 2 if len(rest) <= 3 else 1]
        later = rest[len(main):]
        s1 = f"{self.name}, {np}, {join_list([self.vp(a) for a in main])}."
        return s1 if not later else f"{s1} {self.second_sentence(later)}"

    def plan_fronted(self, attrs):
        loc = [a for a in attrs if a in ("area", "near")]
        others = [a for a in attrs if a not in loc]
        rng = self.rng
        pps = [rng.choice([p for p in self.lex[a]["post"] if not p.startswith("located")]) for a in loc]
        lead = rng.choice(["Located", "Situated", ""]) if not pps[0].startswith(("a short", "not far")) else rng.choice(["Located", "Situated"])
        front = (f"{lead} " if lead else "") + " ".join(pps)
        pre, post, rel, rest = self.allocate(others, 2, 1)
        if not others:
            what = f"{article(self.eat)} {self.eat} called {self.name}" if self.eat else self.name
            return f"{cap(front)}, you will find {what}."
        return self.finish(f"{cap(front)}, {self.name} is {self.noun_phrase(pre, post, rel)}", rest)

    def plan_recommend(self, attrs):
        pre, post, rel, rest = self.allocate(attrs, 2, 2)
        if not pre and not post and not rel:
            return self.plan_copula(attrs)
        np = self.noun_phrase(pre, post, rel)
        verb = self.rng.choice(["try", "consider", "visit"])
        opener = self.rng.choice(["If you are looking for", "If you want", "For"])
        s1 = f"{opener} {np}, {verb} {self.name}"
        return self.finish(s1, rest, continue_ok=False)

    def realise(self) -> str:
        attrs = [a for a in ATTRIBUTES[1:] if a in self.mr]
        rng = self.rng
        if rng.random() < 0.6:  # shuffle, but often keep eatType first like the MR
            rng.shuffle(attrs)
        plans = [self.plan_copula, self.plan_copula, self.plan_there_is, self.plan_vp_list,
                 self.plan_recommend]
        if self.eat or len(attrs) >= 2:
            plans.append(self.plan_apposition)
        if "area" in self.mr or "near" in self.mr:
            plans += [self.plan_fronted, self.plan_fronted]
        attrs_np = [a for a in attrs if a != "eatType"]
        plan = rng.choice(plans)
        if plan == self.plan_vp_list:
            return plan(attrs)  # eatType becomes 'is a pub'
        if not attrs_np and plan == self.plan_apposition:
            plan = self.plan_copula
        return plan(attrs_np)


def references(mr: dict[str, str], rng: random.Random, n: int) -> list[str]:
    refs: list[str] = []
    for _ in range(50 * n):
        ref = Realiser(mr, rng).realise()
        if ref not in refs:
            refs.append(ref)
        if len(refs) == n:
            break
    return refs


def build() -> dict[str, list[dict]]:
    pools = split_names()
    out: dict[str, list[dict]] = {}
    for i, split in enumerate(("train", "validation", "test")):
        rng = random.Random(SEED * 10 + i)
        seen, rows = set(), []
        while len(rows) < SIZES[split]:
            mr = sample_mr(rng, pools[split])
            key = format_mr(mr)
            if key in seen:
                continue
            seen.add(key)
            rows.append({"mr": key, "refs": references(mr, rng, rng.randint(*REFS_PER_MR))})
        out[split] = rows
    return out


def write(data: dict[str, list[dict]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in data.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out_dir / f"{split}.jsonl").write_bytes(text.encode("utf-8"))


def check() -> int:
    data = build()
    with tempfile.TemporaryDirectory() as tmp:
        write(data, Path(tmp))
        bad = [s for s in data if not (OUT_DIR / f"{s}.jsonl").exists()
               or not filecmp.cmp(Path(tmp) / f"{s}.jsonl", OUT_DIR / f"{s}.jsonl", shallow=False)]
    if bad:
        print(f"restaurants: MISMATCH in {bad}; rerun data/build_restaurants.py", file=sys.stderr)
        return 1
    print("restaurants: all splits reproduce byte-for-byte")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify committed files reproduce exactly")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--samples", type=int, default=0, help="print N sample MRs with references and exit")
    args = ap.parse_args(argv)
    if args.check:
        return check()
    data = build()
    if args.samples:
        for row in data["train"][: args.samples]:
            print(row["mr"])
            for r in row["refs"]:
                print("   ", r)
        return 0
    write(data, args.out)
    for split, rows in data.items():
        print(f"{split}: {len(rows)} MRs, {sum(len(r['refs']) for r in rows)} references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
