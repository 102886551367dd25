"""Exercises of notebook 05 (LoRA). Checkers derive answers from shapes and from the package's LoRA, and the
experiment's from the trained models themselves."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pefttutor.methods.lora import LoRALinear
from pefttutor.models import LlamaConfig

from . import FUNCTION, NUMBER, Exercise, exact_count, expects


def lora_params(shapes: Iterable[tuple[int, int]], r: int) -> int:
    """Trainable parameters LoRA adds to matrices of these (d_out, d_in) shapes: r (d_in + d_out) each."""
    return sum(r * (d_out + d_in) for d_out, d_in in shapes)


def gpt3_params(r: int = 8, layers: int = 96, d: int = 12288) -> Exercise:
    """LoRA on Wq and Wv of GPT-3 175B (the paper: 4.7M at r=1, 37.7M at r=8)."""
    return Exercise(
        "GPT-3 LoRA parameters",
        checker=exact_count(lora_params([(d, d), (d, d)] * layers, r)),
        hint="each adapted matrix adds r (d_in + d_out); Wq and Wv are both 12288 x 12288; 2 per layer.",
        solution="96 * 2 * 8 * (12288 + 12288)  # = 37,748,736 = 4,718,592 * 8",
    )


def smollm2_params(cfg: LlamaConfig = LlamaConfig(), r: int = 16) -> Exercise:
    """LoRA on q_proj and v_proj of SmolLM2 (grouped-query attention: v_proj is narrower)."""
    d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return Exercise(
        "SmolLM2 LoRA parameters",
        checker=exact_count(lora_params([(q, d), (kv, d)] * cfg.num_hidden_layers, r)),
        hint="q_proj: 576 -> 576, v_proj: 576 -> 192 (3 key/value heads of 64); each adds r (d_in + d_out).",
        solution="30 * 16 * ((576 + 576) + (576 + 192))  # = 921,600",
    )


def _random_layer_and_input(*batch: int) -> tuple[LoRALinear, torch.Tensor]:
    """A 12 -> 5 LoRA layer (r=3, alpha=6) with a nonzero B, and an input; the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = LoRALinear(nn.Linear(12, 5), r=3, alpha=6)
        nn.init.normal_(layer.lora_B.weight)  # B is zero at init: make the update visible
        return layer, torch.randn(*batch, 12)


def forward() -> Exercise:
    """Implement `lora_forward(x, W0, b, A, B, alpha, r)` on plain tensors."""

    @expects(FUNCTION)
    def checker(fn):
        layer, x = _random_layer_and_input(2, 4)
        with torch.no_grad():
            got = fn(x, layer.base.weight, layer.base.bias, layer.lora_A.weight, layer.lora_B.weight, alpha=6, r=3)
            assert tuple(got.shape) == (2, 4, 5), f"output shape {tuple(got.shape)}, expected (2, 4, 5)"
            ok = torch.allclose(got, layer(x), atol=1e-5)
        return ok, "" if ok else "the values differ from lora.LoRALinear's"

    return Exercise(
        "LoRA forward",
        checker=checker,
        hint="x @ W0.T + b is the base layer; the update is (alpha / r) * (x @ A.T) @ B.T (multiply by A first: cheap).",
        solution="def lora_forward(x, W0, b, A, B, alpha, r):\n    return x @ W0.T + b + (alpha / r) * (x @ A.T) @ B.T",
    )


def merge() -> Exercise:
    """Implement `merged_weight(W0, A, B, alpha, r)`: the weight of a plain Linear equal to the LoRA layer."""

    @expects(FUNCTION)
    def checker(fn):
        layer, x = _random_layer_and_input(4)
        with torch.no_grad():
            W = fn(layer.base.weight.clone(), layer.lora_A.weight.clone(), layer.lora_B.weight.clone(), alpha=6, r=3)
            assert tuple(W.shape) == (5, 12), f"weight shape {tuple(W.shape)}, expected (d_out, d_in) = (5, 12)"
            ok = torch.allclose(x @ W.T + layer.base.bias, layer(x), atol=1e-5)
        return ok, "" if ok else "a Linear with this weight computes something else than the LoRA layer"

    return Exercise(
        "merge",
        checker=checker,
        hint="W = W0 + (alpha / r) * (B @ A): (d_out, r) @ (r, d_in) -> (d_out, d_in).",
        solution="def merged_weight(W0, A, B, alpha, r):\n    return W0 + (alpha / r) * B @ A",
    )


def captured_energy(dW: torch.Tensor, directions: torch.Tensor) -> float:
    """The share of dW's energy (squared Frobenius norm) in the span of `directions`' columns
    (orthonormal, d_out x k): ||U^T dW||^2 / ||dW||^2."""
    dW = dW.detach().double()
    return ((directions.double().T @ dW).norm() ** 2 / dW.norm() ** 2).item()


def update_overlap(dW: torch.Tensor, layer: LoRALinear) -> Exercise:
    """The experiment: how much of the full-finetuning update `dW` of one matrix lies in the r output
    directions that LoRA learned for the same matrix (`layer`, trained). Within 0.0005 (3 decimals)."""
    dW_lora = (layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).detach().cpu()
    r, d_out = layer.r, dW.shape[0]
    U = torch.linalg.svd(dW_lora.double(), full_matrices=False)[0]
    truth = captured_energy(dW.cpu(), U[:, :r])
    ceiling = captured_energy(dW.cpu(), torch.linalg.svd(dW.cpu().double(), full_matrices=False)[0][:, :r])

    @expects(NUMBER)
    def checker(answer):
        if abs(answer - truth) <= 5e-4:
            return True, (f"LoRA's {r} directions hold {truth:.1%} of the full update's energy: a random {r}-dimensional "
                          f"subspace would hold {r / d_out:.1%} on average, dW's own best {r} directions {ceiling:.1%}")
        if abs(answer - ceiling) <= 5e-4:
            return False, "that is dW's energy in its own top directions: project onto the left singular vectors of LoRA's update"
        if abs(answer - r / d_out) <= 5e-4:
            return False, "that is what a random subspace would capture on average: measure LoRA's"
        return False, f"got {answer:.3f}"

    return Exercise(
        "the full update in LoRA's directions",
        checker=checker,
        hint="dW_lora = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight; U = its top-r left singular "
             "vectors (torch.linalg.svd); the share is ||U.T @ dW||^2 / ||dW||^2.",
        solution="dW_lora = (q.scaling * q.lora_B.weight @ q.lora_A.weight).detach().double()\n"
                 "U = torch.linalg.svd(dW_lora, full_matrices=False)[0][:, :q.r]\n"
                 "answer = ((U.T @ dW.double()).norm() ** 2 / dW.double().norm() ** 2).item()\n"
                 "# the two runs found overlapping directions: far more than a random subspace holds, less than dW's own best",
    )
