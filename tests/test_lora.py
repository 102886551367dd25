import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from pefttutor import params
from pefttutor.methods import lora
from pefttutor.methods.lora import LoRALinear
from pefttutor.models.llama import Llama
from tiny_models import LLAMA, tiny_bert, tiny_llama



def randomize_b(model, seed=1, std=0.1):
    """Make the adapter non-trivial: B = 0 would hide every mistake in the LoRA path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(std * torch.randn(layer.lora_B.weight.shape, generator=g))


def layer(d_in=12, d_out=10, r=4, alpha=8.0, **kw):
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(d_in, d_out), r=r, alpha=alpha, **kw)


def test_init_equals_base_layer():
    m = layer()
    x = torch.randn(3, 5, 12)
    assert m.lora_A.weight.shape == (4, 12) and m.lora_B.weight.shape == (10, 4)
    assert m.lora_A.weight.abs().sum() > 0 and torch.all(m.lora_B.weight == 0)
    assert torch.equal(m(x), m.base(x))


@pytest.mark.parametrize("rslora, scale", [(False, 8.0 / 4), (True, 8.0 / math.sqrt(4))])
def test_forward_is_the_formula(rslora, scale):
    m = layer(rslora=rslora)
    nn.init.normal_(m.lora_B.weight)
    assert m.scaling == scale
    x = torch.randn(3, 12)
    W0, b, A, B = m.base.weight, m.base.bias, m.lora_A.weight, m.lora_B.weight
    expected = x @ W0.T + b + scale * (x @ A.T @ B.T)  # h = W0 x + b + s B A x, rows as vectors
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=0)


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), r=0)


def test_dropout_only_on_lora_path_and_only_in_training():
    m = layer(dropout=0.9)
    x = torch.randn(8, 12)
    m.train()
    assert torch.equal(m(x), m.base(x))  # B = 0: dropout never touches W0 x
    nn.init.normal_(m.lora_B.weight)
    assert not torch.equal(m(x), m(x))  # random masks in training
    m.eval()
    W0, b, A, B = m.base.weight, m.base.bias, m.lora_A.weight, m.lora_B.weight
    torch.testing.assert_close(m(x), x @ W0.T + b + m.scaling * (x @ A.T @ B.T), atol=1e-5, rtol=0)


def test_merge_unmerge_round_trip():
    m = layer().eval()
    nn.init.normal_(m.lora_B.weight)
    W0 = m.base.weight.clone()
    x = torch.randn(6, 12)
    before = m(x)
    m.merge()
    merged_weight = m.base.weight.clone()
    torch.testing.assert_close(merged_weight, W0 + m.scaling * m.lora_B.weight @ m.lora_A.weight)
    torch.testing.assert_close(m(x), before, atol=1e-5, rtol=0)
    m.merge()  # idempotent: no double folding
    assert torch.equal(m.base.weight, merged_weight)
    m.unmerge()
    assert (m.base.weight - W0).abs().max() <= 1e-6
    m.unmerge()  # idempotent too
    assert (m.base.weight - W0).abs().max() <= 1e-6
    assert (m(x) - before).abs().max() <= 1e-5


def test_merged_layer_refuses_training_mode():
    m = layer()
    m.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        m.train()(torch.randn(2, 12))


@pytest.mark.parametrize("make, targets, train", [
    (tiny_llama, ("q_proj", "v_proj", "down_proj"), ("lm_head",)),
    (tiny_bert, ("query", "value"), ("pooler",)),
])
def test_apply_trains_only_lora_and_train_modules(make, targets, train):
    model = make()
    linears = params.find_modules(model, targets)
    heads = params.find_modules(model, train, nn.Module)
    lora.apply(model, targets, r=4, alpha=8, train=train)
    layers = lora.lora_layers(model)
    assert sorted(layers) == sorted(linears)
    expected = sum(4 * (m.in_features + m.out_features) for m in linears.values())  # r (d_in + d_out) each
    expected += sum(p.numel() for h in heads.values() for p in h.parameters())
    trainable, total = params.count_parameters(model)
    assert trainable == expected
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n or n.split(".")[0] in ("lm_head", "pooler") for n in names)
    assert lora.get_config(model) == lora.LoRAConfig(targets=targets, r=4, alpha=8, train=train)


def test_apply_works_on_a_plain_module_and_keeps_outputs():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(4, 6)
    before = model(x)
    lora.apply(model, "0", r=2, dropout=0.5)
    assert isinstance(model[0], LoRALinear) and not model[0].training  # keeps eval mode: no dropout
    assert torch.equal(model(x), before)  # B = 0: same function until trained


def test_wrong_target_lists_valid_names():
    with pytest.raises(ValueError) as err:
        lora.apply(tiny_llama(), ("q_proj", "qproj"))
    assert "qproj" in str(err.value) and "v_proj" in str(err.value) and "gate_proj" in str(err.value)


def test_target_inside_a_train_module_is_refused():
    with pytest.raises(ValueError, match="pick one"):
        lora.apply(tiny_llama(), ("q_proj",), train=("layers.0",))


def test_gradients_reach_only_a_and_b():
    model = lora.apply(tiny_llama(), ("q_proj", "v_proj"), r=4)
    randomize_b(model)
    model(torch.randint(0, 64, (2, 5))).sum().backward()
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert (p.grad is not None) == is_lora, name
        if is_lora:
            assert p.grad.abs().sum() > 0, name


def test_merge_on_a_model_keeps_outputs():
    model = lora.apply(tiny_llama(), ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"), r=4)
    randomize_b(model)
    x = torch.randint(0, 64, (2, 7))
    before = model(x)
    lora.merge(model)
    assert all(layer.merged for layer in lora.lora_layers(model).values())
    assert (model(x) - before).abs().max() <= 1e-5
    lora.unmerge(model)
    assert (model(x) - before).abs().max() <= 1e-5


def test_merge_refuses_a_tied_weight():
    torch.manual_seed(0)
    model = Llama(replace(LLAMA, tie_word_embeddings=True))
    lora.apply(model, ("lm_head",), r=2)
    randomize_b(model)
    with pytest.raises(ValueError, match="tied"):
        lora.merge(model)
    assert not model.lm_head.merged


@pytest.fixture
def saved(tmp_path):
    model = lora.apply(tiny_llama(), ("q_proj", "v_proj"), r=4, alpha=8, train=("lm_head",))
    randomize_b(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    path = tmp_path / "adapter.safetensors"
    lora.save(model, path)
    return model, path


@pytest.mark.parametrize("kw, message", [
    (dict(r=8, alpha=8), "r: model 8, file 4"),
    (dict(r=4, alpha=16), "alpha: model 16, file 8"),
    (dict(r=4, alpha=8, rslora=True), "rslora: model True, file False"),
])
def test_load_refuses_config_mismatch(saved, kw, message):
    _, path = saved
    model = lora.apply(tiny_llama(), ("q_proj", "v_proj"), train=("lm_head",), **kw)
    with pytest.raises(ValueError, match="config mismatch") as err:
        lora.load(model, path)
    assert message in str(err.value)


def test_load_refuses_a_merged_model(saved):
    model, path = saved
    with pytest.raises(ValueError, match="unmerge"):
        lora.load(lora.merge(model), path)


def test_a_merged_state_dict_counts_the_update_once():
    """A merged model's weights hold W0 + s B A *and* A, B: loaded into an unmerged LoRA model, the
    layer must know it is merged (its extra state says so), or the update would count twice."""
    model = lora.apply(tiny_llama(), ("q_proj", "v_proj"), r=4, alpha=8)
    randomize_b(model)
    x = torch.randint(0, 64, (2, 6))
    y = model(x)
    state = lora.merge(model).state_dict()
    other = lora.apply(tiny_llama(seed=1), ("q_proj", "v_proj"), r=4, alpha=8)
    other.load_state_dict(state)
    assert all(layer.merged for layer in lora.lora_layers(other).values())
    torch.testing.assert_close(other(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.unmerge(other)(x), y, rtol=1e-5, atol=1e-5)  # and unmerges to the same function


def test_adapters_stack_on_lora_layers():
    """Wrapped projections keep their shape attributes: adapters on o_proj find the blocks after LoRA."""
    from pefttutor.methods import adapters

    model = adapters.apply(lora.apply(tiny_llama(), ("o_proj",), r=2), size=4)
    assert isinstance(model.model.layers[0].self_attn.o_proj.base, LoRALinear)
    assert lora.lora_layers(model) and lora.trainable(model) and adapters.trainable(model)
