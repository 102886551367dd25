"""The contract every PEFT method keeps (`pefttutor/methods/base.py`), run over the registry.

A new method gets every test here by adding one line to CASES (and BAD, its refused settings).
Method-specific maths (formulas, peers) lives in each method's own test file. QLoRA adapts a 4-bit
base, so its tests run on the tiny model with its targets quantized first (`base`): that is the
model `remove` gives back.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pefttutor import calculator, methods, quantized
from pefttutor.models import BertClassifier
from pefttutor.study import methods as study_methods
from tests.tiny_models import tiny_bert, tiny_llama

# method -> settings for a tiny Llama (every method) and, where the method takes one, a Bert classifier
CASES = {
    "lora": {"targets": ("q_proj", "o_proj"), "r": 2},  # o_proj: stacked with adapters, which wrap it too
    "adapters": {"size": 4},
    "prefix_tuning": {"n_tokens": 3, "hidden": 8},
    "prompt_tuning": {"n_tokens": 3},
    "llama_adapter": {"n_tokens": 2},
    "dora": {"targets": ("gate_proj", "up_proj"), "r": 2},  # layers no other case wraps: see test_one_update_per_layer
    "ia3": {"targets": ("k_proj", "down_proj"), "feedforward": ("down_proj",)},  # v_proj: QLoRA's, below
    "qlora": {"targets": ("v_proj",), "r": 2},  # the one layer no other case wraps: a 4-bit layer takes only QLoRA
}
BERT_CASES = {
    "lora": {"targets": ("query", "value"), "r": 2},
    "adapters": {"size": 4, "placement": "parallel"},
    "prefix_tuning": {"n_tokens": 3, "reparam": False},
    "prompt_tuning": {"n_tokens": 3},
    "dora": {"targets": ("query", "value"), "r": 2},
    "ia3": {"targets": ("key", "value", "output.dense"), "feedforward": ("output.dense",)},
    "qlora": {"targets": ("query", "value"), "r": 2},
}
# settings each method must refuse, on apply and in a file's config
BAD = {
    "lora": [{"r": True}, {"r": 0}, {"r": 33}, {"alpha": 0}, {"alpha": math.nan}, {"rslora": "false"},
             {"dropout": 1.5}, {"targets": 3}],
    "adapters": [{"size": True}, {"size": 33}, {"sigma": math.inf}, {"sigma": 0}, {"placement": "after"},
                 {"train_layernorms": "yes"}],
    "prefix_tuning": [{"n_tokens": -1}, {"reparam": "no"}, {"hidden": 0}, {"n_tokens": True}, {"n_tokens": 2.5}],
    "prompt_tuning": [{"n_tokens": -1}, {"init": "zeros"}, {"n_tokens": 1.5}],
    "llama_adapter": [{"n_tokens": 0}, {"n_layers": 3}, {"init_gate": math.nan}, {"init_gate": "open"},
                      {"init_gate": True}],
    "dora": [{"r": True}, {"r": 33}, {"alpha": 0}, {"alpha": math.inf}, {"rslora": 1}],
    "ia3": [{"targets": 3}, {"feedforward": ("up_proj",)}, {"targets": ("kproj",)}],
    "qlora": [{"r": True}, {"r": 33}, {"alpha": 0}, {"dropout": 1.5}, {"quant_type": "int8"}, {"double_quant": "yes"},
              {"quant_type": "fp4"}, {"targets": ("q_proj",)}],  # the base is NF4; q_proj is not quantized
}
NAMES = list(CASES)
X = torch.tensor([[5, 9, 2, 33, 7], [1, 60, 12, 8, 4]])


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    return BertClassifier(tiny_bert(seed), num_classes=3).eval()


def base(*names, family="llama", **overrides):
    """The tiny model the methods `names` go on: a Llama, a Bert or a Bert classifier, with QLoRA's
    targets quantized to 4 bits when QLoRA is among them."""
    model = {"llama": tiny_llama, "bert": tiny_bert, "classifier": tiny_classifier}[family](**overrides)
    if "qlora" in names:
        quantized.quantize_model(model, (CASES if family == "llama" else BERT_CASES)["qlora"]["targets"])
    return model


def apply(name, model=None, **extra):
    model = base(name) if model is None else model
    return methods.get(name).apply(model, **{**CASES[name], **extra})


def perturb(model, name):
    """Move every parameter the method trains away from its initial value (B = 0, zero gates, ...)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in methods.get(name).trainable(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def snapshot(model):
    """Everything `remove` and a failed `load` must leave as it was."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            list(methods.applied(model)))


def assert_same(model, before):
    state, modules, flags, names = snapshot(model)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert modules == before[1] and flags == before[2] and names == before[3]


def saved(tmp_path, name, model=None):
    model = apply(name, model)
    perturb(model, name)
    path = tmp_path / f"{name}.safetensors"
    methods.get(name).save(model, path)
    return model, path


def rewrite(path, tensors=None, header=None):
    """Rewrite a saved file: change(tensors) and/or change(header dict), keeping the rest."""
    with safe_open(str(path), "pt") as f:
        metadata, data = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if tensors:
        tensors(data)
    if header:
        h = json.loads(metadata["pefttutor"])
        header(h)
        metadata["pefttutor"] = json.dumps(h)
    save_file(data, path, metadata=metadata)


def test_every_method_is_registered_once_under_the_name_everyone_uses():
    assert set(CASES) == set(BAD) == set(methods.METHODS)
    assert set(calculator.METHODS) == {"full", *methods.METHODS}
    assert set(study_methods.METHODS) == {*study_methods.BASELINES, *methods.METHODS}
    for name, method in methods.METHODS.items():
        module = getattr(methods, name)
        assert module.METHOD is method and method.name == name
        assert all(getattr(module, f) == getattr(method, f) for f in ("apply", "save", "load", "merge", "remove"))
    with pytest.raises(ValueError, match="valid methods: prompt_tuning, prefix_tuning"):
        methods.get("prompt")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_apply_trains_exactly_the_method_and_its_train_modules(name, family):
    if family == "bert" and name not in BERT_CASES:
        pytest.skip("Llama only")
    model, settings, train = ((base(name), CASES[name], ()) if family == "llama"
                              else (base(name, family="classifier"), BERT_CASES[name], ("classifier",)))
    methods.get(name).apply(model, **settings, train=train)
    trainable = methods.get(name).trainable(model)
    assert trainable and {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    assert any(n.startswith("classifier.") for n in trainable) == bool(train)
    assert methods.get(name).get_config(model).train == train


@pytest.mark.parametrize("name", NAMES)
def test_remove_gives_the_base_model_back_bit_for_bit(name):
    model = base(name).train()  # every parameter trainable: remove must restore requires_grad too
    before, y = snapshot(model), model.eval()(X)
    apply(name, model)
    perturb(model, name)
    assert not torch.equal(model(X), y)
    methods.get(name).remove(model)
    assert_same(model, before)
    assert torch.equal(model(X), y) and not hasattr(model, "peft_methods")
    with pytest.raises(ValueError, match="has no"):
        methods.get(name).remove(model)


@pytest.mark.parametrize("name", NAMES)
def test_a_failed_apply_leaves_the_model_as_before(name, monkeypatch):
    model = base(name)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no module matches \['lm_haed'\]; valid names: .*'lm_head'"):
        apply(name, model, train=("lm_haed",))
    assert_same(model, before)

    def fail(*args):
        raise RuntimeError("after attach")

    monkeypatch.setattr(type(methods.get(name)), "modules", fail)  # fails once the modules are in
    with pytest.raises(RuntimeError, match="after attach"):
        apply(name, model)
    assert_same(model, before)


@pytest.mark.parametrize("name", NAMES)
def test_apply_twice_is_refused_and_a_removed_method_can_come_back(name):
    model = apply(name)
    with pytest.raises(ValueError, match=f"already has .*{name}.remove"):
        apply(name, model)
    methods.get(name).remove(model)
    apply(name, model)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", range(8))
def test_bad_settings_are_refused_before_any_change(name, bad):
    if bad >= len(BAD[name]):
        pytest.skip("fewer bad settings")
    model = base(name)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"must|unknown|above|wider|no Linear matches"):
        apply(name, model, **BAD[name][bad])
    assert_same(model, before)


@pytest.mark.parametrize("name", NAMES)
def test_save_writes_the_adapter_with_its_header_atomically(name, tmp_path):
    model, path = saved(tmp_path, name)
    with safe_open(str(path), "pt") as f:
        keys, header = set(f.keys()), json.loads(f.metadata()["pefttutor"])
    assert keys == set(methods.get(name).adapter_state_dict(model))
    assert not keys & set(base(name).state_dict())  # the adapter only, never the base weights
    assert header["method"] == name and header["base"]["architecture"] == "Llama"
    assert header["config"] == json.loads(json.dumps(methods.get(name).get_config(model).__dict__))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_into_a_fresh_and_into_an_adapted_model(name, tmp_path):
    model, path = saved(tmp_path, name)
    for target in (base(name), apply(name)):
        methods.load(target, path)  # the file names its method
        assert methods.get(name).get_config(target) == methods.get(name).get_config(model)
        assert torch.equal(target(X), model(X))
        assert {n for n, p in target.named_parameters() if p.requires_grad} == set(methods.get(name).trainable(target))


def _tamperings(name):
    first = lambda t: sorted(t)[0]  # noqa: E731
    return {
        "wrong shape": dict(tensors=lambda t: t.update({first(t): torch.zeros(7, 7)})),
        "extra key": dict(tensors=lambda t: t.update(stray=torch.zeros(1))),
        "missing key": dict(tensors=lambda t: t.pop(first(t))),
        "other base": dict(header=lambda h: h["base"].update(shapes="0" * 16)),
        "bad setting": dict(header=lambda h: h["config"].update(BAD[name][0])),
        "missing setting": dict(header=lambda h: h["config"].pop(next(k for k in h["config"] if k != "train"))),
        "unknown setting": dict(header=lambda h: h["config"].update(colour="blue")),
        "other method": dict(header=lambda h: h.update(method=next(n for n in NAMES if n != name)))
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tamper", list(_tamperings("lora")))
def test_a_file_that_does_not_fit_is_refused_and_nothing_changes(name, tamper, tmp_path):
    _, path = saved(tmp_path, name)
    good = path.read_bytes()
    rewrite(path, **_tamperings(name)[tamper])
    for model in (base(name), apply(name)):
        before = snapshot(model)
        with pytest.raises(ValueError) as error:
            methods.get(name).load(model, path)
        assert_same(model, before)
        assert str(path) in str(error.value) or tamper in ("wrong shape", "extra key", "missing key")
    path.write_bytes(good)
    methods.get(name).load(model, path)  # the retry with the right file works


@pytest.mark.parametrize("name", NAMES)
def test_files_that_are_not_adapters_are_refused_naming_the_file(name, tmp_path):
    model = base(name)
    before = snapshot(model)
    plain, broken, garbage = tmp_path / "plain.safetensors", tmp_path / "broken.safetensors", tmp_path / "x.bin"
    save_file({"w": torch.zeros(1)}, plain)
    save_file({"w": torch.zeros(1)}, broken, metadata={"pefttutor": "{not json"})
    garbage.write_bytes(b"\x00" * 20)
    for path, message in ((plain, "not a pefttutor adapter"), (broken, "not valid JSON"), (garbage, "not a readable")):
        with pytest.raises(ValueError, match=message) as error:
            methods.get(name).load(model, path)
        assert str(path) in str(error.value)
    assert_same(model, before)


@pytest.mark.parametrize("name", NAMES)
def test_a_file_from_a_deeper_model_is_refused_and_the_right_one_then_loads(name, tmp_path):
    (tmp_path / "deep").mkdir()
    _, deep = saved(tmp_path / "deep", name, base(name, num_hidden_layers=3))
    model = base(name)
    before = snapshot(model)
    with pytest.raises(ValueError, match="another base model"):
        methods.get(name).load(model, deep)
    assert_same(model, before)
    _, right = saved(tmp_path, name)
    methods.get(name).load(model, right)


@pytest.mark.parametrize("name", [n for n in NAMES if n in BERT_CASES])
def test_a_file_from_another_architecture_of_the_same_width_is_refused(name, tmp_path):
    """A Llama's adapter (hidden size 32) into a Bert of the same width: refused by the file's base identity."""
    _, path = saved(tmp_path, name)
    bert = base(name, family="bert")
    before = snapshot(bert)
    with pytest.raises(ValueError, match="another base model: file Llama .* this model Bert"):
        methods.get(name).load(bert, path)
    assert_same(bert, before)


@pytest.mark.parametrize("name", NAMES)
def test_merge_folds_into_w0_or_says_why_it_cannot(name):
    model = apply(name)
    perturb(model, name)
    y = model(X)
    method = methods.get(name)
    if method.cannot_merge:
        for op in (method.merge, method.unmerge):
            with pytest.raises(ValueError, match=f"cannot be merged.*{method.cannot_merge[:20]}"):
                op(model)
        return
    method.merge(model)
    torch.testing.assert_close(model(X), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        method.remove(model)
    method.unmerge(model)
    method.remove(model)


@pytest.mark.parametrize("first,second", list(itertools.permutations(NAMES, 2)))
def test_any_two_methods_stack_both_train_both_save_and_come_off_in_reverse(first, second, tmp_path):
    model = base(first, second)
    before = snapshot(model)
    apply(first, model)
    apply(second, model)
    for name in (first, second):
        perturb(model, name)
    own = {name: methods.get(name).trainable(model) for name in (first, second)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(own[first]) | set(own[second])
    model(X).float().pow(2).mean().backward()
    assert all(p.grad is not None for trainable in own.values() for p in trainable.values())
    for name in (first, second):  # each file also loads alone into the base model
        methods.get(name).save(model, tmp_path / name)
        alone = methods.load(base(first, second), tmp_path / name)
        assert methods.get(name).adapter_state_dict(alone).keys() == methods.get(name).adapter_state_dict(model).keys()
    with pytest.raises(ValueError, match=f"{second} was applied after"):
        methods.get(first).remove(model)
    methods.get(second).remove(model)
    methods.get(first).remove(model)
    assert_same(model, before)


@pytest.mark.parametrize("first,second", [("lora", "dora"), ("dora", "lora"), ("lora", "ia3"), ("ia3", "lora")])
def test_one_update_per_layer_for_methods_that_merge_into_w0(first, second):
    """Two of LoRA, DoRA, IA3 on one layer are refused: the outer one would read or merge into a W0
    that no longer is the layer's. Nothing changes."""
    model = methods.get(first).apply(tiny_llama(), targets=("q_proj",))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['model.layers.0.self_attn.q_proj.base'.*one low-rank or scaling update"):
        methods.get(second).apply(model, targets=("q_proj",))
    assert_same(model, before)
