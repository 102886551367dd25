"""Notebook 05 (LoRA): its 20-line LoRALinear equals the package's, and its exercises check right and wrong.

The LoRALinear cell is read from the committed notebook and executed here, so the code readers see
and `pefttutor.methods.lora.LoRALinear` cannot drift apart.
"""

import copy

import pytest
import torch
from torch import nn

from notebook_cells import run_cell
from pefttutor import params
from pefttutor.exercises import lora as exercises
from pefttutor.methods import lora
from pefttutor.models import LlamaConfig

NOTEBOOK = "05_lora.ipynb"
MARK = "class LoRALinear(nn.Module):"


@pytest.fixture(scope="module")
def NotebookLoRA():
    return run_cell(NOTEBOOK, MARK, max_lines=25)["LoRALinear"]


def pair(NotebookLoRA, d_in, d_out, r, alpha, bias=True):
    """(notebook layer, package layer) around copies of one nn.Linear, built from the same seed."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=bias)
    torch.manual_seed(1)
    ours = NotebookLoRA(copy.deepcopy(base), r=r, alpha=alpha)
    torch.manual_seed(1)
    package = lora.LoRALinear(copy.deepcopy(base), r=r, alpha=alpha)
    params.freeze(package.base)  # lora.apply freezes the model; the notebook's layer freezes its base itself
    return ours, package


@pytest.mark.parametrize("d_in, d_out, r, alpha, bias", [(7, 5, 3, 6, True), (16, 8, 1, 1, False), (384, 192, 8, 16, True)])
def test_notebook_layer_equals_package_layer(NotebookLoRA, d_in, d_out, r, alpha, bias):
    ours, package = pair(NotebookLoRA, d_in, d_out, r, alpha, bias)
    # same parameter names, shapes and initial values (same seed -> same A; B zero)
    weights = {k: v for k, v in package.state_dict().items() if k != "_extra_state"}  # + whether it is merged
    assert list(ours.state_dict()) == list(weights)
    for (name, a), b in zip(ours.state_dict().items(), weights.values()):
        assert torch.equal(a, b), name
    assert not ours.lora_B.weight.any()
    assert ours.scaling == package.scaling == lora.scaling(r, alpha)
    # same trainable parameters: A and B only, r (d_in + d_out)
    trainable = lambda m: sorted((n, p.numel()) for n, p in m.named_parameters() if p.requires_grad)
    assert trainable(ours) == trainable(package) == [("lora_A.weight", r * d_in), ("lora_B.weight", d_out * r)]
    # with a nonzero B: same outputs and same gradients
    g = torch.Generator().manual_seed(2)
    B = torch.randn(d_out, r, generator=g)
    x = torch.randn(2, 3, d_in, generator=g)
    for layer in (ours, package):
        with torch.no_grad():
            layer.lora_B.weight.copy_(B)
        layer(x).square().sum().backward()
    torch.testing.assert_close(ours(x), package(x), rtol=0, atol=1e-6)
    assert (ours(x) - ours.base(x)).abs().max() > 1e-3  # the update is active, so equality means something
    torch.testing.assert_close(ours.lora_A.weight.grad, package.lora_A.weight.grad)
    torch.testing.assert_close(ours.lora_B.weight.grad, package.lora_B.weight.grad)
    assert ours.base.weight.grad is None


def test_notebook_layer_in_a_model_equals_lora_apply(NotebookLoRA):
    """Swapping the notebook's layer in by hand = lora.apply, on a small stack of Linears."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    ours, package = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(3)
    params.freeze(ours)
    for i in (0, 2):
        ours[i] = NotebookLoRA(ours[i], r=2, alpha=4)
    torch.manual_seed(3)
    lora.apply(package, ["0", "2"], r=2, alpha=4)
    assert params.count_parameters(ours) == params.count_parameters(package)
    for m in (ours, package):
        torch.manual_seed(4)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p)
    x = torch.randn(5, 6)
    torch.testing.assert_close(ours(x), package(x))


def test_exercise_counts_right_and_wrong():
    cfg = LlamaConfig()  # SmolLM2-135M's shapes
    assert exercises.lora_params([(12288, 12288)] * 2 * 96, 8) == 37_748_736  # the paper's 37.7M
    assert exercises.lora_params([(12288, 12288)] * 2 * 96, 1) == 4_718_592  # and its 4.7M
    ex = exercises.gpt3_params()
    assert ex.check(96 * 2 * 8 * (12288 + 12288)) is True
    assert ex.check(96 * 8 * (12288 + 12288)) is False
    assert ex.check(...) is None
    ex = exercises.smollm2_params(cfg, r=16)
    assert ex.check(30 * 16 * ((576 + 576) + (576 + 192))) is True
    assert ex.check(30 * 16 * 2 * (576 + 576)) is False  # forgot grouped-query attention


def test_exercise_counts_match_lora_apply():
    """The count exercise's formula against lora.apply on a real (random, tiny-vocab) SmolLM2 layout."""
    from pefttutor.models import Llama

    cfg = LlamaConfig(vocab_size=16, num_hidden_layers=2)
    model = lora.apply(Llama(cfg), ["q_proj", "v_proj"], r=16)
    expected = exercises.lora_params([(576, 576), (192, 576)] * 2, 16)
    assert params.count_parameters(model)[0] == expected


def test_exercise_forward_and_merge_right_and_wrong():
    ex = exercises.forward()
    assert ex.check(lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + (alpha / r) * (x @ A.T) @ B.T) is True
    assert ex.check(lambda x, W0, b, A, B, alpha, r: x @ W0.T + b + (x @ A.T) @ B.T) is False  # no scaling
    assert ex.check(lambda x, W0, b, A, B, alpha, r: x @ W0.T + b) is False  # no update
    assert ex.check(lambda x, W0, b, A, B, alpha, r: x @ A) is False  # wrong shapes: fails politely
    ex = exercises.merge()
    assert ex.check(lambda W0, A, B, alpha, r: W0 + (alpha / r) * B @ A) is True
    assert ex.check(lambda W0, A, B, alpha, r: W0 + B @ A) is False
    assert ex.check(lambda W0, A, B, alpha, r: W0) is False
    assert ex.check(...) is None


def test_exercise_checkers_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    exercises.forward().check(lambda x, W0, b, A, B, alpha, r: x @ W0.T + b)
    exercises.merge().check(lambda W0, A, B, alpha, r: W0)
    assert torch.equal(torch.rand(3), expected)
