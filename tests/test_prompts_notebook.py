"""Notebook 02 (hard vs soft prompts): its inline soft prompt equals the package's, and its exercises check right and wrong.

The cell defining `prepend_soft_prompt` is read from the committed notebook and executed here, so the code
readers see and `pefttutor.methods.prompt_tuning` cannot drift apart.
"""

import pytest
import torch

from notebook_cells import run_cell
from pefttutor.exercises import prompts as exercises
from pefttutor.methods import prompt_tuning
from pefttutor.models import Bert, BertClassifier, Llama
from pefttutor.models.bert import BertConfig
from pefttutor.models.llama import LlamaConfig

NOTEBOOK = "02_hard_vs_soft_prompts.ipynb"
MARK = "def prepend_soft_prompt("


@pytest.fixture(scope="module")
def cell():
    return run_cell(NOTEBOOK, MARK, max_lines=20)


def tiny(kind):
    torch.manual_seed(0)
    if kind == "llama":
        return Llama(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    return Bert(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=32)).eval()


def padded_batch(side):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    if side == "left":
        mask[1, :2] = mask[2, :4] = 0
    else:
        mask[1, -2:] = mask[2, -4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_prepend_shapes_and_mask(cell):
    x, mask = cell["prepend_soft_prompt"](torch.randn(3, 7, 32), padded_batch("left")[1], torch.randn(5, 32))
    assert x.shape == (3, 12, 32) and mask.shape == (3, 12)
    assert mask[:, :5].all() and torch.equal(mask[:, 5:], padded_batch("left")[1])


@pytest.mark.parametrize("kind, side", [("llama", "left"), ("llama", "right"), ("bert", "right")])
def test_notebook_soft_prompt_equals_the_package(cell, kind, side):
    model = prompt_tuning.apply(tiny(kind), 5, init="vocab")
    P_e = prompt_tuning.soft_prompt(model).prompt_embeddings
    ids, mask = padded_batch(side)
    package = model(ids, mask)
    hook = model.peft.pop("prompt_tuning")  # the notebook's way runs on the plain model
    inline = cell["soft_prompt_forward"](model, P_e, ids, mask)
    model.peft["prompt_tuning"] = hook
    real = mask.bool()
    torch.testing.assert_close(inline[real], package[real], rtol=0, atol=1e-5)
    assert (package - model.__class__.forward(model, ids, mask)).abs().max() == 0
    # gradients reach P_e the same way
    inline.sum().backward()
    g_inline = P_e.grad.clone()
    P_e.grad = None
    model(ids, mask).sum().backward()
    torch.testing.assert_close(g_inline, P_e.grad, rtol=1e-4, atol=1e-6)


def test_notebook_soft_prompt_in_a_classifier_equals_the_package(cell):
    model = prompt_tuning.apply(BertClassifier(tiny("bert"), 3).eval(), 4, init="vocab", train="classifier")
    P_e = prompt_tuning.soft_prompt(model).prompt_embeddings
    ids, mask = padded_batch("right")
    hidden = model.bert(ids, mask)
    hook = model.bert.peft.pop("prompt_tuning")
    torch.testing.assert_close(cell["soft_prompt_forward"](model.bert, P_e, ids, mask)[mask.bool()],
                               hidden[mask.bool()], rtol=0, atol=1e-5)
    model.bert.peft["prompt_tuning"] = hook


def test_exercise_count_right_and_wrong():
    ex = exercises.soft_prompt_params(100, 4096)
    assert ex.check(100 * 4096) is True
    assert ex.check(4096) is False
    assert ex.check(2 * 100 * 4096) is False
    assert ex.check(...) is None
    model = prompt_tuning.apply(tiny("llama"), 7)
    assert exercises.soft_prompt_params(7, 32).check(sum(p.numel() for p in model.parameters() if p.requires_grad))


def test_exercise_extend_mask_right_and_wrong(cell):
    ex = exercises.extend_mask()
    assert ex.check(lambda mask, P: torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)) is True
    assert ex.check(lambda mask, P: cell["prepend_soft_prompt"](torch.zeros(*mask.shape, 2), mask, torch.zeros(P, 2))[1])
    assert ex.check(lambda mask, P: torch.cat([mask, mask.new_ones(mask.shape[0], P)], dim=1)) is False  # behind
    assert ex.check(lambda mask, P: torch.ones(mask.shape[0], P + mask.shape[1])) is False  # loses the padding
    assert ex.check(lambda mask, P: mask) is False  # wrong shape: fails politely
    assert ex.check(...) is None


def test_exercise_argmax_right_and_wrong():
    ex = exercises.argmax_gradient()
    assert ex.check("c") is True and ex.check(" C ") is True
    assert ex.check("a") is False and ex.check("b") is False
    assert ex.check(...) is None


def test_exercise_relaxed_token_right_and_wrong():
    ex = exercises.relaxed_token()
    assert ex.check(lambda z, E, tau: torch.softmax(z / tau, dim=-1) @ E) is True
    assert ex.check(lambda z, E, tau: E[z.argmax(-1)]) is False  # the hard choice: same limit, no gradient
    assert ex.check(lambda z, E, tau: torch.softmax(z, dim=-1) @ E) is False  # ignores tau
    assert ex.check(lambda z, E, tau: torch.softmax(z / tau, dim=0) @ E) is False  # normalised over the batch
    assert ex.check(lambda z, E, tau: z @ E) is False
    assert ex.check(...) is None


def test_exercise_checkers_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    exercises.relaxed_token().check(lambda z, E, tau: z)
    exercises.argmax_gradient().check("a")
    exercises.extend_mask().check(lambda mask, P: mask)
    assert torch.equal(torch.rand(3), expected)
