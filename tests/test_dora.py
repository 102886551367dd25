"""DoRA: the formula, exact start and merge, and the peer test against HF peft's LoRA with use_dora=True."""

import copy

import peft
import pytest
import torch
from torch import nn

from pefttutor.methods import applied, dora
from pefttutor.methods.dora import DoRALinear
from pefttutor.models import Bert, Llama
from tiny_models import through_peft, tiny_hf

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft calls it

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "output.dense"]}


def layer(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    m = DoRALinear(nn.Linear(12, 10), r=3, alpha=6, dropout=dropout)
    with torch.no_grad():
        m.lora_B.weight.normal_(0, 0.3)
        m.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(10))
    return m


def test_forward_is_the_formula_and_the_norm_is_a_constant_in_backward():
    m = layer()
    x = torch.randn(4, 12)
    W = m.base.weight + m.scaling * m.lora_B.weight @ m.lora_A.weight  # W0 + s B A
    norm = W.norm(dim=1, keepdim=True).detach()
    expected = x @ (m.lora_magnitude_vector[:, None] * W / norm).T + m.base.bias
    torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-5)
    m(x).sum().backward()
    grads = [p.grad.clone() for p in (m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector)]
    for p in (m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector):
        p.grad = None
    expected.sum().backward()
    for a, p in zip(grads, (m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector)):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


def test_starts_at_the_base_layer_and_merges_into_one_matrix():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    x = torch.randn(4, 12)
    fresh = DoRALinear(copy.deepcopy(base), r=3)
    assert torch.equal(fresh.lora_magnitude_vector, base.weight.norm(dim=1).detach())  # m = ||W0||
    torch.testing.assert_close(fresh(x), base(x), rtol=0, atol=1e-6)
    m = layer().eval()
    y = m(x)
    w0 = m.base.weight.clone()
    m.merge()
    torch.testing.assert_close(m.base(x), y, rtol=0, atol=1e-5)  # W' is the whole layer now
    torch.testing.assert_close(m.base.weight.norm(dim=1), m.lora_magnitude_vector, rtol=1e-5, atol=0)  # ||W'|| = m
    m.unmerge()
    torch.testing.assert_close(m.base.weight, w0, rtol=0, atol=1e-6)


def test_dropout_acts_on_the_adapted_path_only():
    m = layer(dropout=0.5).train()
    x = torch.randn(64, 12)
    torch.manual_seed(3)
    out = m(x)
    torch.manual_seed(3)
    x_ = m.dropout(x)  # the same mask
    scale = m.lora_magnitude_vector / m.weight_norm().detach()
    expected = m.base(x) + (scale - 1) * (x_ @ m.base.weight.T) + scale * m.scaling * m.lora_B(m.lora_A(x_))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_same_outputs_gradients_and_merge_as_peft(family):
    hf = tiny_hf(family)
    ours = (Llama if family == "llama" else Bert).from_hf(hf).eval()
    dora.apply(ours, TARGETS[family], r=4, alpha=8)
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family],
                                                                     use_dora=True)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial B and m in ours, copied into peft's under its names
        for p in dora.trainable(ours).values():
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g)).add_(0.05 * torch.randn(p.shape, generator=g))
    mine = dora.adapter_state_dict(ours)
    peft.set_peft_model_state_dict(theirs, {f"base_model.model.{k}": v.clone() for k, v in mine.items()})
    assert set(peft.get_peft_model_state_dict(theirs)) == {f"base_model.model.{k}" for k in mine}  # the same names
    ids = torch.randint(0, 64, (2, 7))
    out = lambda m: m(input_ids=ids).logits if family == "llama" else m(input_ids=ids).last_hidden_state  # noqa: E731
    ours_out = ours(ids)
    torch.testing.assert_close(ours_out, out(theirs), rtol=0, atol=1e-5)
    ours_out.square().mean().backward()
    out(theirs).square().mean().backward()
    theirs_grads = {n.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
                    .removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in dora.trainable(ours).items():
        torch.testing.assert_close(p.grad, theirs_grads[name].reshape(p.shape), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        dora.merge(ours)
        merged = theirs.merge_and_unload()
        torch.testing.assert_close(ours(ids), out(merged), rtol=0, atol=1e-5)


@pytest.mark.parametrize("direction", ["export", "import"])
def test_interop_with_peft_both_ways(direction, tmp_path):
    """Our DoRA adapter as a peft folder (use_dora: true) gives peft our outputs, and peft's loads into ours."""
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    ours, theirs, hf = through_peft(direction, dora.METHOD, config, tmp_path, targets=["q_proj", "v_proj"], r=4, alpha=8)
    assert list(applied(ours)) == ["dora"] and dora.get_config(ours).r == 4
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() > 1e-3  # the adapter does something


def test_without_gradients_the_norm_is_computed_once_and_follows_every_weight_change(monkeypatch):
    m = layer().eval()
    x = torch.randn(4, 12)
    calls = []
    compute = DoRALinear.weight_norm
    monkeypatch.setattr(DoRALinear, "weight_norm", lambda self: calls.append(1) or compute(self))
    fresh = lambda: copy.deepcopy(m)(x)  # noqa: E731  a new layer: nothing cached
    with torch.no_grad():
        for _ in range(3):
            y = m(x)
        assert len(calls) == 1  # generation's many forwards: one norm
        torch.testing.assert_close(y, fresh(), rtol=0, atol=0)
        for change in (lambda: m.lora_B.weight.add_(0.1), lambda: m.lora_A.weight.mul_(1.1),
                       lambda: m.base.weight.sub_(0.05), lambda: m.load_state_dict(layer(seed=1).state_dict())):
            before = m(x)
            change()
            after = m(x)
            assert not torch.allclose(before, after)
            torch.testing.assert_close(after, fresh(), rtol=0, atol=0)
        m.base.weight = nn.Parameter(torch.randn(10, 12))  # replaced, not changed in place
        torch.testing.assert_close(m(x), fresh(), rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), fresh(), rtol=0, atol=0)
    n = len(calls)
    m(x).sum().backward()  # with gradients: computed every time, as before
    m(x)
    assert len(calls) == n + 2
