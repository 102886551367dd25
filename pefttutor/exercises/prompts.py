"""Exercises of notebook 02 (hard vs soft prompts): soft-prompt sizes, masks, why argmax has no gradient,
and an experiment: the order of the demonstrations."""

from __future__ import annotations

import functools

import torch

from .. import data, icl, metrics
from . import FUNCTION, NUMBER, STR, Exercise, exact_count, expects


def soft_prompt_params(n_tokens: int = 100, d: int = 4096) -> Exercise:
    """Trainable parameters of a soft prompt: P * d (default: Lester et al.'s 100 tokens on T5-XXL, d = 4096)."""
    return Exercise(
        f"soft prompt of {n_tokens} tokens, d = {d}",
        checker=exact_count(n_tokens * d),
        hint="one trainable vector of size d per virtual token; nothing else is trained.",
        solution=f"{n_tokens} * {d}  # = {n_tokens * d:,}",
    )


def _left_padded_mask() -> torch.Tensor:
    return torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # row 1: two pads on the left


def extend_mask() -> Exercise:
    """Implement `extend(mask, P)`: the attention mask once P virtual tokens stand in front of the input."""

    @expects(FUNCTION)
    def checker(fn):
        mask, P = _left_padded_mask(), 3
        got = fn(mask.clone(), P)
        assert tuple(got.shape) == (2, 8), f"shape {tuple(got.shape)}, expected (B, P + T) = (2, 8)"
        expected = torch.cat([torch.ones(2, P, dtype=mask.dtype), mask], dim=1)
        if torch.equal(got.long(), torch.cat([mask, torch.ones(2, P, dtype=mask.dtype)], dim=1)):
            return False, "the virtual tokens come first, in front of the real ones"
        ok = torch.equal(got.long(), expected)
        return ok, "" if ok else "every row must see all P virtual tokens, and keep its own padding"

    return Exercise(
        "extend the attention mask",
        checker=checker,
        hint="virtual tokens are never padding: put P ones in front of each row (torch.cat along dim 1).",
        solution="def extend(mask, P):\n    return torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)",
    )


def argmax_gradient() -> Exercise:
    """What is `z.grad` after `E[z.argmax()].sum().backward()`? Answer "a", "b" or "c" (see `choices`)."""
    choices = {
        "a": "the gradient of the chosen row, scattered onto z",
        "b": "zeros of z's shape",
        "c": "None: z is not in the graph at all",
    }

    @expects(STR)
    def checker(answer):
        E = torch.arange(15.0).view(5, 3).requires_grad_()  # the embeddings do get a gradient (row i only)
        z = torch.tensor([0.1, 2.0, 0.3, -1.0, 0.5], requires_grad=True)
        E[z.argmax()].sum().backward()
        truth = "c" if z.grad is None else "b" if not z.grad.any() else "a"
        ok = answer.strip().lower() == truth
        return ok, "" if ok else f"you chose {choices.get(answer.strip().lower(), answer)!r}"

    return Exercise(
        "why argmax blocks gradients",
        checker=checker,
        hint="argmax returns an integer index: is there a grad_fn that leads back to z? Try it in a cell.",
        solution="'c': argmax returns an integer index with no grad_fn, so E[i] depends on E only and z never "
                 "enters the graph. Mathematically too: a small change of z leaves the argmax unchanged, so the "
                 "derivative is 0 almost everywhere (and undefined where it jumps).",
    )


def relaxed_token() -> Exercise:
    """Implement `relaxed(z, E, tau)`: softmax(z / tau) @ E, a differentiable stand-in for E[z.argmax()]."""

    @expects(FUNCTION)
    def checker(fn):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            E, z = torch.randn(7, 4), torch.randn(2, 7, requires_grad=True)
        got = fn(z, E, 0.5)
        assert tuple(got.shape) == (2, 4), f"shape {tuple(got.shape)}, expected (2, d) = (2, 4)"
        if not torch.allclose(got, torch.softmax(z / 0.5, dim=-1) @ E, atol=1e-5):
            return False, "the values differ from softmax(z / tau) @ E"
        got.sum().backward()
        if z.grad is None or not z.grad.abs().sum() > 0:
            return False, "no gradient reaches z"
        cold = fn(z.detach(), E, 1e-3)
        ok = torch.allclose(cold, E[z.detach().argmax(-1)], atol=1e-3)
        return ok, "" if ok else "as tau -> 0 it should become the hard choice E[z.argmax(-1)]"

    return Exercise(
        "a differentiable token choice",
        checker=checker,
        hint="weights = torch.softmax(z / tau, dim=-1) sum to 1 over the vocabulary; mix the rows of E with them.",
        solution="def relaxed(z, E, tau):\n    return torch.softmax(z / tau, dim=-1) @ E",
    )


def reversed_demonstrations(model, tokenizer, tweets, demos, label_ids) -> Exercise:
    """The experiment: the test accuracy of the k-shot prompt with `demos` in reverse order.

    The checker scores both orders itself (once, at the first check), so the answer is verified
    against a run, not a stored number; within 0.0005 (an accuracy printed to 3 decimals)."""
    gold = [ex["label"] for ex in tweets]

    @functools.cache
    def accuracy(order: tuple[int, ...]) -> float:
        prompts = [data.tweet_prompt(ex["text"], [demos[i] for i in order]) for ex in tweets]
        return metrics.accuracy(icl.label_scores(model, tokenizer, prompts, label_ids).argmax(-1).tolist(), gold)

    k = len(demos)

    @expects(NUMBER)
    def checker(answer):
        reverse, forward = accuracy(tuple(reversed(range(k)))), accuracy(tuple(range(k)))
        if abs(answer - reverse) <= 5e-4:
            return True, f"reversed {reverse:.3f} vs {forward:.3f} in the original order: the same {k} examples"
        if abs(answer - forward) <= 5e-4:
            return False, "that is the original order's accuracy: reverse the demonstrations first"
        return False, f"got {answer:.3f}; score every test tweet with the reversed demonstrations"

    return Exercise(
        f"{k}-shot accuracy with the demonstrations reversed",
        checker=checker,
        hint="prompts = [data.tweet_prompt(ex['text'], demos[::-1]) for ex in the test tweets]; then "
             "icl.label_scores(...).argmax(-1) and metrics.accuracy against the labels.",
        solution="prompts = [data.tweet_prompt(ex['text'], demos[:4][::-1]) for ex in test_set]\n"
                 "preds = icl.label_scores(llm, tok, prompts, label_ids).argmax(-1).tolist()\n"
                 "answer = metrics.accuracy(preds, y_test)\n"
                 "# the same examples in another order: in-context learning in a small model is sensitive to it "
                 "(a recency bias: the last demonstrations' labels weigh most)",
    )
