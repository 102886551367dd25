"""Prefix tuning: parameter counts, padding, KV-cache generation, dropping the MLP, files, errors,
and the peer test: the same prefix gives the same outputs as HF peft's PrefixTuning on transformers' models."""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig as HFBertConfig
from transformers import BertModel
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from pefttutor import params
from pefttutor.methods import prefix_tuning as pt
from pefttutor.models import Bert, BertClassifier, Llama
from pefttutor.models.llama import LlamaConfig
import tiny_models
from tiny_models import tiny_bert

# peft calls a deprecated transformers method, and hands its prefix over under a deprecated name
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")]

TOL = 1e-4


def tiny_llama(seed=0):
    return tiny_models.tiny_llama(seed, num_hidden_layers=3)  # an odd layer count: per-layer slicing shows


def position_ids_from_mask(attention_mask):
    """0, 1, 2, ... counted over real tokens only (pads get 0): HF generate's positions for left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def kv_dim(model):
    cfg = model.config
    return (cfg.num_key_value_heads * cfg.head_dim) if isinstance(model, Llama) else cfg.hidden_size


def expected_count(n, L, kv, reparam, hidden):
    """The formulas of the module docstring (and of the lead's parameter calculator)."""
    if not reparam:
        return n * L * 2 * kv
    d = kv
    return n * d + d * hidden + hidden + hidden * (L * 2 * kv) + L * 2 * kv


# ---- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
@pytest.mark.parametrize("reparam", [False, True])
def test_trainable_count_is_the_formula(make, reparam):
    model = make()
    L = model.config.num_hidden_layers
    pt.apply(model, n_tokens=5, reparam=reparam, hidden=24)
    assert params.count_parameters(model)[0] == expected_count(5, L, kv_dim(model), reparam, 24)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("peft.prefix_tuning.") for n in trainable)
    assert pt.get_config(model) == pt.PrefixConfig(n_tokens=5, reparam=reparam, hidden=24)


def test_real_smollm2_shapes_counts():
    """SmolLM2-135M's layout (random weights, tiny vocabulary): kv_dim = 3 heads x 64 = 192, 30 layers."""
    torch.manual_seed(0)
    model = pt.apply(Llama(LlamaConfig(vocab_size=16)), n_tokens=10)
    assert params.count_parameters(model)[0] == expected_count(10, 30, 192, True, 512)
    assert pt.prefix_encoder(model)().shape == (10, 30 * 2 * 192)
    pt.drop_reparam(model)
    assert params.count_parameters(model)[0] == 10 * 30 * 2 * 192 == 115_200


def test_layer_hook_reads_its_slice_keys_then_values():
    """Layer i's keys are columns [2i kv, (2i+1) kv) of P_theta, values the next kv, viewed as (Hkv, P, hd)."""
    model = pt.apply(tiny_llama(), n_tokens=4, reparam=True, hidden=16)
    table = pt.prefix_encoder(model)().detach()  # (P, L * 2 * kv_dim)
    kv = kv_dim(model)
    for i, attn in enumerate(pt.attention_layers(model)):
        k, v = attn.peft["prefix_tuning"].kv_prefix(3)
        assert k.shape == v.shape == (3, 2, 4, 8)  # (B, Hkv, P, hd)
        want_k = table[:, 2 * i * kv:(2 * i + 1) * kv].view(4, 2, 8).transpose(0, 1)
        want_v = table[:, (2 * i + 1) * kv:(2 * i + 2) * kv].view(4, 2, 8).transpose(0, 1)
        torch.testing.assert_close(k[1], want_k, rtol=0, atol=1e-6)
        torch.testing.assert_close(v[2], want_v, rtol=0, atol=1e-6)


def test_gradients_reach_only_the_prefix_and_train_modules():
    torch.manual_seed(0)
    model = pt.apply(BertClassifier(tiny_bert(), num_classes=3), n_tokens=3, reparam=True, hidden=8,
                     train=("classifier",))
    n_head = 32 * 3 + 3
    assert params.count_parameters(model)[0] == expected_count(3, 2, 32, True, 8) + n_head
    ids = torch.randint(1, 64, (2, 5))
    nn.functional.cross_entropy(model(ids, torch.ones_like(ids)), torch.tensor([0, 2])).backward()
    for name, p in model.named_parameters():
        trained = name.startswith(("bert.peft.prefix_tuning.", "classifier."))
        assert (p.grad is not None) == trained, name
        if trained:
            assert p.grad.abs().sum() > 0, name


