"""LLaMA-Adapter: exact zero-init, counts, padding and the KV cache, files, bad input, and HF peft's
`adaption_prompt` on the same weights (tiny GQA Llama and SmolLM2). Also notebook 04's inline cell
and the exercises."""

import copy
import math
from dataclasses import replace

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from notebook_cells import run_cell
from pefttutor import calculator, params
from pefttutor.exercises import llama_adapter as exercises
from pefttutor.methods import llama_adapter
from pefttutor.models import Bert, BertConfig, Llama, LlamaConfig
import tiny_models

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft vs transformers 5

TOL = 1e-4
TINY = replace(tiny_models.LLAMA, num_hidden_layers=4)
NOTEBOOK = "04_adapters.ipynb"
MARK = "def gated_adaption_attention("


def tiny(seed=0, **kw):
    return tiny_models.tiny_llama(seed, **{"num_hidden_layers": TINY.num_hidden_layers, **kw})


def open_gates(model, seed=1, std=0.5):
    """Seeded nonzero gates: with g = 0 the adapter is invisible and every comparison would pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in llama_adapter.adapters(model).values():
            a.adaption_gate.copy_(std * torch.randn(a.adaption_gate.shape, generator=g))
    return model


def ids_and_mask(B=2, T=9, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g), torch.ones(B, T, dtype=torch.long)


# ---- the method ---------------------------------------------------------------------------------


def test_zero_gate_equals_the_base_model_exactly():
    model = tiny()
    ids, _ = ids_and_mask()
    with torch.no_grad():
        base = model(ids)
    llama_adapter.apply(model, n_tokens=5)
    assert all(not a.adaption_gate.any() and a.adaption_prompt.abs().sum() > 0
               for a in llama_adapter.adapters(model).values())  # random prompts, zero gates
    with torch.no_grad():
        assert torch.equal(model(ids), base)
        assert not torch.equal(open_gates(model)(ids), base)  # and an open gate does change it


@pytest.mark.real_models
def test_zero_gate_equals_smollm2_exactly(smollm2):
    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    ids = torch.tensor([tok("The restaurant by the river serves")["input_ids"]])
    with torch.no_grad():
        base = model(ids)
        assert torch.equal(llama_adapter.apply(model)(ids), base)


@pytest.mark.parametrize("n_tokens, n_layers", [(10, None), (3, 1), (1, 4), (7, 2)])
def test_trainable_count_is_the_formula(n_tokens, n_layers):
    model = llama_adapter.apply(tiny(), n_tokens=n_tokens, n_layers=n_layers)
    K = TINY.num_hidden_layers if n_layers is None else n_layers
    expected = K * n_tokens * TINY.hidden_size + K * TINY.num_attention_heads  # prompts + gates
    assert params.count_parameters(model)[0] == expected
    assert expected == exercises.llama_adapter_params(K, n_tokens, TINY.hidden_size, TINY.num_attention_heads)
    shapes = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
    assert shapes == {(TINY.num_attention_heads,), (n_tokens, TINY.hidden_size)}


def test_paper_count_on_llama_7b_shapes():
    """The paper's 1.2M: LLaMA-7B's shapes on the meta device (no memory), top 30 of 32 layers."""
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=128, tie_word_embeddings=False)
    with torch.device("meta"):
        model = llama_adapter.apply(Llama(cfg), n_tokens=10, n_layers=30)
    assert params.count_parameters(model)[0] == 30 * 10 * 4096 + 30 * 32 == 1_229_760
    assert calculator.peft_params("llama-7b", "llama_adapter", n_tokens=10, n_layers=30) == 1_229_760
    assert calculator.peft_params("smollm2-135m", "llama_adapter") == 30 * (10 * 576 + 9)


def test_only_the_top_layers_get_prompts_and_gradients():
    model = llama_adapter.apply(tiny(), n_tokens=3, n_layers=2)
    assert sorted(llama_adapter.adapters(model)) == [f"model.layers.{i}.self_attn.peft.llama_adapter" for i in (2, 3)]
    assert all(not model.model.layers[i].self_attn.peft for i in (0, 1))
    assert llama_adapter.get_config(model) == llama_adapter.LlamaAdapterConfig(n_tokens=3, n_layers=2)
    open_gates(model)
    model(ids_and_mask()[0]).square().mean().backward()
    for name, p in model.named_parameters():
        is_adapter = ".adaption_" in name
        assert p.requires_grad == is_adapter and (p.grad is not None) == is_adapter, name
        if is_adapter:
            assert p.grad.abs().sum() > 0, name
    assert tuple(llama_adapter.gates(model).shape) == (2, TINY.num_attention_heads)


def test_at_zero_init_only_the_gates_get_gradient():
    model = llama_adapter.apply(tiny(), n_tokens=3)
    model(ids_and_mask()[0]).square().mean().backward()
    for a in llama_adapter.adapters(model).values():
        assert a.adaption_gate.grad.abs().min() > 0  # every head's gate moves on the first step
        assert not a.adaption_prompt.grad.any()  # the prompts only once the gates are open


def reference_adapter_output(q, attn, prompt, gate):
    """The adapter's output computed head by head with explicit loops (grouped-query by index)."""
    B, H, T, hd = q.shape
    group = H // attn.n_kv
    K = attn.k_proj(prompt).view(-1, attn.n_kv, hd)  # (L, Hkv, hd)
    V = attn.v_proj(prompt).view(-1, attn.n_kv, hd)
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kv = h // group  # query head h reads key/value head h // group
            for t in range(T):
                w = torch.softmax(torch.stack([q[b, h, t] @ K[j, kv] for j in range(K.shape[0])]) / math.sqrt(hd), 0)
                out[b, h, t] = gate[h] * sum(w[j] * V[j, kv] for j in range(K.shape[0]))
    return out


