"""Prompt tuning: the soft prompt hook, init, masks, caching, save/load, and HF peft's PromptTuning as peer."""

import copy

import peft
import pytest
import torch
import transformers
from torch import nn

from pefttutor import params, train
from pefttutor.methods import applied
from pefttutor.methods import prompt_tuning as pt
from pefttutor.models import Bert, BertClassifier, Llama
from pefttutor.models.bert import BertConfig
from pefttutor.models.llama import LlamaConfig

# peft warns about ignored position ids and calls deprecated transformers methods
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TOL = 1e-4
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
TINY_BERT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**TINY_LLAMA)).eval()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return Bert(BertConfig(**TINY_BERT)).eval()


def tiny_hf(kind, seed=0):
    """A transformers model with non-trivial weights (initializer 0.1) and ours with the same weights."""
    torch.manual_seed(seed)
    if kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, initializer_range=0.1)).eval()
        return Llama.from_hf(hf).eval(), hf
    hf = transformers.BertModel(transformers.BertConfig(**TINY_BERT, initializer_range=0.1)).eval()
    return Bert.from_hf(hf).eval(), hf


def batch(pad, B=2, T=9, seed=0):
    """Token ids (B, T) and a mask; with pad "left"/"right", row 1 has 3 pads on that side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad == "left":
        mask[1, :3] = 0
    elif pad == "right":
        mask[1, -3:] = 0
    return ids.masked_fill(mask == 0, 0), mask


class WordTokenizer:
    """A stand-in tokenizer: each word is a token id (its length here), and a special id 1 in front."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] * add_special_tokens + [len(w) + 10 for w in text.split()]}


# ---------------------------------------------------------------- apply: parameters, freezing, init


@pytest.mark.parametrize("make, n, train_, extra", [
    (tiny_llama, 7, (), 0),
    (tiny_bert, 5, (), 0),
    (lambda: BertClassifier(tiny_bert(), 3), 20, ("classifier",), 64 * 3 + 3),
])
def test_trainable_parameters_are_n_times_d(make, n, train_, extra):
    model = make()
    total_before = params.count_parameters(model)[1]
    pt.apply(model, n, train=train_)
    trainable, total = params.count_parameters(model)
    assert trainable == n * 64 + extra  # P x d, plus the head
    assert total == total_before + n * 64
    names = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert names[0].endswith("peft.prompt_tuning.prompt_embeddings")
    assert all(name.startswith("classifier.") for name in names[1:])
    assert pt.get_config(model) == pt.PromptTuningConfig(n, "random", None, train=train_)


def test_shapes_right_after_apply_and_base_frozen():
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pt.apply(model, 4)
    prompt = pt.soft_prompt(model)
    assert prompt.prompt_embeddings.shape == (4, 64) and prompt.prompt_embeddings.requires_grad
    assert prompt.input_prefix(3).shape == (3, 4, 64)
    assert all(not p.requires_grad for name, p in model.named_parameters() if "prompt_tuning" not in name)
    ids, mask = batch("left")
    assert model(ids, mask).shape == (2, 9, 128)  # logits for the real tokens only
    logits, cache = model(ids, mask, use_cache=True)
    assert cache[0][0].shape == (2, 2, 4 + 9, 16)  # the cache holds the virtual tokens too
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)


def test_random_init_has_the_vocabulary_scale():
    model = tiny_llama()
    E = model.get_input_embeddings().weight
    P_e = pt.soft_prompt(pt.apply(model, 400)).prompt_embeddings
    assert abs(P_e.std() / E.std() - 1) < 0.05 and abs(P_e.mean()) < 0.01
    assert not any(torch.equal(row, e) for row in P_e[:5] for e in E)  # not vocabulary rows


def test_vocab_init_samples_vocabulary_rows():
    model = tiny_llama()
    E = model.get_input_embeddings().weight
    P_e = pt.soft_prompt(pt.apply(model, 6, init="vocab")).prompt_embeddings
    ids, cos = pt.nearest_tokens(model, k=2)
    assert ids.shape == cos.shape == (6, 2)
    torch.testing.assert_close(P_e, E[ids[:, 0]], rtol=0, atol=0)  # each vector is a row of E ...
    assert torch.allclose(cos[:, 0], torch.ones(6))  # ... at cosine 1 from it


@pytest.mark.parametrize("n, expected", [(3, [1, 13, 14]), (8, [1, 13, 14, 15, 1, 13, 14, 15])])
def test_text_init_repeats_or_cuts_the_text_tokens(n, expected):
    tok = WordTokenizer()
    assert pt.text_token_ids(tok, "abc abcd abcde", n) == expected
    model = pt.apply(tiny_bert(), n, init="text", init_text="abc abcd abcde", tokenizer=tok)
    E = model.get_input_embeddings().weight
    assert torch.equal(pt.soft_prompt(model).prompt_embeddings, E[expected])
    assert pt.get_config(model).init_text == "abc abcd abcde"


