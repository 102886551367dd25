"""Notebook 04 (adapters): its from-scratch Adapter equals the package's, and its exercises check right and wrong.

The Adapter cell is read from the committed notebook and executed here, so the code readers see
and `pefttutor.methods.adapters` cannot drift apart.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from notebook_cells import run_cell
from pefttutor.exercises import adapters as exercises
from pefttutor.methods import adapters
from pefttutor.models.bert import Bert, BertConfig

NOTEBOOK = "04_adapters.ipynb"
MARK = "class Adapter(nn.Module):"


@pytest.fixture(scope="module")
def NotebookAdapter():
    return run_cell(NOTEBOOK, MARK, max_lines=25)["Adapter"]


@pytest.mark.parametrize("d, m, sigma", [(8, 3, 1e-2), (384, 64, 1e-2), (16, 16, 0.5)])
def test_notebook_adapter_equals_package_adapter(NotebookAdapter, d, m, sigma):
    torch.manual_seed(0)
    ours = NotebookAdapter(d, m, sigma=sigma)
    torch.manual_seed(0)
    package = adapters.Bottleneck(d, m, sigma=sigma)
    # same names, shapes and initial values (same seed, same init order)
    assert list(ours.state_dict()) == list(package.state_dict()) == ["down.weight", "down.bias", "up.weight", "up.bias"]
    for (name, a), b in zip(ours.state_dict().items(), package.state_dict().values()):
        assert torch.equal(a, b), name
    assert sum(p.numel() for p in ours.parameters()) == 2 * m * d + d + m
    # with nonzero biases and larger weights: same outputs, h + branch, and same gradients
    for layer in (ours, package):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    h = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(2))
    serial = adapters.SerialAdapter(nn.Identity(), package)
    torch.testing.assert_close(ours(h), serial(h), rtol=0, atol=1e-6)
    assert (ours(h) - h).abs().max() > 1e-2  # the branch is active, so equality means something
    ours(h).square().sum().backward()
    serial(h).square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), package.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_notebook_adapter_by_hand_in_bert_equals_apply(NotebookAdapter):
    """nn.Sequential(dense, Adapter) on both AddNorm projections of every layer = apply(placement="houlsby")."""
    torch.manual_seed(0)
    base = Bert(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=32)).eval()
    ours, package = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(3)
    for layer in ours.encoder.layer:
        for owner in (layer.attention.output, layer.output):
            owner.dense = nn.Sequential(owner.dense, NotebookAdapter(32, 4, sigma=0.3))
    torch.manual_seed(3)
    adapters.apply(package, size=4, sigma=0.3)
    x = torch.randint(0, 64, (2, 6))
    torch.testing.assert_close(ours(x), package(x), rtol=0, atol=1e-6)
    assert (package(x) - base(x)).abs().max() > 1e-2


def test_exercise_count_right_and_wrong():
    assert exercises.adapter_params(1024, 64, 48) == 6_343_680
    ex = exercises.bert_large_params()
    assert ex.check(2 * 24 * (2 * 64 * 1024 + 1024 + 64)) is True
    assert ex.check(24 * (2 * 64 * 1024 + 1024 + 64)) is False  # one adapter per layer
    assert ex.check(2 * 24 * 2 * 64 * 1024) is False  # biases forgotten
    assert ex.check(...) is None


def test_exercise_count_matches_apply():
    model = Bert(BertConfig(vocab_size=16, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=96, max_position_embeddings=16))
    adapters.apply(model, size=8)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == exercises.adapter_params(64, 8, 2 * 3)


def test_exercise_forward_right_and_wrong():
    ex = exercises.forward()
    assert ex.check(lambda h, Wd, bd, Wu, bu: h + F.gelu(h @ Wd.T + bd) @ Wu.T + bu) is True
    assert ex.check(lambda h, Wd, bd, Wu, bu: F.gelu(h @ Wd.T + bd) @ Wu.T + bu) is False  # no skip
    assert ex.check(lambda h, Wd, bd, Wu, bu: h + F.relu(h @ Wd.T + bd) @ Wu.T + bu) is False  # ReLU
    assert ex.check(lambda h, Wd, bd, Wu, bu: h + F.gelu(h @ Wd.T) @ Wu.T) is False  # no biases
    assert ex.check(lambda h, Wd, bd, Wu, bu: h @ Wd) is False  # wrong shapes: fails politely
    assert ex.check(None) is None


def test_exercise_zero_init_right_and_wrong():
    ex = exercises.zero_init()

    def right(a):
        a.up.weight.zero_()
        a.up.bias.zero_()

    def everything(a):
        for p in a.parameters():
            p.zero_()

    def only_weight(a):
        a.up.weight.zero_()  # b_up was made nonzero by the checker

    def down_only(a):
        a.down.weight.zero_()
        a.down.bias.zero_()  # gelu(0) = 0, but b_up stays

    def down_and_up_bias(a):
        a.down.weight.zero_()
        a.down.bias.zero_()
        a.up.bias.zero_()  # exact identity, yet W_up sees f(0) = 0: stuck

    assert ex.check(right) is True
    assert ex.check(everything) is False
    assert ex.check(only_weight) is False
    assert ex.check(down_only) is False
    assert ex.check(down_and_up_bias) is False
    assert ex.check(...) is None


def test_exercise_checkers_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    exercises.forward().check(lambda h, Wd, bd, Wu, bu: h)
    exercises.zero_init().check(lambda a: None)
    assert torch.equal(torch.rand(3), expected)
