"""Our Llama/Bert with our LoRA against transformers' models with HF peft's LoRA, output for output."""

import copy
import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from pefttutor import interop
from pefttutor.methods import lora
from pefttutor.models import Bert, Llama
from tests.test_checkpoint import umask  # noqa: F401 (a fixture)
from tiny_models import save_peft_failing_at_the_config

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),  # peft calls a deprecated method
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning"),  # the tied tests' point
]

TOL = 1e-4
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _with_ours(hf):
    """(ours, hf): our from-scratch model with the transformers model's weights, and that model."""
    return (Bert if isinstance(hf, BertModel) else Llama).from_hf(hf.eval()).eval(), hf


def _tiny_llama(tie_word_embeddings):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie_word_embeddings))  # GQA: 4 query heads share 2 key/value heads


@pytest.fixture(scope="session")
def tiny_models():
    """Base model pairs, built once; each test works on copies (see `pair`). The tied Llama shares
    its embedding matrix with lm_head, as SmolLM2 does."""
    tiny_bert = BertModel(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32))
    return {"tiny_llama": _with_ours(_tiny_llama(False)), "tiny_llama_tied": _with_ours(_tiny_llama(True)),
            "tiny_bert": _with_ours(tiny_bert)}


@pytest.fixture(scope="session")
def real_models(smollm2, smollm2_hf, minilm, minilm_hf):  # session fixtures of tests/conftest.py
    return {"smollm2": (smollm2[0], smollm2_hf), "minilm": (minilm[0], minilm_hf)}


def pair(request, name):
    """Fresh copies of (ours, hf) for the named base model: tests change them (apply, peft)."""
    models = request.getfixturevalue("tiny_models" if name.startswith("tiny") else "real_models")
    return copy.deepcopy(models[name])


