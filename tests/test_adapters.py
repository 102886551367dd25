"""Bottleneck adapters: the formula by hand, placements, initialisation, counts, gradients, files.

HF peft 0.21 has no bottleneck (Houlsby/Pfeiffer/parallel) adapter, so the peer checks are a
hand computation of the paper's formula (forward hooks on an unwrapped copy of the model) and
transformers' own LlamaForCausalLM / BertModel, adapted by the same `apply` and compared with ours.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from pefttutor import calculator, params
from pefttutor.methods import adapters
from pefttutor.methods.adapters import Bottleneck, ParallelAdapter, ParallelAddNormAdapter, SerialAdapter
from pefttutor.models.bert import Bert, BertClassifier
from pefttutor.models.llama import Llama
from tiny_models import tiny_bert, tiny_llama

D, M = 32, 4
PER_ADAPTER = 2 * M * D + D + M  # 292
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
SITES = {  # placement -> the wrapped modules of one block, and their wrapper
    "llama": {"houlsby": {"self_attn.o_proj": SerialAdapter, "mlp": SerialAdapter},
              "pfeiffer": {"mlp": SerialAdapter}, "parallel": {"mlp": ParallelAdapter}},
    "bert": {"houlsby": {"attention.output.dense": SerialAdapter, "output.dense": SerialAdapter},
             "pfeiffer": {"output.dense": SerialAdapter}, "parallel": {"output": ParallelAddNormAdapter}},
}
BLOCKS = {"llama": "model.layers", "bert": "encoder.layer"}


MAKE = {"llama": tiny_llama, "bert": tiny_bert}


def ids(seed=0, B=2, T=7):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model, std=0.2, seed=1):
    """Adapters far from the identity (biases too), so every mistake in the branch shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.adapter_layers(model).values():
            for p in layer.adapter.parameters():
                p.copy_(std * torch.randn(p.shape, generator=g))


