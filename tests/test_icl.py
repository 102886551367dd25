"""In-context learning helpers: balanced demonstrations and cached label scores (real SmolLM2)."""

import pytest
import torch

from pefttutor import data, icl

POOL = [{"text": f"tweet {i}", "label": i % 3} for i in range(60)]


def test_demonstrations_cycle_the_classes_and_each_prefix_is_balanced():
    demos = icl.balanced_demonstrations(POOL, n=9, seed=0)
    labels = [d["label"] for d in demos]
    assert sorted(labels[:3]) == [0, 1, 2] and labels[3:6] == labels[:3] and labels[6:] == labels[:3]
    assert len({d["text"] for d in demos}) == 9  # no example twice


def test_demonstrations_are_seeded():
    assert icl.balanced_demonstrations(POOL, seed=3) == icl.balanced_demonstrations(POOL, seed=3)
    draws = {tuple(d["text"] for d in icl.balanced_demonstrations(POOL, seed=s)) for s in range(5)}
    assert len(draws) == 5


def test_demonstrations_need_enough_examples_per_class():
    with pytest.raises(ValueError):  # random.sample: more than the class holds
        icl.balanced_demonstrations(POOL, n=21)


def test_shared_prefix_leaves_every_sequence_a_token_of_its_own():
    assert icl.shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert icl.shared_prefix([[1, 2], [1, 2]]) == 1
    assert icl.shared_prefix([[7], [7, 8]]) == 0


def test_cached_scores_equal_every_prompt_run_alone_and_in_the_full_vocabulary(smollm2):
    model, tok = smollm2
    label_ids = data.verbalizer_token_ids(tok)
    demos = icl.balanced_demonstrations(data.load_tweets("train"), n=4)
    tweets = ["I love it", "meh, a Tuesday", "worst flight ever, lost my bag and nobody cares", "ok"]
    prompts = [data.tweet_prompt(t, demos) for t in tweets]
    cached = icl.label_scores(model, tok, prompts, label_ids, batch_size=3)  # two batches, padded
    alone = icl.label_scores_uncached(model, tok, prompts, label_ids)
    assert cached.shape == (4, 3)
    assert torch.allclose(cached, alone, atol=1e-3)
    with torch.no_grad():  # and the reference is the model's last-position logits, read the plain way
        full = model(torch.tensor([tok(prompts[2])["input_ids"]]))[0, -1, label_ids]
    assert torch.allclose(alone[2], full.float(), atol=1e-4)
    assert icl.ms_per_query(model, tok, prompts[:2], label_ids, repeats=1) > 0