# ---------------------------------------------------------------- the forward pass is [P_e ; X_e]


def test_llama_output_is_the_model_on_prompt_then_tokens():
    model = pt.apply(tiny_llama(), 5, init="vocab")
    ids, mask = batch("right")
    P_e = pt.soft_prompt(model).prompt_embeddings
    x = torch.cat([P_e.expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)  # (B, P + T, d)
    full_mask = torch.cat([torch.ones(2, 5, dtype=torch.long), mask], dim=1)
    hook = model.peft.pop("prompt_tuning")  # the plain model, fed [P_e ; X_e] by hand
    expected = model(inputs_embeds=x, attention_mask=full_mask)[:, 5:]
    model.peft["prompt_tuning"] = hook
    torch.testing.assert_close(model(ids, mask), expected, rtol=0, atol=1e-6)
    assert (model(ids, mask) - Llama.forward(model, ids, mask)).abs().max() == 0  # forward reads the hook


def test_bert_virtual_tokens_take_the_first_positions():
    model = pt.apply(tiny_bert(), 5)
    ids, mask = batch("right")
    P_e = pt.soft_prompt(model).prompt_embeddings
    x = torch.cat([P_e.expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)  # before positions
    full_mask = torch.cat([torch.ones(2, 5, dtype=torch.long), mask], dim=1)
    hook = model.peft.pop("prompt_tuning")
    expected = model(inputs_embeds=x, attention_mask=full_mask)[:, 5:]
    model.peft["prompt_tuning"] = hook
    torch.testing.assert_close(model(ids, mask), expected, rtol=0, atol=1e-6)
    # explicit default positions and token types give the same (they are shifted / extended by P)
    kw = dict(position_ids=torch.arange(9)[None], token_type_ids=torch.zeros_like(ids))
    torch.testing.assert_close(model(ids, mask, **kw), expected, rtol=0, atol=1e-6)


def test_an_untrained_prompt_changes_the_output():
    model = tiny_llama()
    ids, _ = batch("none")
    before = model(ids)
    pt.apply(model, 3, init="vocab")
    assert (model(ids) - before).abs().max() > 1e-3  # the virtual tokens are really attended to


# ---------------------------------------------------------------- masks, padding, caching


def test_left_padded_row_equals_the_sequence_alone():
    model = pt.apply(tiny_llama(), 4, init="vocab")
    ids, mask = batch("left")
    alone = model(ids[1:, 3:])  # row 1 without its 3 pads, no mask
    torch.testing.assert_close(model(ids, mask)[1, 3:], alone[0], rtol=0, atol=1e-5)


def test_right_padded_bert_row_equals_the_sequence_alone():
    model = pt.apply(BertClassifier(tiny_bert(), 3).eval(), 4, init="vocab", train="classifier")
    ids, mask = batch("right")
    torch.testing.assert_close(model(ids, mask)[1], model(ids[1:, :6])[0], rtol=0, atol=1e-5)
    hidden = model.bert(ids, mask)
    torch.testing.assert_close(hidden[1, :6], model.bert(ids[1:, :6])[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pad", ["none", "left"])
def test_cached_decoding_equals_full_recompute(pad):
    model = pt.apply(tiny_llama(), 4, init="vocab")
    ids, mask = batch(pad)
    out = model.generate(ids, 8, attention_mask=mask, eos_token_id=[])
    seqs, full_mask = ids, mask  # greedy decoding that recomputes everything at every step
    for _ in range(8):
        token = model(seqs, full_mask)[:, -1].argmax(-1, keepdim=True)
        seqs, full_mask = torch.cat([seqs, token], 1), torch.cat([full_mask, torch.ones_like(token)], 1)
    assert torch.equal(out, seqs)
    # and the cached logits themselves equal the recomputed ones
    logits, cache = model(ids, mask, use_cache=True)
    step = model(out[:, 9:10], full_mask[:, :10], past_key_values=cache)
    torch.testing.assert_close(step[:, -1], model(out[:, :10], full_mask[:, :10])[:, -1], rtol=0, atol=1e-5)


def test_mask_of_the_wrong_length_while_decoding_is_refused():
    model = pt.apply(tiny_llama(), 4)
    ids, mask = batch("none")
    _, cache = model(ids, mask, use_cache=True)
    with pytest.raises(ValueError, match="without the 4 virtual ones"):  # a mask that counts the virtual tokens
        model(ids[:, :1], torch.ones(2, 4 + 10, dtype=torch.long), past_key_values=cache)


def test_gradients_reach_only_the_prompt_and_training_moves_it():
    model = pt.apply(BertClassifier(tiny_bert(), 3, dropout=0.0), 4, init="vocab", train=("classifier",))
    ids, mask = batch("right")
    labels = torch.tensor([0, 2])
    nn.functional.cross_entropy(model(ids, mask), labels).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("prompt_tuning" in name or name.startswith("classifier.")), name
    assert pt.soft_prompt(model).prompt_embeddings.grad.abs().sum() > 0
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "prompt_tuning" not in k and "classifier" not in k}
    start = pt.soft_prompt(model).prompt_embeddings.detach().clone()
    data = [{"input_ids": ids, "attention_mask": mask, "labels": labels}]
    result = train.train(model, data, train.classification_loss, steps=30, lr=0.05, progress=False, device="cpu")
    assert result.loss_curve[-1] < result.loss_curve[0]
    assert not torch.equal(pt.soft_prompt(model).prompt_embeddings, start)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, message", [
    (dict(n_tokens=0), "positive integer"),
    (dict(n_tokens=True), "positive integer"),
    (dict(n_tokens=2.0), "positive integer"),
    (dict(n_tokens=64), "leaves no room"),  # tiny Bert has 64 positions
    (dict(n_tokens=4, init="zeros"), "unknown init .*valid: random, vocab, text"),
    (dict(n_tokens=4, init="text"), "needs init_text"),
    (dict(n_tokens=4, init="vocab", init_text="hi"), "take no init_text"),
    (dict(n_tokens=4, init="text", init_text="hi"), "needs the model's tokenizer"),
    (dict(n_tokens=4, train=("clasifier",)), "valid names: .*classifier"),
])
def test_bad_arguments_are_refused(kw, message):
    model = BertClassifier(tiny_bert(), 3)
    with pytest.raises(ValueError, match=message):
        pt.apply(model, **kw)
    assert not model.bert.peft and not applied(model)  # nothing changed
    assert all(p.requires_grad for p in model.parameters())


def test_models_without_exactly_one_of_ours_are_refused():
    with pytest.raises(ValueError, match="exactly one pefttutor Llama or Bert"):
        pt.apply(nn.Linear(3, 3), 4)
    with pytest.raises(ValueError, match="exactly one"):
        pt.apply(nn.ModuleList([tiny_bert(), tiny_bert()]), 4)
    with pytest.raises(ValueError, match="no prompt tuning"):
        pt.adapter_state_dict(tiny_llama())


# ---------------------------------------------------------------- save / load


@pytest.fixture
def saved(tmp_path):
    model = pt.apply(BertClassifier(tiny_bert(), 3), 6, init="vocab", train=("classifier",)).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(3)
    path = tmp_path / "prompt.safetensors"
    pt.save(model, path)
    return model, path


def test_load_refuses_other_lengths(saved):
    _, path = saved
    with pytest.raises(ValueError, match="n_tokens: model 5, file 6"):
        pt.load(pt.apply(BertClassifier(tiny_bert(), 3), 5, train="classifier"), path)


# ---------------------------------------------------------------- HF peft's PromptTuning as the peer


def with_peft(hf, ours, task_type):
    """Wrap `hf` in peft's PromptTuning holding the P_e of `ours`; returns the PeftModel."""
    P_e = pt.soft_prompt(ours).prompt_embeddings
    model = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=P_e.shape[0]))
    with torch.no_grad():
        model.prompt_encoder.default.embedding.weight.copy_(P_e)
    return model.eval()