def inputs(hf):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(hf.config.vocab_size, 1000), (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # one padded row
    return ids, mask


def outputs(model, ids, mask):
    """Llama: logits. Bert: hidden states and pooler output. Real tokens only: what a padding
    position computes is convention (HF and our Llama number pad positions differently)."""
    real = mask.bool()
    if isinstance(model, Llama):
        return model(ids, mask)[real]
    if isinstance(model, Bert):
        hidden = model(ids, mask)
        return torch.cat([hidden[real].flatten(), model.pooler(hidden).flatten()])
    out = model(input_ids=ids, attention_mask=mask)
    if hasattr(out, "logits"):
        return out.logits[real]
    return torch.cat([out.last_hidden_state[real].flatten(), out.pooler_output.flatten()])


def perturb(named_params, seed=1, std=0.02):
    """Seeded noise: LoRA B (zero at init) and trained heads become non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(named_params, key=lambda kv: kv[0]):
            p.add_(std * torch.randn(p.shape, generator=g))


def compare(ours, hf_adapted, hf_base_out, ids, mask, label):
    with torch.no_grad():
        a, b = outputs(ours, ids, mask), outputs(hf_adapted, ids, mask)
    diff, effect = (a - b).abs().max().item(), (a - hf_base_out).abs().max().item()
    print(f"\n{label}: max |ours - peft| = {diff:.2e}, adapter effect {effect:.2e}")
    assert effect > 1e-2, "the adapter changes nothing: the comparison would prove nothing"
    assert diff <= TOL


LM, FE = "CAUSAL_LM", "FEATURE_EXTRACTION"
EXPORT_CASES = {  # name: (model, lora.apply kwargs, peft task_type)
    "tiny_llama": ("tiny_llama", dict(targets=ATTENTION + MLP, r=4, alpha=8), LM),
    "tiny_llama+lm_head": ("tiny_llama", dict(targets=["q_proj", "v_proj"], r=2, alpha=4, train=["lm_head"]), LM),
    "tiny_bert+pooler": ("tiny_bert", dict(targets=["query", "value"], r=4, alpha=4, train=["pooler"]), FE),
    "smollm2": ("smollm2", dict(targets=ATTENTION + MLP, r=8, alpha=16), LM),  # all 7 projections
    "minilm": ("minilm", dict(targets=["query", "value"], r=8, alpha=16), FE),
    "minilm+pooler": ("minilm", dict(
        targets=["query", "key", "value"], r=4, alpha=8, rslora=True, train=["pooler"]), FE),
}


def cases(table):
    """Parameters for a case table; those on the real checkpoints carry the `real_models` mark."""
    real = pytest.mark.real_models
    return [pytest.param(c, marks=() if m.startswith("tiny") else real) for c, (m, *_) in table.items()]


@pytest.mark.parametrize("case", cases(EXPORT_CASES))
def test_export_loads_in_peft_with_same_outputs(request, case, tmp_path):
    name, kwargs, task_type = EXPORT_CASES[case]
    ours, hf = pair(request, name)
    ids, mask = inputs(hf)
    with torch.no_grad():
        base_out = outputs(hf, ids, mask)
    torch.manual_seed(0)  # lora_A's random init
    lora.apply(ours, **kwargs)
    perturb((n, p) for n, p in ours.named_parameters() if p.requires_grad and ".lora_A." not in n)
    path = interop.save_peft(ours, tmp_path / "adapter", base_model_name_or_path=name, task_type=task_type)
    with safe_open(str(path / interop.WEIGHTS_NAME), "pt") as f:  # the fields the weights were written with
        metadata = f.metadata()
    config = json.loads((path / interop.CONFIG_NAME).read_text())
    written_with = json.dumps({k: config[k] for k in interop.WEIGHTS_DEPEND_ON})
    assert metadata == {"format": "pt", interop.WRITTEN_WITH: written_with}
    adapted = peft.PeftModel.from_pretrained(hf, path).eval()
    compare(ours, adapted, base_out, ids, mask, f"export {case}")


IMPORT_CASES = {  # name: (model, peft.LoraConfig kwargs)
    "tiny_llama": ("tiny_llama", dict(target_modules=ATTENTION + MLP, r=4, lora_alpha=8, task_type=LM)),
    "tiny_llama+rslora+lm_head": ("tiny_llama", dict(
        target_modules=["k_proj", "up_proj"], r=4, lora_alpha=16, use_rslora=True, modules_to_save=["lm_head"],
        task_type=LM)),
    "smollm2+rslora": ("smollm2", dict(
        target_modules=ATTENTION + MLP, r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.1, task_type=LM)),
    "minilm+pooler": ("minilm", dict(
        target_modules=["query", "value"], r=8, lora_alpha=32, modules_to_save=["pooler"], task_type=FE)),
}


@pytest.mark.parametrize("case", cases(IMPORT_CASES))
def test_import_of_a_peft_adapter_gives_same_outputs(request, case, tmp_path):
    name, peft_kwargs = IMPORT_CASES[case]
    ours, hf = pair(request, name)
    ids, mask = inputs(hf)
    with torch.no_grad():
        base_out = outputs(hf, ids, mask)
    torch.manual_seed(0)
    adapted = peft.get_peft_model(hf, peft.LoraConfig(**peft_kwargs))
    perturb((n, p) for n, p in adapted.named_parameters() if ".lora_B." in n or ".modules_to_save." in n)
    adapted.save_pretrained(tmp_path)
    interop.load_peft(ours, tmp_path)
    assert lora.get_config(ours).rslora == peft_kwargs.get("use_rslora", False)
    compare(ours, adapted.eval(), base_out, ids, mask, f"import {case}")


def test_save_peft_into_existing_folder_replaces_only_its_files(request, tmp_path):
    ours, _ = pair(request, "tiny_llama")
    lora.apply(ours, ["q_proj"], r=2)
    (tmp_path / "README.md").write_text("notes")
    interop.save_peft(ours, tmp_path)
    interop.save_peft(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", interop.CONFIG_NAME, interop.WEIGHTS_NAME]
    config = json.loads((tmp_path / interop.CONFIG_NAME).read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 16 and config["target_modules"] == ["q_proj"]
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False and config["modules_to_save"] is None


def test_save_peft_then_load_peft_round_trip(request, tmp_path):
    ours, hf = pair(request, "tiny_llama")
    lora.apply(ours, ["v_proj", "up_proj"], r=3, alpha=5, rslora=True, train=["lm_head"])
    perturb((n, p) for n, p in ours.named_parameters() if p.requires_grad)
    interop.save_peft(ours, tmp_path)
    again, _ = pair(request, "tiny_llama")
    interop.load_peft(again, tmp_path)
    assert lora.get_config(again) == lora.get_config(ours)
    ids, mask = inputs(hf)
    with torch.no_grad():
        assert torch.equal(outputs(again, ids, mask), outputs(ours, ids, mask))


# ---- refusals --------------------------------------------------------------------------------

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def snapshot(model):
    """Module types and tensors: what a refusal leaves as it was."""
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    modules, state = snapshot(model)
    assert modules == before[0] and state.keys() == before[1].keys()
    assert all(torch.equal(v, before[1][k]) for k, v in state.items())


@pytest.fixture
def peft_folder(request, tmp_path):
    """A peft-saved LoRA adapter on the tiny Llama (q_proj, v_proj; r=4)."""
    adapted = peft.get_peft_model(pair(request, "tiny_llama")[1],
                                  peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    perturb((n, p) for n, p in adapted.named_parameters() if ".lora_B." in n)
    adapted.save_pretrained(tmp_path)
    return tmp_path


def rewrite_weights(folder, change):
    path = folder / interop.WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


HEAD = "base_model.model.lm_head.weight"
WRONG_PREFIX = Q_A.replace("base_model.model.model.", "base_model.model.")  # a classic export bug


@pytest.mark.parametrize("change, named", [
    (lambda t: t.update({WRONG_PREFIX: t.pop(Q_A)}), [f"missing keys: {Q_A}", f"unexpected keys: {WRONG_PREFIX}"]),
    (lambda t: t.pop(Q_A), [f"missing keys: {Q_A}"]),
    (lambda t: t.update({HEAD: torch.zeros(64, 32)}), [f"unexpected keys: {HEAD}"]),
    (lambda t: t.update({Q_A: torch.zeros(4, 31)}), [f"wrong shapes: {Q_A} (file (4, 31), model (4, 32))"]),
], ids=["renamed", "missing", "extra", "wrong_shape"])
def test_load_peft_refuses_keys_that_do_not_fit(request, peft_folder, change, named):
    rewrite_weights(peft_folder, change)
    ours, _ = pair(request, "tiny_llama")
    before = snapshot(ours)
    with pytest.raises(ValueError) as err:
        interop.load_peft(ours, peft_folder)
    for text in named:
        assert text in str(err.value)
    assert_untouched(ours, before)  # LoRA taken out again


def test_peft_itself_ignores_a_renamed_key(request, peft_folder):
    """The trap `load_peft` closes: peft only warns, and that layer's adapter silently stays zero."""
    rewrite_weights(peft_folder, lambda t: t.update({WRONG_PREFIX: t.pop(Q_A)}))
    with pytest.warns(UserWarning, match="missing adapter keys"):
        peft.PeftModel.from_pretrained(pair(request, "tiny_llama")[1], peft_folder)


def test_load_peft_refuses_other_peft_types(request, tmp_path):
    prompt = peft.get_peft_model(pair(request, "tiny_llama")[1],  # p-tuning: a prompt from an encoder we lack
                                 peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prompt.save_pretrained(tmp_path)
    ours, _ = pair(request, "tiny_llama")
    with pytest.raises(NotImplementedError, match="P_TUNING"):
        interop.load_peft(ours, tmp_path)


@pytest.mark.parametrize("field, value", [
    ("use_dora", 1), ("fan_in_fan_out", True), ("bias", "all"), ("rank_pattern", {"q_proj": 2}),
    ("alpha_pattern", {"v_proj": 4}), ("layers_to_transform", [0]), ("init_lora_weights", "pissa"),
    ("target_modules", ".*q_proj"), ("ensure_weight_tying", True),
    ("layers_to_transform", 0),  # layer 0, not False
    ("use_foo", True),  # a field we do not know: refused, not ignored
])
def test_load_peft_refuses_unsupported_features_untouched(request, peft_folder, field, value):
    config_path = peft_folder / interop.CONFIG_NAME
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    ours, _ = pair(request, "tiny_llama")
    with pytest.raises(ValueError, match=field):
        interop.load_peft(ours, peft_folder)
    assert not lora.lora_layers(ours)  # refused before touching the model


def test_every_field_peft_writes_is_known_with_its_default_accepted():
    """The allow-list covers the installed peft's LoraConfig exactly: a new peft's new field fails here first."""
    written = peft.LoraConfig(target_modules=["q_proj"]).to_dict()
    assert set(written) == set(interop.FIELDS)
    assert all(interop._one_of(v, ok) for k, v in written.items() if (ok := interop.FIELDS[k]) is not interop.ANY)


def test_load_peft_refuses_a_pickle_file_before_touching_the_model(request, peft_folder):
    weights = peft_folder / interop.WEIGHTS_NAME
    with safe_open(str(weights), "pt") as f:
        torch.save({k: f.get_tensor(k) for k in f.keys()}, peft_folder / "adapter_model.bin")  # peft's old format
    weights.unlink()
    ours, _ = pair(request, "tiny_llama")
    before = snapshot(ours)
    with pytest.raises(ValueError, match="adapter_model.bin .*pickle files are refused on purpose.*safe_serialization"):
        interop.load_peft(ours, peft_folder)
    assert_untouched(ours, before)


def untie(model):
    """Give lm_head its own copy of the embedding matrix: peft's modules_to_save does the same."""
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())


def test_save_peft_refuses_a_tied_lm_head_and_the_untied_one_gives_peft_the_same_outputs(request, tmp_path):
    """Training a tied lm_head changes the embeddings too; peft's modules_to_save would copy lm_head alone."""
    ours, hf = pair(request, "tiny_llama_tied")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight and hf.config.tie_word_embeddings
    lora.apply(ours, ["q_proj"], r=2, train=["lm_head"])
    with pytest.raises(ValueError, match=r"tied to other modules \(model.embed_tokens.weight = lm_head.weight\)"):
        interop.save_peft(ours, tmp_path / "adapter")
    assert not list(tmp_path.iterdir())  # nothing written
    ids, mask = inputs(hf)
    with torch.no_grad():
        base_out = outputs(hf, ids, mask)
    ours, hf = pair(request, "tiny_llama_tied")
    untie(ours)  # what the message advises
    lora.apply(ours, ["q_proj"], r=2, train=["lm_head"])
    perturb((n, p) for n, p in ours.named_parameters() if p.requires_grad)
    path = interop.save_peft(ours, tmp_path / "adapter")
    compare(ours, peft.PeftModel.from_pretrained(hf, path).eval(), base_out, ids, mask, "export untied lm_head")


def test_load_peft_refuses_modules_to_save_tied_in_our_model(request, tmp_path):
    """peft trains a copy of a tied lm_head and keeps the embeddings: one tied matrix cannot hold both."""
    ours, hf = pair(request, "tiny_llama_tied")
    ids, mask = inputs(hf)
    with torch.no_grad():
        base_out = outputs(hf, ids, mask)
    adapted = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    perturb((n, p) for n, p in adapted.named_parameters() if ".lora_B." in n or ".modules_to_save." in n)
    adapted.save_pretrained(tmp_path)
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"modules_to_save \['lm_head'\] are tied .*untie it"):
        interop.load_peft(ours, tmp_path)
    assert_untouched(ours, before)
    untie(ours)
    interop.load_peft(ours, tmp_path)
    compare(ours, adapted.eval(), base_out, ids, mask, "import lm_head into an untied copy")