def test_a_deep_copy_has_its_own_prefix():
    model = prefixed(tiny_llama, reparam=False)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        before = model(ids)
        pt.prefix_encoder(twin).prompt_embeddings.add_(1.0)
        assert torch.equal(model(ids), before)  # the original's hooks still read the original's prefix
        assert (twin(ids) - before).abs().max() > 1e-2  # and the copy's hooks read the copy's


def test_prefix_follows_the_model_dtype():
    model = pt.apply(tiny_llama().to(torch.bfloat16), n_tokens=2, reparam=False)
    assert pt.prefix_encoder(model).prompt_embeddings.dtype == torch.bfloat16
    assert model(torch.randint(0, 64, (1, 4))).dtype == torch.bfloat16


# ---- padding and the KV cache ------------------------------------------------------------------


def prefixed(make, reparam=True, seed=1):
    model = make()
    torch.manual_seed(seed)
    return pt.apply(model, n_tokens=4, reparam=reparam, hidden=16)


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_tokens(make, side):
    """A padded row's real tokens get exactly what the row alone gets (pads never seen, prefix always)."""
    model = prefixed(make)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 64, (n,), generator=g) for n in (7, 4)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        cols = slice(7 - len(row), 7) if side == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = row, 1
    # Bert numbers positions per column: a left-padded row needs positions counted over its real tokens
    kw = {"position_ids": position_ids_from_mask(mask)} if make is tiny_bert and side == "left" else {}
    with torch.no_grad():
        batch = model(ids, mask, **kw)
        for i, row in enumerate(rows):
            alone = model(row[None], torch.ones(1, len(row), dtype=torch.long))[0]
            torch.testing.assert_close(batch[i][mask[i].bool()], alone, rtol=0, atol=1e-5)
        assert (batch - make()(ids, mask, **kw)).abs().max() > 1e-2  # the prefix does something


