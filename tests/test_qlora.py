"""QLoRA's maths and design (pefttutor/methods/qlora.py); the contract is in test_method_contract.py."""

import pytest
import torch
from safetensors import safe_open
from torch import nn

from pefttutor import quantized
from pefttutor.methods import lora, qlora
from pefttutor.methods.qlora import QLoRALinear
from pefttutor.quantized import Linear4bit
from tests.tiny_models import tiny_llama

X = torch.tensor([[5, 9, 2, 33, 7], [1, 60, 12, 8, 4]])


def adapted(quant_type="nf4", double_quant=True, seed=0, **settings):
    """A 4-bit tiny Llama with QLoRA on every block linear, B moved off zero so that the update matters."""
    model = quantized.quantize_model(tiny_llama(), quant_type=quant_type, double_quant=double_quant)
    qlora.apply(model, **{"r": 2, **settings})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in qlora.trainable(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_h_is_w_hat_x_plus_s_b_a_x_on_every_block_linear():
    model = adapted(alpha=6, rslora=True)
    layers = qlora.METHOD.layers(model)
    assert len(layers) == 14 and all(type(m) is QLoRALinear and isinstance(m.base, Linear4bit) for m in layers.values())
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    s = 6 / 2 ** 0.5  # rsLoRA: alpha / sqrt(r)
    W_hat, A, B = layer.base.dequantized(), layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), x @ W_hat.T + s * (x @ A.T) @ B.T, rtol=1e-6, atol=1e-6)
    assert qlora.get_config(model).quant_type == "nf4" and qlora.get_config(model).double_quant is True


def test_a_training_step_moves_a_and_b_only_never_the_4_bit_codes():
    model = adapted()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    trainable = qlora.trainable(model)
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in trainable) and len(trainable) == 28
    before = {k: p.clone() for k, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    model.train()(X).float().pow(2).mean().backward()
    optimizer.step()
    assert all(not torch.equal(p, before[k]) for k, p in trainable.items())
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if "lora_" not in k)


def test_full_precision_targets_and_other_formats_are_refused():
    with pytest.raises(ValueError, match=r"must be 4-bit layers; \['model.layers.0.self_attn.q_proj'.* quantize them"):
        qlora.apply(tiny_llama(), ("q_proj",))
    model = quantized.quantize_model(tiny_llama(), ("q_proj",), quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type must be the 4-bit layers' own: the config says 'nf4'"):
        qlora.apply(model, ("q_proj",), quant_type="nf4")
    quantized.quantize_model(model, ("v_proj",), quant_type="nf4")
    with pytest.raises(ValueError, match="different formats"):
        qlora.apply(model, ("q_proj", "v_proj"))
    with pytest.raises(ValueError, match=r"no Linear matches \['q_proj'\]"):  # LoRA adapts full-precision layers only
        lora.apply(model, ("q_proj",))
    assert not hasattr(model, "peft_methods")


def test_the_adapter_file_holds_only_a_and_b_and_loads_only_onto_the_same_4_bit_base(tmp_path):
    model = adapted()
    path = tmp_path / "qlora.safetensors"
    qlora.save(model, path)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert len(tensors) == 28 and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in qlora.trainable(model).values())
    again = qlora.load(quantized.quantize_model(tiny_llama()), path)
    assert torch.equal(again(X), model(X))
    with pytest.raises(ValueError, match="no 4-bit layers: quantize it first"):
        qlora.load(tiny_llama(), path)
    other = quantized.quantize_model(tiny_llama(), double_quant=False)
    with pytest.raises(ValueError, match="double_quant must be the 4-bit layers' own: the config says True"):
        qlora.load(other, path)
    qlora.apply(other, r=2)
    with pytest.raises(ValueError, match="config mismatch .*double_quant: model False, file True"):
        qlora.load(other, path)


def test_merge_is_refused_and_to_lora_gives_the_same_model_in_full_precision_which_merges():
    model = adapted()
    y = model(X)
    with pytest.raises(ValueError, match=r"cannot be merged .*qlora\.to_lora\(model\)"):
        qlora.merge(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.model.layers[0].self_attn.q_proj.merge()  # the layer itself refuses too
    qlora.to_lora(model)
    assert not quantized.layers(model) and list(model.peft_methods) == ["lora"]
    assert torch.equal(model(X), y)
    lora.merge(model)
    torch.testing.assert_close(model(X), y, rtol=1e-5, atol=1e-5)


def test_remove_gives_back_the_4_bit_base_not_w0():
    model = quantized.quantize_model(tiny_llama())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qlora.apply(model)
    qlora.remove(model)
    assert len(quantized.layers(model)) == 14
    again = model.state_dict()
    assert again.keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in again.items())


def test_equals_peft_lora_on_a_bitsandbytes_4_bit_layer():
    """peft's own QLoRA layer (peft.tuners.lora.bnb.Linear4bit on bitsandbytes' Linear4bit), with the
    same A and B: the same output."""
    pytest.importorskip("bitsandbytes")
    import peft
    from peft.tuners.lora import bnb as peft_bnb

    from tests.test_quantized import bnb_layer

    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    ours = QLoRALinear(Linear4bit.from_linear(linear, "nf4", True), r=4, alpha=8)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["x"])
    theirs = peft_bnb.Linear4bit(bnb_layer(linear, "nf4", True, torch.float32, ours.base), "default", config,
                                 r=4, lora_alpha=8)
    with torch.no_grad():
        ours.lora_B.weight.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(3, 5, 128)
    assert torch.equal(ours(x), theirs.train()(x))
