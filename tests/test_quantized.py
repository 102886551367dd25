"""The 4-bit linear layer against bitsandbytes.nn.Linear4bit, and quantizing, dequantizing and
storing a whole model (`pefttutor.quantized`)."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pefttutor import calculator, quant, quantized
from pefttutor.methods import lora
from pefttutor.quantized import Linear4bit
from tests.tiny_models import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
X = torch.tensor([[5, 9, 2, 33, 7], [1, 60, 12, 8, 4]])


def bnb_layer(linear, quant_type, double_quant, compute_dtype, ours):
    """bitsandbytes' Linear4bit of `linear`, in training mode: its exact path (dequantize, then F.linear).
    With double quantization it takes our 8-bit absmax codes: its C search does not always pick the
    nearest code (tests/test_quant.py); everything else it computes itself."""
    theirs = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type)
    theirs.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                      compress_statistics=double_quant, blocksize=quant.BLOCK)
    if linear.bias is not None:
        theirs.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    theirs = theirs.to("cpu").train()
    assert torch.equal(theirs.weight.data.reshape(-1), ours.codes)
    if double_quant:
        assert (theirs.weight.quant_state.absmax == ours.absmax).float().mean() > 0.99
        theirs.weight.quant_state.absmax = ours.absmax.clone()
    return theirs


@pytest.mark.parametrize("shape", [(128, 96), (29, 37)])  # (d_in, d_out): whole blocks; a partial block
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_equals_bitsandbytes_exactly(quant_type, double_quant, compute_dtype, shape):
    torch.manual_seed(0)
    linear = nn.Linear(*shape)
    ours = Linear4bit.from_linear(linear, quant_type, double_quant, compute_dtype)
    theirs = bnb_layer(linear, quant_type, double_quant, compute_dtype, ours)
    for x in (torch.randn(3, 5, shape[0]), torch.randn(1, shape[0])):  # a batch, one token
        y = ours(x)
        assert y.dtype == x.dtype and torch.equal(y, theirs(x))
    assert ours.bias.dtype == torch.float32  # the bias stays in full precision


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bf16_autocast_computes_in_bf16_like_bitsandbytes(quant_type):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    ours = Linear4bit.from_linear(linear, quant_type, True)
    theirs = bnb_layer(linear, quant_type, True, torch.float32, ours)
    x = torch.randn(4, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = ours(x), theirs(x)
    assert y.dtype == torch.bfloat16  # as nn.Linear under autocast (bitsandbytes casts back to the input's dtype)
    assert torch.equal(y.float(), want)
    assert torch.equal(y, nn.functional.linear(x.bfloat16(), ours.weight.bfloat16(), linear.bias.bfloat16()))


def test_bitsandbytes_inference_kernel_agrees_to_bf16_precision():
    """In eval mode without gradients, bitsandbytes on CPUs with AVX512-BF16 (this one) runs a fused
    kernel that rounds the input and the absmax constants to bf16 before multiplying: not the same
    sums, so equal only to bf16's precision (8 bits of mantissa: 1/256 of the output's scale)."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    ours = Linear4bit.from_linear(linear, "nf4", False)
    theirs = bnb_layer(linear, "nf4", False, torch.float32, ours).eval()
    x = torch.randn(6, 256)
    with torch.no_grad():
        y, want = ours(x), theirs(x)
    assert (y - want).abs().max() <= 2 / 256 * y.abs().max()


@pytest.mark.real_models
@pytest.mark.parametrize("which", ["self_attn.q_proj", "mlp.down_proj"])
def test_a_smollm2_layer_equals_bitsandbytes_exactly(smollm2, which):
    model, _ = smollm2
    linear = model.model.layers[3].get_submodule(which)
    x = torch.randn(2, 7, linear.in_features)
    for compute_dtype in (torch.float32, torch.bfloat16):
        ours = Linear4bit.from_linear(linear, "nf4", True, compute_dtype)
        with torch.no_grad():
            assert torch.equal(ours(x), bnb_layer(linear, "nf4", True, compute_dtype, ours)(x))


def test_backward_gives_the_input_gradient_and_keeps_no_dequantized_weight():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 128), "nf4", True)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.pow(2).sum().backward()
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 64 * 128]  # W_hat is recomputed
    x2 = x.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    nn.functional.linear(x2, layer.weight, b).pow(2).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.allclose(layer.bias.grad, b.grad)
    assert not layer.codes.requires_grad and layer.codes.grad is None


def test_dequantize_once_generates_the_same_tokens_and_lets_the_weights_go():
    model = quantized.quantize_model(tiny_llama())
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    calls = []
    q = model.model.layers[0].self_attn.q_proj
    q.dequantized = lambda: calls.append(1) or Linear4bit.dequantized(q)  # count the dequantizations
    with torch.no_grad():
        fresh = model.generate(ids, 6)
        per_token = len(calls)
        with quantized.dequantize_once(model):
            once = model.generate(ids, 6)
    assert torch.equal(once, fresh) and per_token == 6 and len(calls) == per_token + 1
    assert all(layer._cache is None for layer in quantized.layers(model).values())


