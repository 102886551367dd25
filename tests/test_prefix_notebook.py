"""Notebook 03 (prefix tuning): its step-by-step attention equals the package's, and its exercises check right and wrong.

The cell defining `attention_with_prefix` is read from the committed notebook and executed here, so
the code readers see and `LlamaAttention` with `prefix_tuning`'s hook cannot drift apart.
"""

import pytest
import torch

from notebook_cells import run_cell
from pefttutor import params
from pefttutor.exercises import prefix as exercises
from pefttutor.methods import prefix_tuning
from pefttutor.models import Llama, LlamaConfig

NOTEBOOK = "03_prefix_tuning.ipynb"
MARK = "def attention_with_prefix("


@pytest.fixture(scope="module")
def attention_with_prefix():
    return run_cell(NOTEBOOK, MARK, max_lines=30)["attention_with_prefix"]


@pytest.mark.parametrize("heads, kv_heads, P", [(4, 2, 3), (4, 4, 1), (6, 2, 7)])
def test_notebook_attention_equals_the_package_layer(attention_with_prefix, heads, kv_heads, P):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8)
    model = prefix_tuning.apply(Llama(cfg).eval(), n_tokens=P, reparam=True, hidden=16)
    x = torch.randn(2, 5, 24)
    positions = torch.arange(5)[None].expand(2, 5)
    for attn in prefix_tuning.attention_layers(model):
        pk, pv = attn.peft["prefix_tuning"].kv_prefix(2)
        with torch.no_grad():
            ours = attention_with_prefix(attn, model.rotary, x, pk, pv)
            package, _ = attn(x, lambda offset: model.rotary(positions + offset, x.dtype), None, True)
        torch.testing.assert_close(ours, package, rtol=0, atol=1e-5)
    del attn.peft["prefix_tuning"]  # the same layer without its prefix computes something else: equality above means something
    with torch.no_grad():
        plain, _ = attn(x, lambda offset: model.rotary(positions + offset, x.dtype), None, True)
    assert (plain - package).abs().max() > 1e-3


def test_exercise_counts_right_and_wrong():
    cfg = LlamaConfig()  # SmolLM2-135M's shapes
    assert exercises.prefix_params(10, 30, 192) == 115_200
    assert exercises.prefix_params(10, 30, 192, reparam=True, hidden=512) == 6_010_496
    ex = exercises.smollm2_params(cfg, n_tokens=10)
    assert ex.check(10 * 30 * 2 * 3 * 64) is True
    assert ex.check(10 * 30 * 2 * 576) is False  # forgot grouped-query attention
    assert ex.check(10 * 30 * 192) is False  # forgot the values
    assert ex.check(...) is None
    ex = exercises.smollm2_mlp_params(cfg, n_tokens=10, hidden=512)
    assert ex.check(10 * 192 + 192 * 512 + 512 + 512 * 11520 + 11520) is True
    assert ex.check(10 * 192 + 192 * 512 + 512 * 11520) is False  # forgot the biases


@pytest.mark.parametrize("reparam", [False, True])
def test_exercise_counts_match_prefix_tuning_apply(reparam):
    """The count formula against prefix_tuning.apply on SmolLM2's layout (random weights, tiny vocabulary)."""
    model = prefix_tuning.apply(Llama(LlamaConfig(vocab_size=16, num_hidden_layers=3)), 7, reparam=reparam, hidden=40)
    assert params.count_parameters(model)[0] == exercises.prefix_params(7, 3, 192, reparam=reparam, hidden=40)


def right_layer_kv(P_theta, i, n_kv_heads, head_dim):
    kv = n_kv_heads * head_dim
    block = P_theta[:, 2 * i * kv:(2 * i + 2) * kv]
    shape = (P_theta.shape[0], n_kv_heads, head_dim)
    return block[:, :kv].reshape(shape).transpose(0, 1), block[:, kv:].reshape(shape).transpose(0, 1)


def test_exercise_layer_prefix_right_and_wrong():
    ex = exercises.layer_prefix()
    assert ex.check(right_layer_kv) is True
    swapped = lambda P_theta, i, h, d: right_layer_kv(P_theta, i, h, d)[::-1]  # values first
    assert ex.check(swapped) is False
    no_transpose = lambda P_theta, i, h, d: tuple(t.transpose(0, 1) for t in right_layer_kv(P_theta, i, h, d))
    assert ex.check(no_transpose) is False  # (P, heads, hd): wrong shape, explained
    every_layer_the_first = lambda P_theta, i, h, d: right_layer_kv(P_theta, 0, h, d)
    assert ex.check(every_layer_the_first) is False
    assert ex.check(lambda *a: None) is False  # broken code fails politely
    assert ex.check(...) is None


def test_exercise_checker_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    exercises.layer_prefix().check(right_layer_kv)
    assert torch.equal(torch.rand(3), expected)