def greedy_without_cache(model, ids, mask, steps):
    """Reference decoding: recompute everything for every new token, no KV cache."""
    for _ in range(steps):
        with torch.no_grad():
            token = model(ids, mask)[:, -1].argmax(-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("reparam", [False, True])
def test_generate_with_cache_equals_full_recomputation(reparam):
    model = prefixed(tiny_llama, reparam)
    with torch.no_grad():  # a bigger prefix, so that it decides tokens
        for p in pt.prefix_encoder(model).parameters():
            p.mul_(3)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0  # left padding, as for generation
    ids = ids.masked_fill(mask == 0, 0)
    out = model.generate(ids, 12, attention_mask=mask, eos_token_id=[])
    assert torch.equal(out, greedy_without_cache(model, ids, mask, 12))
    assert not torch.equal(out, tiny_llama().generate(ids, 12, attention_mask=mask, eos_token_id=[]))
    _, cache = model(ids, mask, use_cache=True)
    assert cache[0][0].shape[2] == ids.shape[1]  # the prefix is not in the cache


# ---- dropping the MLP ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_drop_reparam_keeps_outputs_and_leaves_only_the_prefix(make):
    model = prefixed(make, reparam=True)
    ids = torch.randint(1, 64, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = model(ids, mask)
        table = pt.prefix_encoder(model)()
    pt.drop_reparam(model)
    encoder = pt.prefix_encoder(model)
    assert [n for n, _ in encoder.named_parameters()] == ["prompt_embeddings"]
    torch.testing.assert_close(encoder.prompt_embeddings, table, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), before, rtol=0, atol=1e-5)
    L = model.config.num_hidden_layers
    assert params.count_parameters(model)[0] == 4 * L * 2 * kv_dim(model)
    assert pt.get_config(model) == pt.PrefixConfig(n_tokens=4, reparam=False, hidden=16)
    pt.drop_reparam(model)  # a no-op now
    assert torch.equal(pt.prefix_encoder(model).prompt_embeddings, table)


def test_layer_block_equals_full_table():
    """Outside a model forward, a layer's block is its columns of P_theta."""
    encoder = pt.PrefixEncoder(5, 3, 16, reparam=True, hidden=12)
    full = encoder().detach()
    for i in range(3):
        torch.testing.assert_close(encoder.layer(i), full[:, 32 * i:32 * (i + 1)], rtol=0, atol=0)


@pytest.mark.parametrize("reparam", [True, False], ids=["mlp", "plain"])
def test_prefix_computed_once_per_forward(reparam):
    """The model's forward computes P_theta once for all layers (`start_forward`) and drops it after;
    gradients equal those of computing every layer's prefix on its own."""
    model = pt.apply(tiny_llama(), n_tokens=3, reparam=reparam, hidden=8)
    encoder = pt.prefix_encoder(model)
    calls = []
    handle = encoder.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 64, (2, 5))
    model(ids).square().mean().backward()
    handle.remove()
    assert len(calls) == 1 and encoder._layers is None
    once = [p.grad.clone() for p in encoder.parameters()]

    model.zero_grad()  # the same loss with each layer computing its own prefix (no start_forward)
    encoder.start_forward = lambda: None
    model(ids).square().mean().backward()
    for a, p in zip(once, encoder.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


# ---- files --------------------------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["mlp", "plain"])
def saved(request, tmp_path):
    torch.manual_seed(0)
    model = pt.apply(BertClassifier(tiny_bert(), num_classes=3).eval(), n_tokens=3, reparam=request.param,
                     hidden=8, train=("classifier",))
    path = tmp_path / "prefix.safetensors"
    pt.save(model, path)
    return model, path


def fresh_classifier():
    torch.manual_seed(5)  # another head and another prefix than the saved ones
    return BertClassifier(tiny_bert(), num_classes=3).eval()


def test_save_after_drop_reparam_round_trip(tmp_path):
    model = prefixed(tiny_llama, reparam=True)
    pt.drop_reparam(model)
    pt.save(model, tmp_path / "p.safetensors")
    assert set(load_file(tmp_path / "p.safetensors")) == {"peft.prefix_tuning.prompt_embeddings"}
    fresh = pt.load(tiny_llama(), tmp_path / "p.safetensors")
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_load_refuses_config_mismatch(saved):
    model, path = saved
    cfg = pt.get_config(model)
    with pytest.raises(ValueError, match=f"n_tokens: model 5, file {cfg.n_tokens}"):
        pt.load(pt.apply(fresh_classifier(), 5, cfg.reparam, cfg.hidden, train=cfg.train), path)
    with pytest.raises(ValueError, match=f"reparam: model {not cfg.reparam}, file {cfg.reparam}"):
        pt.load(pt.apply(fresh_classifier(), cfg.n_tokens, not cfg.reparam, cfg.hidden, train=cfg.train), path)
    if cfg.reparam:
        with pytest.raises(ValueError, match="hidden: model 9, file 8"):
            pt.load(pt.apply(fresh_classifier(), cfg.n_tokens, True, 9, train=cfg.train), path)


# ---- bad input ----------------------------------------------------------------------------------


def test_models_without_our_attention_are_refused():
    with pytest.raises(ValueError, match="needs exactly one pefttutor Llama or Bert"):
        pt.apply(nn.Sequential(nn.Linear(4, 4)), 2)
    with pytest.raises(ValueError, match="no prefix"):
        pt.drop_reparam(tiny_llama())


# ---- the peer test: HF peft's PrefixTuning on transformers' models ----------------------------


@pytest.fixture(scope="module")
def tiny_hf():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(HFLlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).eval()  # GQA: 4 query heads share 2 kv heads
    bert = BertModel(HFBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=32)).eval()
    return {"tiny_llama": llama, "tiny_bert": bert}


@pytest.fixture(scope="module")
def real_hf(smollm2_hf, minilm_hf):  # session fixtures of tests/conftest.py
    return {"smollm2": smollm2_hf, "minilm": minilm_hf}


def peft_twin(ours, hf, n_tokens, reparam, hidden):
    """HF peft's PrefixTuning wrapped around `hf` (changed in place), holding exactly our prefix encoder's weights."""
    task = "CAUSAL_LM" if isinstance(hf, LlamaForCausalLM) else "FEATURE_EXTRACTION"
    adapted = peft.get_peft_model(hf, peft.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=n_tokens, prefix_projection=reparam, encoder_hidden_size=hidden)).eval()
    theirs = adapted.prompt_encoder["default"].to(next(ours.parameters()).dtype)  # peft builds it in float32
    state = pt.prefix_encoder(ours).state_dict()
    if not reparam:  # peft keeps the plain prefix as an Embedding's weight
        state = {"embedding.weight": state["prompt_embeddings"]}
    theirs.load_state_dict(state, strict=True)  # same names, same shapes: same layout
    return adapted


def padded_batch(vocab, side, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, min(vocab, 1000), (3, 10), generator=g)
    mask = torch.ones_like(ids)
    if side == "right":
        mask[1, 7:] = mask[2, 4:] = 0
    else:
        mask[1, :3] = mask[2, :6] = 0
    return ids, mask


