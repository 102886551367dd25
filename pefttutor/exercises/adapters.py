"""Exercises of notebook 04 (adapters). Checkers derive answers from the package's bottleneck adapter."""

from __future__ import annotations

import copy
import functools
import statistics
from collections.abc import Iterable

import torch
from torch import nn

from pefttutor.methods.adapters import Bottleneck, SerialAdapter, apply
from pefttutor.train import Batch, classification_loss

from . import FUNCTION, NUMBER, Exercise, exact_count, expects


def adapter_params(d: int, m: int, n_adapters: int) -> int:
    """Trainable parameters of `n_adapters` bottleneck adapters d -> m -> d: 2md + d + m each."""
    return n_adapters * (2 * m * d + d + m)


def bert_large_params(m: int = 64, layers: int = 24, d: int = 1024) -> Exercise:
    """Houlsby adapters (two per layer) of width m on BERT-Large, the paper's model."""
    return Exercise(
        "Houlsby adapters on BERT-Large",
        checker=exact_count(adapter_params(d, m, 2 * layers)),
        hint="each adapter: W_down (m x d) + b_down (m) + W_up (d x m) + b_up (d) = 2md + d + m; two per layer.",
        solution=f"2 * {layers} * (2 * {m} * {d} + {d} + {m})  # = {adapter_params(d, m, 2 * layers):,}",
    )


def _adapter_and_input(*batch: int, sigma: float = 0.5) -> tuple[Bottleneck, torch.Tensor]:
    """A 16 -> 4 -> 16 GELU bottleneck with random weights and biases, and an input; the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapter = Bottleneck(16, 4, sigma=sigma)
        nn.init.normal_(adapter.down.bias, std=0.5)  # biases start at zero: make them count
        nn.init.normal_(adapter.up.bias, std=0.5)
        return adapter, torch.randn(*batch, 16)


def forward() -> Exercise:
    """Implement `adapter_forward(h, W_down, b_down, W_up, b_up)` with GELU and the skip connection."""

    @expects(FUNCTION)
    def checker(fn):
        adapter, h = _adapter_and_input(2, 3)
        with torch.no_grad():
            got = fn(h, adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)
            assert tuple(got.shape) == (2, 3, 16), f"output shape {tuple(got.shape)}, expected (2, 3, 16)"
            ok = torch.allclose(got, SerialAdapter(nn.Identity(), adapter)(h), atol=1e-5)
        return ok, "" if ok else "the values differ from the package's adapter (skip connection? biases? GELU?)"

    return Exercise(
        "adapter forward",
        checker=checker,
        hint="down: h @ W_down.T + b_down -> (..., m); GELU (torch.nn.functional.gelu); up: @ W_up.T + b_up -> "
        "(..., d); then add h back (the skip connection).",
        solution="def adapter_forward(h, W_down, b_down, W_up, b_up):\n"
        "    return h + F.gelu(h @ W_down.T + b_down) @ W_up.T + b_up",
    )


def zero_init() -> Exercise:
    """Implement `init_identity(adapter)`: the adapter must be exactly the identity, and still learn."""

    @expects(FUNCTION)
    def checker(fn):
        adapter, h = _adapter_and_input(5, 16)
        with torch.no_grad():
            fn(adapter)
        out = SerialAdapter(nn.Identity(), adapter)(h)
        if not torch.equal(out, h):
            return False, (f"the adapter is not exactly the identity yet (max change {(out - h).abs().max():.2g}): "
                           "its branch W_up f(W_down h + b_down) + b_up must be 0 for every h")
        out.square().sum().backward()
        if not adapter.up.weight.grad.any():
            return False, ("exactly the identity, but W_up gets no gradient: with W_down h + b_down = 0 the "
                           "activations f(0) = 0 feed W_up nothing, and with W_up = 0 nothing reaches W_down. "
                           "Training would be stuck (only b_up would move)")
        if not adapter.down.weight.any():
            return False, "W_up learns, but W_down = 0 makes the branch ignore its input h: keep W_down random"
        return True, "the model starts exactly as pretrained, and W_up gets a gradient from the first step"

    return Exercise(
        "identity at the start",
        checker=checker,
        hint="Which parameters does the branch's output depend on linearly? If W_up and b_up are 0, the branch "
        "is 0 whatever W_down does; if W_down stays random, W_up still sees nonzero activations.",
        solution="def init_identity(adapter):\n"
        "    adapter.up.weight.zero_()  # W_up = 0\n"
        "    adapter.up.bias.zero_()    # b_up = 0; W_down and b_down unchanged (W_down random)",
    )


def _val_loss(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Mean cross-entropy over `batches` in eval mode, as notebook 04's `val_loss`; the mode is restored."""
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    with torch.no_grad():
        loss = statistics.fmean(classification_loss(model, {k: v.to(device) for k, v in b.items()}).item()
                                for b in batches)
    model.train(was_training)
    return loss


def step0_loss(model: nn.Module, batches: list[Batch], size: int = 8, sigma: float = 0.1, seed: int = 0,
               compare_size: int = 64) -> Exercise:
    """The experiment: the validation loss of the trained classifier `model` right after Houlsby
    adapters of width `size` and init scale `sigma` are inserted (seeded with `seed`), before any step.

    The checker inserts them itself into a copy (once, at the first check), and for its messages
    also the same `sigma` at `compare_size` and no adapters at all; within 0.0005 (a loss printed
    to 3 decimals). The caller's random state is untouched."""

    @functools.cache
    def losses() -> dict:
        out = {"none": _val_loss(model, batches)}
        for m in dict.fromkeys((size, compare_size)):
            with torch.random.fork_rng():
                torch.manual_seed(seed)  # what config.seed_everything(seed) does to torch
                adapted = apply(copy.deepcopy(model), size=m, placement="houlsby", sigma=sigma)
            out[m] = _val_loss(adapted, batches)
            del adapted
        return out

    @expects(NUMBER)
    def checker(answer):
        got = losses()
        if abs(answer - got[size]) <= 5e-4:
            return True, (f"m={size}: {got[size]:.3f}, against {got[compare_size]:.3f} at m={compare_size} and "
                          f"{got['none']:.3f} without adapters. The same sigma moves the model less through a "
                          f"narrower bottleneck: the branch grows like sigma^2 sqrt(md), so what 'near the "
                          f"identity' needs depends on m and d too")
        if size != compare_size and abs(answer - got[compare_size]) <= 5e-4:
            return False, f"that is the loss with m={compare_size}: insert adapters with size={size}"
        if abs(answer - got["none"]) <= 5e-4:
            return False, "that is the model without adapters: insert them into a copy first (adapters.apply)"
        return False, (f"got {answer:.3f}; seed with config.seed_everything({seed}) right before "
                       f"adapters.apply(copy.deepcopy(model), size={size}, sigma={sigma:g}), then val_loss")

    return Exercise(
        f"validation loss at step 0, Houlsby m={size}, sigma={sigma:g}",
        checker=checker,
        hint=f"the cell of section 3 that measured the step-0 losses does it for m=64: the same with size={size}. "
             "Seed right before adapters.apply, so the adapters' weights are the checker's.",
        solution=f"config.seed_everything({seed})\n"
                 f"answer = val_loss(adapters.apply(copy.deepcopy(head_model), size={size}, sigma={sigma:g}))\n"
                 f"# below the m={compare_size} loss: the branch is about sqrt({compare_size}/{size}) times smaller "
                 "for the same sigma (sigma^2 sqrt(md)), so a narrow adapter tolerates a larger sigma",
    )
