"""Combining LoRA adapters into one new LoRA adapter: peft's `add_weighted_adapter` ("linear", "cat", "svd").

Each adapter i updates a layer by dW_i = s_i B_i A_i. Task arithmetic (Ilharco et al. 2023,
arXiv:2212.04089) adds the updates, with weights w_i that may be negative (subtracting a task):

    dW = sum_i w_i s_i B_i A_i

* "cat": dW exactly, as one LoRA of rank sum_i r_i: A = [w_1 s_1 A_1; ...; w_n s_n A_n] (rows
  stacked) and B = [B_1 ... B_n] (columns side by side), since their product is the sum above.
* "svd": dW's best rank-k approximation (Eckart-Young), k = `svd_rank` (default max_i r_i):
  dW = U S V^T, B = U_k S_k, A = V_k^T. `svd_clamp` q clips every entry of B and A to
  [-c, c], c the q-quantile of their entries together (peft, after kohya-ss's svd_merge_lora).
* "linear": equal ranks r only; A and B are combined separately,
  A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,  B = sum_i sqrt|w_i s_i| B_i,
  whose product has cross terms B_i A_j (i != j): not dW but a rough approximation (peft's docs
  say so). With a single adapter it is exact (w s B A), and peft then always uses it.

The new adapter has alpha = r and no rsLoRA (s = 1: the weights and scalings are inside A and B; peft
keeps the first adapter's use_rslora, so its s is sqrt(r) then), the union of the adapters' targets,
and the first adapter's dropout. In a layer that only some adapters target, only
theirs count ("cat": zero rows pad the others' share of the rank). As in peft, the maths is per
layer on (A, B) pairs; here on adapter state dicts, `lora.adapter_state_dict`'s keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from pefttutor import checks
from pefttutor.methods.lora import LoRAConfig, scaling

COMBINATIONS = ("svd", "linear", "cat")
A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"

Adapter = tuple[LoRAConfig, Mapping[str, torch.Tensor]]  # a LoRA config and its adapter state dict


def layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer path: (A (r, d_in), B (d_out, r))} of a LoRA adapter state dict."""
    return {k[:-len(A_KEY)]: (v, tensors[k[:-len(A_KEY)] + B_KEY]) for k, v in tensors.items() if k.endswith(A_KEY)}


def delta_weights(config: LoRAConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer path: dW = s B A (d_out, d_in)}: what the adapter adds to each W0 (`LoRALinear.delta_weight`)."""
    s = scaling(config.r, config.alpha, config.rslora)
    return {path: s * (B @ A) for path, (A, B) in layers(tensors).items()}


def weighted_adapter(adapters: Sequence[Adapter], weights: Sequence[float], combination_type: str = "svd",
                     svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
                     svd_driver: str | None = None) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The new adapter (config, state dict) combining `adapters` with `weights` (see the module docstring)."""
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters: give one weight per adapter")
    for w in weights:
        checks.number(w, "an adapter weight")
    checks.choice(combination_type, "combination_type", COMBINATIONS)
    if svd_clamp is not None:
        checks.number(svd_clamp, "svd_clamp (a quantile)", low=0, high=1)
    trained = [c.train for c, _ in adapters if c.train]
    if trained:  # a fully trained module is no low-rank update: there is nothing to add up
        raise ValueError(f"cannot combine adapters that also train whole modules ({trained[0]})")
    combination_type = "linear" if len(adapters) == 1 else combination_type  # exact for one adapter, as in peft
    ranks = [c.r for c, _ in adapters]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type 'linear' needs adapters of one rank r, got {ranks}: use 'cat' or 'svd'")
        r = ranks[0]
    elif combination_type == "cat":
        r = sum(ranks)
    else:
        r = checks.positive_int(svd_rank, "svd_rank") if svd_rank is not None else max(ranks)
    per_layer = [layers(t) for _, t in adapters]
    out: dict[str, torch.Tensor] = {}
    for path in dict.fromkeys(p for ls in per_layer for p in ls):  # the union of targeted layers, in order
        here = [(c, w, ls[path]) for (c, _), w, ls in zip(adapters, weights, per_layer) if path in ls]
        if combination_type == "cat":
            A, B = _cat(here, r)
        elif combination_type == "linear":
            A, B = _linear(here)
        else:
            A, B = _svd(here, r, svd_clamp, svd_full_matrices, svd_driver, path)
        out[path + A_KEY], out[path + B_KEY] = A.contiguous(), B.contiguous()
    first = adapters[0][0]
    targets = tuple(dict.fromkeys(t for c, _ in adapters for t in c.targets))
    return LoRAConfig(targets, r=r, alpha=r, dropout=first.dropout, rslora=False), out


def _s(config: LoRAConfig) -> float:
    return scaling(config.r, config.alpha, config.rslora)


def _cat(here, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [w_i s_i A_i] stacked, B = [B_i] side by side, zero-padded to rank r (adapters not targeting the layer)."""
    A0, B0 = here[0][2]
    A, B = A0.new_zeros(r, A0.shape[1]), B0.new_zeros(B0.shape[0], r)
    At = torch.cat([a * w * _s(c) for c, w, (a, _) in here], dim=0)  # (sum of the present ranks, d_in)
    Bt = torch.cat([b for _, _, (_, b) in here], dim=1)
    A[:At.shape[0]], B[:, :Bt.shape[1]] = At, Bt
    return A, B


def _linear(here) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt|w s| on both factors, the sign on A only (on both it would cancel)."""
    ws = [w * _s(c) for c, w, _ in here]
    wA = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws])
    wB = torch.tensor([math.sqrt(abs(x)) for x in ws])
    A = _weighted_sum([a for _, _, (a, _) in here], wA)
    B = _weighted_sum([b for _, _, (_, b) in here], wB)
    return A, B


def _weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i T_i, as one stacked product and sum (peft's `task_arithmetic`, so results agree to the bit)."""
    stacked = torch.stack(tensors)
    return (stacked * weights.to(stacked).view(-1, *[1] * (stacked.dim() - 1))).sum(0)


def _svd(here, r: int, clamp, full_matrices: bool, driver, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_r S_r, A = V_r^T of dW = sum_i w_i s_i B_i A_i, optionally clamped."""
    A0, B0 = here[0][2]
    if r > min(B0.shape[0], A0.shape[1]):
        raise ValueError(f"svd_rank {r} is above min(d_out, d_in) = {min(B0.shape[0], A0.shape[1])} of {path}")
    dW = _weighted_sum([_s(c) * (b @ a) for c, _, (a, b) in here], torch.tensor([w for _, w, _ in here]))
    # a half-precision dW is decomposed in fp32 (CPU has no bf16 SVD); fp32 stays as it is
    U, S, Vh = torch.linalg.svd(dW.float(), full_matrices=full_matrices, driver=driver)
    B, A = U[:, :r] @ torch.diag(S[:r]), Vh[:r]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return A.to(A0.dtype), B.to(B0.dtype)
