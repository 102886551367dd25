"""Exercises of notebook 08 (from notebook to production): gradient traffic, and an experiment on
combining LoRA adapters. Checkers derive their answers from shapes and from the adapters themselves."""

from __future__ import annotations

import math

import torch

from pefttutor import combine

from . import INT, Exercise, exact_count, expects

LLAMA_7B = {"layers": 32, "d": 4096}


def lora_gradient_bytes(layers: int, d: int, r: int, matrices: int = 2, bytes_per_value: int = 4) -> int:
    """Bytes of the trainable gradients of LoRA on `matrices` square d x d matrices per layer: what
    DDP all-reduces every step (r (d_in + d_out) values per matrix)."""
    return layers * matrices * r * (d + d) * bytes_per_value


def llama7b_allreduce(r: int = 8) -> Exercise:
    """Bytes DDP all-reduces per step for LoRA r on Wq and Wv of LLaMA-7B, fp32 gradients."""
    n = lora_gradient_bytes(**LLAMA_7B, r=r)
    return Exercise(
        "bytes all-reduced per step",
        checker=exact_count(n),
        hint="only trainable parameters have gradients: r (d_in + d_out) per adapted matrix, two matrices in "
        "each of 32 layers, 4 bytes per fp32 value. The number of GPUs does not enter: every process "
        "all-reduces its whole gradient.",
        solution=f"32 * 2 * {r} * (4096 + 4096) * 4  # = {n:,} bytes = {n / 2**20:g} MiB, with 2 GPUs or 8",
    )


def ring_bytes_sent(gradient_bytes: int, n_gpus: int) -> int:
    """What each GPU sends in a ring all-reduce of `gradient_bytes`: reduce-scatter then all-gather,
    n - 1 chunks of size S / n each."""
    return 2 * (n_gpus - 1) * gradient_bytes // n_gpus


def llama7b_ring(r: int = 8, n_gpus: int = 8) -> Exercise:
    """Bytes each of `n_gpus` GPUs sends per step for that all-reduce, in NCCL's ring algorithm."""
    s = lora_gradient_bytes(**LLAMA_7B, r=r)
    n = ring_bytes_sent(s, n_gpus)
    return Exercise(
        f"bytes each GPU sends per step ({n_gpus} GPUs, ring)",
        checker=exact_count(n),
        hint=f"a ring all-reduce is a reduce-scatter then an all-gather; in each, every GPU sends {n_gpus} - 1 "
        f"chunks of S / {n_gpus} bytes, S the gradient's size from the previous exercise.",
        solution=f"2 * ({n_gpus} - 1) * {s} // {n_gpus}  # = {n:,} bytes: almost 2 S, whatever the number of GPUs",
    )


def _cat_singular_values(adapters: list[combine.Adapter], weights: list[float]) -> list[torch.Tensor]:
    """Per layer, the singular values of the exact weighted sum of updates (the "cat" combination)."""
    config, tensors = combine.weighted_adapter(adapters, weights, combination_type="cat")
    return [torch.linalg.svdvals(dW.double()) for dW in combine.delta_weights(config, tensors).values()]


def smallest_svd_rank(adapters: list[combine.Adapter], weights: list[float], tolerance: float = 0.01) -> Exercise:
    """The experiment: the smallest `svd_rank` whose combination is within `tolerance` of the exact sum."""
    sigmas = _cat_singular_values(adapters, weights)
    total = sum(float(s.square().sum()) for s in sigmas)
    top = max(len(s) for s in sigmas)
    errors = {k: math.sqrt(max(total - sum(float(s[:k].square().sum()) for s in sigmas), 0.0) / total)
              for k in range(1, top + 1)}
    answer = min(k for k, e in errors.items() if e <= tolerance)

    @expects(INT)
    def checker(k):
        if k == answer:
            return True, f"rank {k}: error {errors[k]:.2%}; rank {k - 1}: {errors.get(k - 1, 1.0):.2%}"
        if k in errors and errors[k] <= tolerance:
            return False, f"rank {k} is within {tolerance:.0%} ({errors[k]:.2%}), but a smaller one is too"
        return False, f"rank {k} gives {errors[k]:.2%}" if k in errors else f"ranks go from 1 to {top}"

    return Exercise(
        f"smallest svd_rank within {tolerance:.0%}",
        checker=checker,
        hint="loop k = 1, 2, ...: add_weighted_adapter(..., combination_type='svd', svd_rank=k), then compare "
        "combine.delta_weights of it with those of the 'cat' combination (the exact sum): "
        "sqrt(sum ||dW_svd - dW_cat||^2 / sum ||dW_cat||^2) over all layers.",
        solution="cat = combine.delta_weights(*combine.weighted_adapter(adapters, weights, 'cat'))  # the exact sum\n"
        "for k in range(1, 17):\n"
        "    svd = combine.delta_weights(*combine.weighted_adapter(adapters, weights, 'svd', svd_rank=k))\n"
        "    error = math.sqrt(sum(float((svd[p] - cat[p]).square().sum()) for p in cat)\n"
        "                      / sum(float(c.square().sum()) for c in cat.values()))\n"
        "    print(k, f'{error:.2%}')\n"
        f"# the first k at or under {tolerance:.0%}: {answer}. Eckart-Young: the rank-k SVD keeps each layer's top k "
        "singular values, so the error is sqrt(dropped sigma^2 / all sigma^2)",
    )