@pytest.mark.parametrize("n_heads, n_kv", [(4, 2), (4, 1), (4, 4)])
def test_adapter_output_is_the_formula(n_heads, n_kv):
    model = open_gates(llama_adapter.apply(tiny(num_attention_heads=n_heads, num_key_value_heads=n_kv), n_tokens=3))
    attn = model.model.layers[-1].self_attn
    a = attn.peft["llama_adapter"]
    q = torch.randn(2, n_heads, 5, TINY.head_dim)
    with torch.no_grad():
        torch.testing.assert_close(a.attention_delta(q, attn), reference_adapter_output(q, attn, a.adaption_prompt, a.adaption_gate),
                                   atol=1e-5, rtol=0)


def test_left_padded_row_equals_the_row_alone():
    model = open_gates(llama_adapter.apply(tiny(), n_tokens=4))
    short, _ = ids_and_mask(1, 5, seed=1)
    long, _ = ids_and_mask(1, 8, seed=2)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])  # row 0 left-padded
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        both = model(ids, mask)
        torch.testing.assert_close(both[0, 3:], model(short)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[1], model(long)[0], atol=1e-5, rtol=0)


def test_kv_cache_equals_full_recomputation():
    model = open_gates(llama_adapter.apply(tiny(), n_tokens=4))
    ids = torch.tensor([[0, 0, 5, 9, 12], [7, 3, 8, 1, 30]])  # row 0 left-padded
    mask = (torch.arange(5) >= 2).long()[None].expand(2, -1).clone()
    mask[1] = 1
    with torch.no_grad():
        out = model.generate(ids, 6, attention_mask=mask, eos_token_id=[])  # KV cache
        seqs = ids  # the same greedy decoding, every step recomputed from scratch
        for _ in range(6):
            full_mask = torch.cat([mask, torch.ones(2, seqs.shape[1] - 5, dtype=torch.long)], 1)
            seqs = torch.cat([seqs, model(seqs, full_mask)[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, seqs)
        logits, cache = model(out[:, :7], torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1), use_cache=True)
        step = model(out[:, 7:8], torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1), past_key_values=cache)
        full = model(out[:, :8], torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1))
        torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=0)


def test_train_modules_and_random_or_constant_gates():
    model = llama_adapter.apply(tiny(), n_tokens=2, n_layers=1, train=("lm_head",))
    assert params.count_parameters(model)[0] == 2 * 32 + 4 + 64 * 32
    assert "lm_head.weight" in llama_adapter.adapter_state_dict(model)
    g = llama_adapter.gates(llama_adapter.apply(tiny(), init_gate=0.25))
    assert torch.equal(g, torch.full((4, 4), 0.25))
    models = {}
    for init in ("zero", "random"):
        model = tiny()
        torch.manual_seed(0)
        models[init] = llama_adapter.apply(model, init_gate=init)
    g = llama_adapter.gates(models["random"])
    assert g.std() > 0.3 and len(set(g.flatten().tolist())) == g.numel()
    prompts = {init: [a.adaption_prompt for a in llama_adapter.adapters(m).values()] for init, m in models.items()}
    assert all(torch.equal(a, b) for a, b in zip(prompts["zero"], prompts["random"]))  # same seed, same prompts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    model = tiny().to(dtype)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        base = model(ids)
        llama_adapter.apply(model)
        assert all(p.dtype == dtype for p in model.parameters())
        assert torch.equal(model(ids), base)
        assert open_gates(model)(ids).dtype == dtype


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    (dict(n_layers=5), "n_layers must be an integer from 1 to the model's 4 layers, got 5"),
    (dict(n_layers=0), "got 0"),
    (dict(n_layers=2.0), "got 2.0"),
    (dict(n_tokens=0), "n_tokens (the prompt length) must be a positive integer, got 0"),
    (dict(n_tokens=-3), "got -3"),
    (dict(init_gate="ones"), "init_gate must be one of ('zero', 'random') or a number, got 'ones'"),
    (dict(train=("lm_haed",)), "lm_haed"),
])
def test_bad_arguments_are_refused_before_any_change(kw, message):
    model = tiny()
    with pytest.raises(ValueError) as err:
        llama_adapter.apply(model, **kw)
    assert message in str(err.value)
    assert all(p.requires_grad for p in model.parameters()) and not llama_adapter.adapters(model)