def branch(h, a):
    """The paper's formula written out: W_up gelu(W_down h + b_down) + b_up."""
    return F.gelu(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias


def by_hand(adapted, base, family, placement):
    """`base` (unwrapped) with forward hooks that add the adapters of `adapted` where the paper puts them."""
    for i in range(2):
        block = f"{BLOCKS[family]}.{i}"
        for site in SITES[family][placement]:
            a = adapted.get_submodule(f"{block}.{site}").adapter
            if placement != "parallel":  # on the module's output, plus the skip
                base.get_submodule(f"{block}.{site}").register_forward_hook(lambda mod, inp, out, a=a: out + branch(out, a))
            elif family == "llama":  # beside the MLP, reading its input
                base.get_submodule(f"{block}.mlp").register_forward_hook(lambda mod, inp, out, a=a: out + branch(inp[0], a))
            else:  # BERT's FFN: input = `intermediate`'s input, output = `output.dense`'s (eval: no dropout)
                seen = {}
                base.get_submodule(f"{block}.intermediate").register_forward_hook(
                    lambda mod, inp, out, seen=seen: seen.update(x=inp[0]))
                base.get_submodule(f"{block}.output.dense").register_forward_hook(
                    lambda mod, inp, out, a=a, seen=seen: out + branch(seen["x"], a))
    return base


# --- the module -----------------------------------------------------------------------------------


def test_bottleneck_shapes_count_and_near_identity_init():
    torch.manual_seed(0)
    b = Bottleneck(384, 64, sigma=1e-2)
    assert b.down.weight.shape == (64, 384) and b.up.weight.shape == (384, 64)
    assert sum(p.numel() for p in b.parameters()) == 2 * 64 * 384 + 384 + 64
    for w in (b.down.weight, b.up.weight):
        assert w.abs().max() <= 2e-2  # truncated at 2 sigma
        assert 0.7e-2 < w.std() < 1e-2  # a normal truncated at 2 sigma has std 0.88 sigma
    assert not b.down.bias.any() and not b.up.bias.any()
    assert isinstance(b.act, nn.GELU)
    zero = Bottleneck(384, 64, init="zero")
    assert not zero.up.weight.any() and zero.down.weight.any()  # down stays random: up gets a gradient
    h = torch.randn(2, 3, 384)
    assert torch.equal(zero(h), torch.zeros_like(h))


@pytest.mark.parametrize("activation, f", [("gelu", F.gelu), ("relu", F.relu), ("silu", F.silu)])
def test_wrappers_are_the_formula(activation, f):
    torch.manual_seed(0)
    base = nn.Linear(6, 8)
    a = Bottleneck(8, 3, sigma=0.5, activation=activation)
    nn.init.normal_(a.up.bias)
    nn.init.normal_(a.down.bias)
    x = torch.randn(2, 5, 6)
    h = base(x)
    expected_branch = f(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias
    torch.testing.assert_close(SerialAdapter(base, a)(x), h + expected_branch, rtol=0, atol=1e-6)
    square = nn.Linear(8, 8)
    torch.testing.assert_close(ParallelAdapter(square, a)(h), square(h) + expected_branch, rtol=0, atol=1e-6)
    addnorm = lambda inner, residual: residual * 2 + inner.sum(-1, keepdim=True)  # any function of (h, x)
    torch.testing.assert_close(ParallelAddNormAdapter(addnorm, a)(x, h), addnorm(x, h + expected_branch))


# --- apply: where the adapters go, what trains, what the model computes --------------------------------


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_placement_puts_adapters_where_stated(family, placement):
    model = adapters.apply(MAKE[family](), size=M, placement=placement)
    layers = adapters.adapter_layers(model)
    expected = {f"{BLOCKS[family]}.{i}.{site}": wrapper for i in range(2) for site, wrapper in SITES[family][placement].items()}
    assert {p: type(m) for p, m in layers.items()} == expected
    per_block = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}[placement]
    assert len(layers) == per_block * 2
    trainable, _ = params.count_parameters(model)
    assert trainable == len(layers) * PER_ADAPTER
    arch = {"layers": 2, "hidden": D, "heads": 4, "ffn": 48, "vocab": 64, "family": family}
    assert trainable == calculator.peft_params(arch, "adapters", size=M, placement=placement)
    assert adapters.get_config(model) == adapters.BottleneckConfig(size=M, placement=placement)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_forward_equals_the_formula_by_hand(family, placement):
    base = MAKE[family]()
    model = adapters.apply(copy.deepcopy(base), size=M, placement=placement)
    randomize(model)
    x = ids()
    reference = by_hand(model, base, family, placement)
    with torch.no_grad():
        got, want, plain = model(x), reference(x), MAKE[family]()(x)
    assert (got - plain).abs().max() > 1e-2  # the adapters do something, so equality means something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_zero_init_is_exactly_the_base_model_and_normal_init_nearly(family, placement):
    x = ids()
    with torch.no_grad():
        plain = MAKE[family]()(x)
        zero = adapters.apply(MAKE[family](), size=M, placement=placement, init="zero")(x)
        near = adapters.apply(MAKE[family](), size=M, placement=placement, sigma=1e-2)(x)
        far = adapters.apply(MAKE[family](), size=M, placement=placement, sigma=1.0)(x)
    assert torch.equal(zero, plain)
    diff_near, diff_far = (near - plain).abs().max().item(), (far - plain).abs().max().item()
    print(f"{family} {placement}: max |adapted - base| sigma=1e-2 {diff_near:.1e}, sigma=1 {diff_far:.1e}")
    assert 0 < diff_near < 0.05 and diff_near < diff_far / 10  # near the base; far with sigma = 1


def test_apply_keeps_train_or_eval_mode():
    model = adapters.apply(tiny_bert().train(), size=M)
    assert all(layer.training for layer in adapters.adapter_layers(model).values())
    model = adapters.apply(tiny_bert().eval(), size=M)
    assert not any(layer.training for layer in adapters.adapter_layers(model).values())


@pytest.mark.parametrize("train_layernorms", [False, True])
def test_counts_with_layernorms_and_head_and_gradients_reach_only_them(train_layernorms):
    torch.manual_seed(0)
    model = BertClassifier(tiny_bert(), num_classes=3)
    adapters.apply(model, size=M, placement="houlsby", train_layernorms=train_layernorms, train=("classifier",))
    n_norm = (1 + 2 * 2) * 2 * D  # embeddings + 2 per block, weight and bias
    head = D * 3 + 3
    expected = 2 * 2 * PER_ADAPTER + head + (n_norm if train_layernorms else 0)
    assert params.count_parameters(model)[0] == expected
    model.train()
    F.cross_entropy(model(ids(), torch.ones(2, 7, dtype=torch.long)), torch.tensor([0, 2])).backward()
    for name, p in model.named_parameters():
        trains = ".adapter." in name or name.startswith("classifier.") or (train_layernorms and "LayerNorm" in name)
        assert p.requires_grad == trains, name
        assert (p.grad is not None) == trains, name
        if trains:
            assert p.grad.abs().sum() > 0, name


def test_llama_layernorms_are_rmsnorms():
    model = adapters.apply(tiny_llama(), size=M, placement="pfeiffer", train_layernorms=True)
    norms = (2 * 2 + 1) * D  # input and post-attention norms of 2 blocks + the final norm: weights only
    assert params.count_parameters(model)[0] == 2 * PER_ADAPTER + norms


# --- transformers' own models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pairs():
    from transformers import BertConfig as HFBertConfig, BertModel, LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(HFLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    bert = BertModel(HFBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32)).eval()
    return {"llama": (Llama.from_hf(llama).eval(), llama), "bert": (Bert.from_hf(bert).eval(), bert)}


def hf_output(model, x, mask=None):
    out = model(input_ids=x, attention_mask=torch.ones_like(x) if mask is None else mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_transformers_models_get_the_same_adapters_and_outputs(hf_pairs, tmp_path, family, placement):
    ours, hf = copy.deepcopy(hf_pairs[family])
    adapters.apply(ours, size=M, placement=placement, train_layernorms=True)
    randomize(ours)
    adapters.save(ours, tmp_path / "a.safetensors")
    x = ids()
    with torch.no_grad():
        before = hf_output(hf, x)
        adapters.load(hf, tmp_path / "a.safetensors")  # applies with the saved settings, by module name
        diff = (ours(x, torch.ones_like(x)) - hf_output(hf, x)).abs().max().item()
        effect = (hf_output(hf, x) - before).abs().max().item()
    assert sorted(adapters.adapter_layers(hf)) == sorted(adapters.adapter_layers(ours))
    assert params.count_parameters(hf)[0] == params.count_parameters(ours)[0]
    print(f"{family} {placement}: max |ours - transformers| {diff:.1e} (the adapters change the output by {effect:.2f})")
    assert diff < 1e-4 and effect > 1e-2


# --- the real models -----------------------------------------------------------------------------------


@pytest.mark.real_models
def test_minilm_ours_and_transformers_agree_and_start_at_the_base(minilm, minilm_hf):
    enc, tok = minilm
    batch = tok(["adapters keep the base model", "at the start"], padding=True, return_tensors="pt")
    x, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        plain = enc(x, mask)
        for placement in PLACEMENTS:
            zero = adapters.apply(copy.deepcopy(enc), size=64, placement=placement, init="zero")
            assert torch.equal(zero(x, mask), plain)
            torch.manual_seed(0)
            near = adapters.apply(copy.deepcopy(enc), size=64, placement=placement)
            hf = copy.deepcopy(minilm_hf)
            adapters.apply(hf, size=64, placement=placement)
            checkpoint_copy(near, hf)
            out = near(x, mask)
            d_base, d_hf = (out - plain).abs().max().item(), (out - hf_output(hf, x, mask)).abs().max().item()
            rel = ((out - plain).norm() / plain.norm()).item()
            print(f"MiniLM {placement} m=64 sigma=1e-2: max |adapted - base| {d_base:.1e} (relative {rel:.1e}), "
                  f"max |ours - transformers| {d_hf:.1e}")
            assert 0 < rel < 0.05 and d_hf < 1e-4


@pytest.mark.real_models
def test_smollm2_zero_init_exact_and_normal_init_near(smollm2):
    llm, _ = smollm2
    x = torch.tensor([[1, 504, 3287, 314, 253, 1470, 30]])
    with torch.no_grad():
        plain = llm(x)
        zero = adapters.apply(copy.deepcopy(llm), size=64, init="zero")
        assert torch.equal(zero(x), plain)
        torch.manual_seed(0)
        near = adapters.apply(copy.deepcopy(llm), size=64)
        out = near(x)
    diff, rel = (out - plain).abs().max().item(), ((out - plain).norm() / plain.norm()).item()
    print(f"SmolLM2 houlsby m=64 sigma=1e-2: max |adapted - base| logits {diff:.2f} (logits up to "
          f"{plain.abs().max():.0f}; relative {rel:.1e})")
    assert params.count_parameters(near)[0] == 60 * (2 * 64 * 576 + 576 + 64) == calculator.peft_params(
        "smollm2-135m", "adapters", size=64)
    assert 0 < rel < 0.05 and torch.equal(out.argmax(-1), plain.argmax(-1))  # same greedy tokens


def checkpoint_copy(src, dst):
    """Copy src's adapter weights into dst (same keys)."""
    from pefttutor import checkpoint

    checkpoint.load_strict(adapters.adapter_state_dict(dst), adapters.adapter_state_dict(src))


# --- files ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = adapters.apply(BertClassifier(tiny_bert(), 3), size=M, placement="pfeiffer", train_layernorms=True,
                           train=("classifier",))
    randomize(model)
    path = tmp_path / "adapter.safetensors"
    adapters.save(model, path)
    return model, path


def fresh_classifier():
    torch.manual_seed(5)
    return BertClassifier(tiny_bert(), 3).eval()


def test_the_file_holds_adapters_layernorms_and_head(saved):
    model, path = saved
    tensors = load_file(path)
    assert set(tensors) == set(adapters.adapter_state_dict(model))
    assert "bert.encoder.layer.0.output.dense.adapter.down.weight" in tensors and "classifier.weight" in tensors
    assert "bert.encoder.layer.1.attention.output.LayerNorm.bias" in tensors
    assert not any(".base." in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == params.count_parameters(model)[0]


@pytest.mark.parametrize("kw, message", [
    (dict(size=8, placement="pfeiffer"), "size: model 8, file 4"),
    (dict(size=M, placement="parallel"), "placement: model 'parallel', file 'pfeiffer'"),
    (dict(size=M, placement="pfeiffer", activation="relu"), "activation: model 'relu', file 'gelu'"),
])
def test_load_refuses_config_mismatch(saved, kw, message):
    _, path = saved
    model = adapters.apply(fresh_classifier(), train_layernorms=True, train=("classifier",), **kw)
    with pytest.raises(ValueError, match="config mismatch") as err:
        adapters.load(model, path)
    assert message in str(err.value)


def test_load_refuses_a_model_without_trained_layernorms(saved):
    _, path = saved
    model = adapters.apply(fresh_classifier(), size=M, placement="pfeiffer", train=("classifier",))
    with pytest.raises(ValueError, match="train_layernorms: model False, file True"):
        adapters.load(model, path)


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    (dict(size=4, placement="after_ffn"), "valid: houlsby, pfeiffer, parallel"),
    (dict(size=0), "positive integer"),
    (dict(size=-3), "positive integer"),
    (dict(size=2.5), "positive integer"),
    (dict(size=True), "positive integer"),
    (dict(size=33), "wider than the hidden size d=32"),
    (dict(size=4, init="xavier"), "valid: normal, zero"),
    (dict(size=4, activation="tanh"), "valid: gelu, relu, silu"),
    (dict(size=4, sigma=0.0), "sigma"),
    (dict(size=4, sigma=float("inf")), "sigma (std of the initial weights) must be a finite number"),
    (dict(size=4, train=("classifer",)), "classifier"),  # a typo lists the valid names
    (dict(size=4, train=("layer.0",)), "pick one"),  # adapters inside a fully trained module
])
def test_bad_input_raises_clearly(kw, message):
    model = BertClassifier(tiny_bert(), 3)
    with pytest.raises(ValueError) as err:
        adapters.apply(model, **kw)
    assert message in str(err.value)
    assert not adapters.adapter_layers(model)  # nothing changed


def test_models_without_known_blocks_are_refused():
    with pytest.raises(ValueError, match="no transformer blocks.*self_attn.o_proj.*attention.output.dense"):
        adapters.apply(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), size=2)
