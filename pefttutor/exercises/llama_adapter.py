"""Exercises of the LLaMA-Adapter section (notebook 04). Checkers derive answers from shapes and the package."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

from pefttutor.methods import llama_adapter
from pefttutor.models import Llama, LlamaConfig
from pefttutor.train import Batch, causal_lm_loss

from . import NUMBER, STR, Exercise, exact_count, expects

FIRST_STEP_CHOICES = ("prompts", "gates", "both", "neither")


def llama_adapter_params(n_layers: int, n_tokens: int, d: int, n_heads: int) -> int:
    """Trainable parameters of LLaMA-Adapter: a prompt (n_tokens x d) and n_heads gates per adapted layer."""
    return n_layers * (n_tokens * d + n_heads)


def llama7b_params(n_layers: int = 30, n_tokens: int = 10, d: int = 4096, n_heads: int = 32) -> Exercise:
    """The paper's setting: 10 prompt tokens in the top 30 of LLaMA-7B's 32 layers ("1.2M parameters")."""
    return Exercise(
        "LLaMA-7B adapter parameters",
        checker=exact_count(llama_adapter_params(n_layers, n_tokens, d, n_heads)),
        hint="each adapted layer holds a prompt of n_tokens x d numbers and one gate per head (32 heads).",
        solution="30 * (10 * 4096 + 32)  # = 1,229,760: 1,228,800 for the prompts + 960 gates",
    )


def smollm2_params(cfg: LlamaConfig = LlamaConfig(), n_tokens: int = 10, n_layers: int | None = None) -> Exercise:
    """The same count for SmolLM2 (d = 576, 9 query heads; grouped-query attention changes nothing here)."""
    n_layers = cfg.num_hidden_layers if n_layers is None else n_layers
    return Exercise(
        "SmolLM2 adapter parameters",
        checker=exact_count(llama_adapter_params(n_layers, n_tokens, cfg.hidden_size, cfg.num_attention_heads)),
        hint=f"{n_layers} layers, each with a {n_tokens} x {cfg.hidden_size} prompt and one gate per query head "
             f"({cfg.num_attention_heads}); the prompt goes through the frozen k_proj / v_proj, which add nothing.",
        solution=f"{n_layers} * ({n_tokens} * {cfg.hidden_size} + {cfg.num_attention_heads})"
                 f"  # = {llama_adapter_params(n_layers, n_tokens, cfg.hidden_size, cfg.num_attention_heads):,}",
    )


def _nonzero_gradients_at_init() -> str:
    """Which adapter parameters get a nonzero gradient on the first step, measured on a tiny random Llama."""
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = llama_adapter.apply(Llama(cfg), n_tokens=3)
        model(torch.randint(0, 32, (2, 5))).square().mean().backward()
    kinds = {"adaption_prompt": "prompts", "adaption_gate": "gates"}
    moved = {kinds[n.rsplit(".", 1)[-1]] for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None and p.grad.any()}
    return "both" if len(moved) == 2 else moved.pop() if moved else "neither"


def first_step() -> Exercise:
    """At initialization (every gate zero), which adapter parameters receive a nonzero gradient?"""

    @expects(STR)
    def checker(answer):
        assert answer in FIRST_STEP_CHOICES, f"answer one of {FIRST_STEP_CHOICES}, got {answer!r}"
        return answer == _nonzero_gradients_at_init()

    return Exercise(
        "the first step",
        checker=checker,
        hint="the adapter adds g * softmax(q K_p^T / sqrt(hd)) V_p, with K_p and V_p computed from the prompt. "
             "Differentiate with respect to g and with respect to the prompt, at g = 0.",
        solution='answer = "gates"  # d/dg = softmax(q K_p^T) V_p != 0, but d/dP carries the factor g = 0. The first '
                 "step opens the gates; from the second step on the prompts learn too.",
    )


def closed_gates_loss(model: nn.Module, batch: Batch, layers: Iterable[int]) -> Exercise:
    """The experiment: the loss of the trained adapter `model` on `batch` with the gates of the
    adapted layers `layers` (0 = the bottom adapted layer) set to zero, every other gate as trained.

    The gates are copied now, so changing them in place before the check does not change the answer.
    The checker computes the loss itself (once, at the first check) with those gates closed, with
    every gate open and with every gate closed (the base model), then puts the model's gates back;
    within 0.001."""
    modules = list(llama_adapter.adapters(model).values())
    closed = sorted(set(layers))
    assert closed and all(0 <= i < len(modules) for i in closed), f"layers must be in 0..{len(modules) - 1}"
    trained = [m.adaption_gate.detach().clone() for m in modules]
    contiguous = closed == list(range(closed[0], closed[-1] + 1))
    span = f"{closed[0]}-{closed[-1]}" if contiguous else str(closed)
    which = f"range({closed[0]}, {closed[-1] + 1})" if contiguous else repr(closed)

    @functools.cache
    def losses() -> dict:
        current = [m.adaption_gate.detach().clone() for m in modules]
        device, was_training = next(model.parameters()).device, model.training
        b = {k: v.to(device) for k, v in batch.items()}
        model.eval()
        out = {}
        try:
            with torch.no_grad():
                for name, shut in (("open", ()), ("closed", closed), ("all closed", range(len(modules)))):
                    for i, (m, g) in enumerate(zip(modules, trained)):
                        m.adaption_gate.copy_(torch.zeros_like(g) if i in shut else g)
                    out[name] = causal_lm_loss(model, b).item()
        finally:
            with torch.no_grad():
                for m, g in zip(modules, current):
                    m.adaption_gate.copy_(g)
            model.train(was_training)
        return out

    @expects(NUMBER)
    def checker(answer):
        got = losses()
        if abs(answer - got["closed"]) <= 1e-3:
            gain = got["all closed"] - got["open"]
            share = f"{(got['closed'] - got['open']) / gain:.0%}" if gain > 0 else "none"
            return True, (f"{got['open']:.3f} with every gate as trained, {got['closed']:.3f} with layers {span} "
                          f"closed, {got['all closed']:.3f} with every gate closed (the base model): closing these "
                          f"{len(closed)} of {len(modules)} layers gives back {share} of what the adapter gained")
        if abs(answer - got["open"]) <= 1e-3:
            return False, f"that is the loss with every gate as trained: zero the gates of layers {span} first"
        if abs(answer - got["all closed"]) <= 1e-3:
            return False, f"that is the loss with every gate closed (the base model): close only layers {span}"
        return False, (f"got {answer:.3f}; in a copy of the model, zero adaption_gate of the adapted layers {span} "
                       "(llama_adapter.adapters(model), bottom first), then train.causal_lm_loss on the batch")

    return Exercise(
        f"the loss with the gates of layers {span} closed",
        checker=checker,
        hint="llama_adapter.adapters(model) lists the adapted layers' modules, bottom first; each has an "
             "adaption_gate (one per head). Zero them in a copy.deepcopy of the model, under torch.no_grad(), "
             "and take train.causal_lm_loss(model, batch).item().",
        solution="closed = copy.deepcopy(adapted_llm)\n"
                 "with torch.no_grad():\n"
                 "    for i, a in enumerate(llama_adapter.adapters(closed).values()):\n"
                 f"        if i in {which}:\n"
                 "            a.adaption_gate.zero_()\n"
                 "    answer = train.causal_lm_loss(closed, heldout).item()\n"
                 "# compare with every gate as trained and with every gate closed: the check prints both",
    )