def test_storage_is_what_bits_per_parameter_says():
    for n_in, n_out in ((576, 576), (29, 37)):
        for double_quant in (False, True):
            layer = Linear4bit(n_in, n_out, quant_type="nf4", double_quant=double_quant)
            assert layer.stored_bytes() == calculator.quantized_matrix_bytes(n_in * n_out, double_quant)
    layer = Linear4bit(576, 1536, double_quant=True)
    assert abs(8 * layer.stored_bytes() / (576 * 1536) - quant.bits_per_parameter(True)) < 2e-3
    assert Linear4bit(576, 1536, double_quant=False).stored_bytes() * 8 == 4.5 * 576 * 1536


def test_quantize_model_makes_every_decoder_linear_4_bit_and_dequantize_gives_w_hat():
    model = tiny_llama()
    y = model(X)
    quantized.quantize_model(model)
    four_bit = quantized.layers(model)
    assert sorted({p.rsplit(".", 1)[-1] for p in four_bit}) == sorted(quantized.DECODER) and len(four_bit) == 14
    assert isinstance(model.lm_head, nn.Linear)  # the head and embeddings stay as they are
    y4 = model(X)
    assert 0 < (y4 - y).abs().max() < 0.1 * y.abs().max()  # 4 bits: close, not equal
    W_hat = model.model.layers[0].self_attn.q_proj.weight
    quantized.dequantize_model(model)
    assert not quantized.layers(model) and torch.equal(model.model.layers[0].self_attn.q_proj.weight, W_hat)
    assert torch.equal(model(X), y4)  # the same maths, now from full-precision W_hat


def test_quantizing_is_refused_on_a_model_with_a_method_and_on_a_typo():
    model = lora.apply(tiny_llama(), ("q_proj",))
    for step in (quantized.quantize_model, quantized.dequantize_model):
        with pytest.raises(ValueError, match=r"with no method applied.*\['lora'\]"):
            step(model)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no Linear matches \['qproj'\]"):
        quantized.quantize_model(model, ("q_proj", "qproj"))
    assert not quantized.layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unknown quant_type 'int8'; valid: nf4, fp4, int4"):
        quantized.quantize_model(model, quant_type="int8")


@pytest.mark.parametrize("tied", [False, True])  # SmolLM2's LM head is its embedding matrix
def test_a_stored_4_bit_model_loads_back_bit_for_bit(tied, tmp_path):
    model = quantized.quantize_model(tiny_llama(tie_word_embeddings=tied), quant_type="fp4")
    if not tied:  # two formats in one model
        quantized.quantize_model(model, ("lm_head",), "nf4", double_quant=False, compute_dtype=torch.bfloat16)
    path = tmp_path / "base.safetensors"
    quantized.save(model, path)
    fresh = tiny_llama(seed=1, tie_word_embeddings=tied)
    quantized.load(fresh, path)
    state, again = model.state_dict(), fresh.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) and state[k].dtype == again[k].dtype
                                                for k in state)
    assert torch.equal(fresh(X), model(X))
    assert tied == (fresh.lm_head.weight is fresh.model.embed_tokens.weight)
    formats = {p: (m.quant_type, m.double_quant, m.compute_dtype) for p, m in quantized.layers(fresh).items()}
    assert formats == {p: (m.quant_type, m.double_quant, m.compute_dtype) for p, m in quantized.layers(model).items()}
    assert len(formats) == 14 + (not tied)


def test_storing_and_loading_a_4_bit_model_refuse_what_does_not_fit(tmp_path):
    model = quantized.quantize_model(tiny_llama())
    path = tmp_path / "base.safetensors"
    quantized.save(model, path)
    deeper = tiny_llama(num_hidden_layers=3)
    before = [(n, type(m)) for n, m in deeper.named_modules()], {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(ValueError, match=f"{path} does not fit this model: .*missing keys: model.layers.2"):
        quantized.load(deeper, path)
    assert [(n, type(m)) for n, m in deeper.named_modules()] == before[0]
    assert all(torch.equal(v, before[1][k]) for k, v in deeper.state_dict().items())
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match="not a stored 4-bit model"):
        quantized.load(tiny_llama(), plain)
    lora.apply(model, ("lm_head",))
    with pytest.raises(ValueError, match="save the base model, with no method applied"):
        quantized.save(model, path)


def test_the_layer_refuses_bad_formats_and_shows_what_it_is():
    with pytest.raises(ValueError, match="unknown quant_type"):
        Linear4bit(8, 8, quant_type="nf3")
    with pytest.raises(ValueError, match="double_quant must be True or False"):
        Linear4bit(8, 8, double_quant=1)
    layer = Linear4bit.from_linear(nn.Linear(64, 64, bias=False), "int4", False)
    assert layer.bias is None and "quant_type=int4" in repr(layer) and "4.500 bits/weight" in repr(layer)
    assert layer.weight.shape == (64, 64) and layer.weight.dtype == torch.float32