def test_unknown_train_module_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        llama_adapter.apply(tiny(), train=("lm_haed",))
    assert "lm_head" in str(err.value) and "o_proj" in str(err.value)


def test_non_llama_models_are_refused():
    torch.manual_seed(0)
    bert = Bert(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=32))
    hf = LlamaForCausalLM(HFLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    for model, name in ((bert, "Bert"), (hf, "LlamaForCausalLM"), (nn.Linear(4, 4), "Linear")):
        with pytest.raises(ValueError, match=f"needs a pefttutor Llama.*got {name}"):
            llama_adapter.apply(model)


def test_gates_need_the_adapter():
    with pytest.raises(ValueError, match="no LLaMA-Adapter"):
        llama_adapter.gates(tiny())


# ---- files --------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = open_gates(llama_adapter.apply(tiny(), n_tokens=3, n_layers=2, train=("lm_head",)))
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    path = tmp_path / "llama_adapter.safetensors"
    llama_adapter.save(model, path)
    return model, path


@pytest.mark.parametrize("kw, message", [
    (dict(n_tokens=4, n_layers=2), "n_tokens: model 4, file 3"),
    (dict(n_tokens=3, n_layers=3), "n_layers: model 3, file 2"),
])
def test_load_refuses_a_config_mismatch(saved, kw, message):
    _, path = saved
    model = llama_adapter.apply(tiny(), train=("lm_head",), **kw)
    with pytest.raises(ValueError, match="config mismatch") as err:
        llama_adapter.load(model, path)
    assert message in str(err.value)


# ---- the peer: HF peft's adaption_prompt on transformers' LlamaForCausalLM ----------------------


def with_peft(hf, n_tokens, n_layers, seed=1):
    """(ours, peft model) on hf's weights, with our random prompts copied across and seeded nonzero
    gates: peft's one scalar gate per layer goes into all of our per-head gates."""
    ours = llama_adapter.apply(Llama.from_hf(hf).eval(), n_tokens=n_tokens, n_layers=n_layers)
    adapted = peft.get_peft_model(copy.deepcopy(hf), peft.AdaptionPromptConfig(
        adapter_len=n_tokens, adapter_layers=n_layers, task_type="CAUSAL_LM")).eval()
    theirs = [m for m in adapted.modules() if hasattr(m, "adaption_gate")]  # peft's AdaptedAttention, bottom first
    mine = list(llama_adapter.adapters(ours).values())
    assert len(theirs) == len(mine) == n_layers
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in zip(mine, theirs):
            a.adaption_gate.fill_(0.5 * torch.randn(1, generator=g).item() + 0.5)
            b.adaption_gate.copy_(a.adaption_gate[:1])  # (1,)
            b.adaption_prompt.copy_(a.adaption_prompt[None])  # (1, L, d)
    return ours, adapted


def compare_with_peft(ours, adapted, hf, ids, mask, label):
    real = mask.bool()
    with torch.no_grad():
        a = ours(ids, mask)[real]
        b = adapted(input_ids=ids, attention_mask=mask).logits[real]
        base = hf(input_ids=ids, attention_mask=mask).logits[real]
    diff, effect = (a - b).abs().max().item(), (a - base).abs().max().item()
    print(f"\n{label}: max |ours - peft| = {diff:.2e} (logits up to {a.abs().max():.1f}), adapter effect {effect:.2e}")
    assert effect > 1e-2, "the adapter changes nothing: the comparison would prove nothing"
    assert diff <= TOL


@pytest.fixture(scope="module")
def tiny_hf():
    torch.manual_seed(0)
    return LlamaForCausalLM(HFLlamaConfig(  # GQA: 4 query heads share 2 key/value heads
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("n_tokens, n_layers", [(5, 4), (3, 2), (1, 1)])
def test_equals_peft_adaption_prompt_on_a_tiny_gqa_llama(tiny_hf, n_tokens, n_layers):
    ours, adapted = with_peft(tiny_hf, n_tokens, n_layers)
    ids, mask = ids_and_mask(2, 12)
    mask[1, 8:] = 0  # a right-padded row (HF numbers a left-padded row's positions differently)
    compare_with_peft(ours, adapted, tiny_hf, ids, mask, f"tiny GQA Llama, L={n_tokens}, top {n_layers} layers")


def test_generate_equals_peft_generate(tiny_hf):
    """Greedy decoding through both KV caches (theirs: transformers' DynamicCache) gives the same tokens."""
    ours, adapted = with_peft(tiny_hf, 4, 3)
    ids, mask = ids_and_mask(2, 6, seed=3)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding, as generation wants
    with torch.no_grad():
        mine = ours.generate(ids, 8, attention_mask=mask, eos_token_id=[])
        theirs = adapted.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                  do_sample=False, pad_token_id=0)
    assert torch.equal(mine, theirs)


@pytest.mark.real_models
def test_equals_peft_adaption_prompt_on_smollm2(smollm2_hf, smollm2):
    """In float64. Both implementations compute the same thing but not in the same order (peft applies
    o_proj to the adapter output separately; its matmuls see other memory layouts), so in float32 they
    differ by an ulp or two per layer, and SmolLM2 amplifies that: hidden states reach ~800, and a
    random-init adapter moves the logits by ~40. Measured in float32 (the base models agree bitwise):
    5e-3 to 2e-2 at these gates, still ~7e-5 with gates 1000x smaller. float64 removes the amplified
    rounding (both keep the adapter's softmax in float32, as the paper's code does)."""
    tok = smollm2[1]
    hf = copy.deepcopy(smollm2_hf).double()
    ours, adapted = with_peft(hf, 10, 30)
    enc = tok(["name[The Eagle], eatType[pub], area[riverside]", "Describe the restaurant."])["input_ids"]
    width = max(map(len, enc))
    ids = torch.tensor([e + [tok.eos_token_id] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    compare_with_peft(ours, adapted, hf, ids, mask, "SmolLM2-135M (float64), L=10, all 30 layers")


# ---- notebook 04's inline cell and the exercises -------------------------------------------------


@pytest.fixture(scope="module")
def notebook_function():
    return run_cell(NOTEBOOK, MARK, max_lines=20)["gated_adaption_attention"]


@pytest.mark.parametrize("n_heads, n_kv", [(4, 2), (4, 4), (9, 3)])
def test_notebook_cell_equals_the_package(notebook_function, n_heads, n_kv):
    model = open_gates(llama_adapter.apply(tiny(num_attention_heads=n_heads, num_key_value_heads=n_kv), n_tokens=3))
    attn = model.model.layers[-1].self_attn
    q = torch.randn(2, n_heads, 5, TINY.head_dim)
    with torch.no_grad():
        got = notebook_function(q, attn.peft["llama_adapter"].adaption_prompt, attn.peft["llama_adapter"].adaption_gate, attn.k_proj, attn.v_proj,
                                attn.n_kv)
        torch.testing.assert_close(got, attn.peft["llama_adapter"].attention_delta(q, attn), rtol=0, atol=1e-6)
        assert got.abs().max() > 1e-3


def test_exercise_counts_right_and_wrong():
    ex = exercises.llama7b_params()
    assert ex.check(30 * (10 * 4096 + 32)) is True
    assert ex.check(30 * 10 * 4096) is False  # forgot the gates
    assert ex.check(32 * (10 * 4096 + 32)) is False  # all 32 layers
    assert ex.check(...) is None
    ex = exercises.smollm2_params(LlamaConfig(), n_tokens=10)
    assert ex.check(30 * (10 * 576 + 9)) is True
    assert ex.check(30 * (10 * 576 + 3)) is False  # one gate per key/value head: no, per query head
    small = LlamaConfig(vocab_size=16, num_hidden_layers=3)  # SmolLM2's widths, 3 layers: apply counts the same
    model = llama_adapter.apply(Llama(small), n_tokens=4, n_layers=2)
    assert exercises.smollm2_params(small, n_tokens=4, n_layers=2).check(params.count_parameters(model)[0]) is True


def test_exercise_first_step_right_and_wrong():
    ex = exercises.first_step()
    assert ex.check("gates") is True
    for wrong in ("prompts", "both", "neither", "the gates"):
        assert ex.check(wrong) is False
    assert ex.check(None) is None


def test_exercise_checkers_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    exercises.first_step().check("both")
    assert torch.equal(torch.rand(3), expected)