def compare_llama(ours, hf, ids, mask, peft_prompt_of=None):
    """Max abs diff of the real tokens' logits: ours vs peft on the transformers model (right padding).

    peft gets the P_e of `peft_prompt_of` (default: `ours`)."""
    P = pt.get_config(ours).n_tokens
    theirs = with_peft(hf, peft_prompt_of or ours, "CAUSAL_LM")(input_ids=ids, attention_mask=mask).logits  # (B, P + T, V)
    assert theirs.shape[1] == P + ids.shape[1]
    with torch.no_grad():
        return (ours(ids, mask) - theirs[:, P:])[mask.bool()].abs().max().item()


def compare_bert(ours, hf, ids, mask):
    P = pt.get_config(ours).n_tokens
    theirs = with_peft(hf, ours, "FEATURE_EXTRACTION")(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        return (ours(ids, mask) - theirs[:, P:])[mask.bool()].abs().max().item()


def test_tiny_llama_equals_peft_prompt_tuning():
    ours, hf = tiny_hf("llama")
    pt.apply(ours, 5, init="vocab")
    diff = compare_llama(ours, hf, *batch("right"))
    print(f"tiny Llama vs peft: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_tiny_llama_left_padding_equals_transformers_with_positions_from_the_mask():
    """peft ignores position ids, so its left-padded rows count pads as positions; HF generate's
    convention (ours) counts real tokens only. Against transformers directly, with those positions:"""
    ours, hf = tiny_hf("llama")
    pt.apply(ours, 5, init="vocab")
    ids, mask = batch("left")
    P_e = pt.soft_prompt(ours).prompt_embeddings
    full = torch.cat([torch.ones(2, 5, dtype=torch.long), mask], dim=1)
    x = torch.cat([P_e.expand(2, -1, -1), hf.get_input_embeddings()(ids)], dim=1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(inputs_embeds=x, attention_mask=full, position_ids=positions).logits[:, 5:]
        diff = (ours(ids, mask) - theirs)[mask.bool()].abs().max().item()
    assert diff <= TOL


def test_tiny_llama_generate_equals_recompute_through_peft():
    """Our cached greedy decoding equals greedy decoding that runs peft's full forward at every step."""
    ours, hf = tiny_hf("llama")
    pt.apply(ours, 5, init="vocab")
    ids, _ = batch("none")
    theirs = with_peft(hf, ours, "CAUSAL_LM")
    seqs = ids
    with torch.no_grad():
        for _ in range(6):
            seqs = torch.cat([seqs, theirs(input_ids=seqs).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours.generate(ids, 6, eos_token_id=[]), seqs)


def test_tiny_bert_equals_peft_prompt_tuning():
    ours, hf = tiny_hf("bert")
    pt.apply(ours, 5, init="vocab")
    diff = compare_bert(ours, hf, *batch("right"))
    print(f"tiny Bert vs peft: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_the_peer_comparison_can_fail():
    ours, hf = tiny_hf("llama")
    pt.apply(ours, 5, init="vocab")
    other = copy.deepcopy(ours)
    with torch.no_grad():
        pt.soft_prompt(other).prompt_embeddings[2] += 0.1  # one virtual token off
    assert compare_llama(other, hf, *batch("right"), peft_prompt_of=ours) > 100 * TOL
    ours, hf = tiny_hf("bert")
    pt.apply(ours, 5, init="vocab")
    with torch.no_grad():
        ours.embeddings.position_embeddings.weight[:5].zero_()  # as if the virtual tokens had no positions
    assert compare_bert(ours, hf, *batch("right")) > 100 * TOL


# ---------------------------------------------------------------- the real models


@pytest.fixture(scope="module")
def real(smollm2, smollm2_hf, minilm, minilm_hf):
    return {"smollm2": (smollm2[0], smollm2_hf, smollm2[1]), "minilm": (minilm[0], minilm_hf, minilm[1])}


def padded(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")  # SmolLM2 and MiniLM tokenizers pad on the right
    assert enc["attention_mask"][-1].sum() < enc["attention_mask"].shape[1]  # the batch really is padded
    return enc["input_ids"], enc["attention_mask"]


TEXTS = ["The service was slow but the food made up for it.", "Great!"]


@pytest.mark.real_models
def test_smollm2_equals_peft_prompt_tuning(real):
    ours, hf, tok = copy.deepcopy(real["smollm2"])
    pt.apply(ours, 8, init="text", init_text="negative neutral positive", tokenizer=tok)
    diff = compare_llama(ours, hf, *padded(tok, TEXTS))
    print(f"SmolLM2 vs peft: max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.real_models
def test_minilm_equals_peft_prompt_tuning(real):
    ours, hf, tok = copy.deepcopy(real["minilm"])
    pt.apply(ours, 8, init="vocab")
    diff = compare_bert(ours, hf, *padded(tok, TEXTS))
    print(f"MiniLM vs peft: max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.real_models
def test_text_init_equals_peft_text_init(real):
    for name, task in (("smollm2", "CAUSAL_LM"), ("minilm", "FEATURE_EXTRACTION")):
        ours, hf, tok = real[name]
        ours, hf = copy.deepcopy(ours), copy.deepcopy(hf)
        text = "Classify the sentiment: negative, neutral or positive."
        pt.apply(ours, 20, init="text", init_text=text, tokenizer=tok)
        theirs = peft.get_peft_model(hf, peft.PromptTuningConfig(
            task_type=task, num_virtual_tokens=20, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
            tokenizer_name_or_path=tok.name_or_path))
        assert torch.equal(pt.soft_prompt(ours).prompt_embeddings, theirs.prompt_encoder.default.embedding.weight)