def peer_outputs(name, hf_models, reparam, side, dtype):
    """(ours, peft's, the base model's) outputs on the real tokens of a padded batch, same prefix."""
    hf = copy.deepcopy(hf_models[name]).to(dtype)
    is_llama = isinstance(hf, LlamaForCausalLM)
    ours = (Llama if is_llama else Bert).from_hf(hf).eval()
    n_tokens, hidden = (5, 24) if name.startswith("tiny") else (10, 512)
    torch.manual_seed(1)
    pt.apply(ours, n_tokens, reparam=reparam, hidden=hidden)
    ids, mask = padded_batch(hf.config.vocab_size, side)
    real = mask.bool()
    with torch.no_grad():
        if is_llama:
            # peft adds n_tokens to position_ids it is given; without them transformers counts 0.. per column,
            # which equals our mask-based positions for right padding only
            kw = {"position_ids": position_ids_from_mask(mask)} if side == "left" else {}
            base = hf(input_ids=ids, attention_mask=mask, **kw).logits[real]
            adapted = peft_twin(ours, hf, n_tokens, reparam, hidden)
            return ours(ids, mask)[real], adapted(input_ids=ids, attention_mask=mask, **kw).logits[real], base, ours, adapted
        # transformers' Bert numbers positions after the prefix (P, P+1, ...), as for a cache;
        # ours starts at 0 unless told: give it peft's positions
        base = hf(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        adapted = peft_twin(ours, hf, n_tokens, reparam, hidden)
        shifted = torch.arange(n_tokens, n_tokens + ids.shape[1])[None]
        return ours(ids, mask, position_ids=shifted)[real], adapted(input_ids=ids, attention_mask=mask).last_hidden_state[real], base, ours, adapted


# float32 throughout, except the MLP cases on the real models (float64): there peft's batched MLP and
# ours round differently in float32 (see test_float32_mlp_rounding_on_smollm2), and 30 layers amplify it
PEER_CASES = [(m, r, side, torch.float64 if r and not m.startswith("tiny") else torch.float32)
              for m in ("tiny_llama", "tiny_bert", "smollm2", "minilm") for r in (False, True)
              for side in (("right", "left") if m in ("tiny_llama", "smollm2") else ("right",))]


@pytest.mark.parametrize("name, reparam, side, dtype", [
    pytest.param(*case, marks=() if case[0].startswith("tiny") else pytest.mark.real_models) for case in PEER_CASES])
def test_same_outputs_as_peft_prefix_tuning(request, name, reparam, side, dtype):
    models = request.getfixturevalue("tiny_hf" if name.startswith("tiny") else "real_hf")
    a, b, base, *_ = peer_outputs(name, models, reparam, side, dtype)
    diff, effect = (a - b).abs().max().item(), (b - base).abs().max().item()
    print(f"\n{name} reparam={reparam} {side} padding {dtype}: max |ours - peft| = {diff:.2e}, prefix effect {effect:.2e}")
    assert effect > 1e-2, "the prefix changes nothing: the comparison would prove nothing"
    assert diff <= TOL


@pytest.mark.real_models
def test_float32_mlp_rounding_on_smollm2(real_hf):
    """In float32 the MLP's prefix differs from peft's by rounding only; 30 layers amplify it on the logits."""
    a, b, _, ours, adapted = peer_outputs("smollm2", real_hf, True, "right", torch.float32)
    with torch.no_grad():
        table = pt.prefix_encoder(ours)()
        tokens = adapted.prompt_tokens["default"].expand(3, -1)  # peft runs its MLP on a batch (B, P) of token ids
        theirs = adapted.prompt_encoder["default"](tokens)  # (B, P, L * 2 * kv_dim): a batched matmul, other rounding
    table_diff, diff = (table - theirs).abs().max().item(), (a - b).abs().max().item()
    print(f"\nsmollm2 float32 MLP: prefix max diff {table_diff:.1e} (prefix up to {table.abs().max():.2f}), "
          f"logits max diff {diff:.1e} (logits up to {b.abs().max():.1f})")
    assert table_diff <= 1e-6
    assert diff <= 1e-3


def test_peft_counts_the_same_trainable_parameters(tiny_hf):
    for reparam in (False, True):
        hf = copy.deepcopy(tiny_hf["tiny_llama"])
        ours = pt.apply(Llama.from_hf(hf), 5, reparam=reparam, hidden=24)
        adapted = peft_twin(ours, hf, 5, reparam, 24)
        assert adapted.get_nb_trainable_parameters()[0] == params.count_parameters(ours)[0]