def test_a_save_peft_that_fails_half_way_leaves_a_folder_load_peft_refuses(request, tmp_path, monkeypatch):
    ours, _ = pair(request, "tiny_llama")
    lora.apply(ours, ["q_proj"], r=2, alpha=16)
    interop.save_peft(ours, tmp_path)
    lora.remove(ours)
    lora.apply(ours, ["q_proj"], r=2, alpha=4)  # same keys and shapes: only the scaling differs
    save_peft_failing_at_the_config(ours, tmp_path, monkeypatch)  # into the existing folder: new weights, old config
    assert json.loads((tmp_path / interop.CONFIG_NAME).read_text())["lora_alpha"] == 16
    fresh, _ = pair(request, "tiny_llama")
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="come from different saves .*lora_alpha: weights 4, config 16"):
        interop.load_peft(fresh, tmp_path)
    assert_untouched(fresh, before)


def test_save_peft_writes_plain_modes(request, tmp_path, umask):  # noqa: F811
    ours, _ = pair(request, "tiny_llama")
    path = interop.save_peft(lora.apply(ours, ["q_proj"], r=2), tmp_path / "adapter")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (path, *path.iterdir())}
    assert modes == {"adapter": 0o777 & ~umask, interop.CONFIG_NAME: 0o666 & ~umask,
                     interop.WEIGHTS_NAME: 0o666 & ~umask}  # 0755 and 0644 under umask 022


def test_threads_exporting_to_one_folder_never_collide(request, tmp_path):
    ours, _ = pair(request, "tiny_llama")
    lora.apply(ours, ["q_proj"], r=2)
    start = threading.Barrier(4)

    def export_often():
        start.wait()
        for _ in range(10):
            interop.save_peft(ours, tmp_path / "adapter")

    with ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(export_often) for _ in range(4)]:
            done.result()  # re-raises a thread's error
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    interop.load_peft(pair(request, "tiny_llama")[0], tmp_path / "adapter")
