"""Many adapters on one base model (`pefttutor.multi`): switching between methods, the mixed batch
(`pefttutor.mixed_batch`), generation, and combining LoRA adapters (`pefttutor.combine`) against peft."""

import copy

import pytest
import torch

from pefttutor import combine, params
from pefttutor.methods import (adapters, applied, dora, ia3, llama_adapter, lora, prefix_tuning, prompt_tuning)
from pefttutor.methods import load as load_any
from pefttutor.mixed_batch import MultiLoRALinear
from pefttutor.models import Llama
from pefttutor.multi import MultiAdapter
from tests.test_bench import _script
from tiny_models import tiny_bert, tiny_hf, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft, deprecated call

TOL = 1e-5  # fp32: a row of a mixed batch against the same row alone (different matmul shapes, so rounding)
NO_EOS = -1  # an eos id no token has: every generation runs its full length

SPECS = {  # name: (method, settings) of one adapter each on the tiny Llama
    "lora_qv": (lora, dict(targets=("q_proj", "v_proj"), r=4, alpha=8)),
    "lora_mlp": (lora, dict(targets=("up_proj", "down_proj", "v_proj"), r=2, alpha=3, rslora=True)),
    "lora_ko": (lora, dict(targets=("k_proj", "o_proj"), r=3, alpha=1)),
    "lora_head": (lora, dict(targets=("q_proj",), r=2, train=("lm_head",))),  # a trained head: not resident
    "dora": (dora, dict(targets=("q_proj", "k_proj"), r=2, alpha=4)),
    "ia3": (ia3, dict(targets=("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",))),
    "adapters": (adapters, dict(size=4)),
    "prompt": (prompt_tuning, dict(n_tokens=3)),
    "prefix": (prefix_tuning, dict(n_tokens=3, hidden=16)),
    "llama_adapter": (llama_adapter, dict(n_tokens=3)),
}
MERGES = {"lora_qv", "lora_mlp", "lora_ko", "lora_head", "dora", "ia3"}
RESIDENT = ("lora_qv", "lora_mlp", "lora_ko")


def trained(base, name, scale=0.3, **overrides):
    """A copy of `base` holding adapter `name` of SPECS (settings in `overrides` replaced), made non-trivial
    by seeded noise on what it trains (LoRA's B and LLaMA-Adapter's gates start at zero: an untouched
    adapter would prove nothing)."""
    method, settings = SPECS[name]
    seed = list(SPECS).index(name)
    torch.manual_seed(seed)  # the method's initial values
    model = method.apply(copy.deepcopy(base), **{**settings, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(method.trainable(model).items()):
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def saved(base, names, tmp_path):
    """{name: file} of `trained` adapters."""
    files = {}
    for name in names:
        files[name] = tmp_path / f"{name}.safetensors"
        SPECS[name][0].save(trained(base, name), files[name])
    return files


def holding(base, files):
    """A MultiAdapter on a copy of `base` with every file of `files` loaded under its name."""
    multi = MultiAdapter(copy.deepcopy(base))
    for name, file in files.items():
        multi.load_adapter(file, name)
    return multi


def alone(base, file):
    """A fresh copy of the base model with only this adapter file loaded (the reference)."""
    return load_any(copy.deepcopy(base), file)


def batch(seed=0, rows=4, length=7, side="left"):
    """Padded token ids and mask (left: a decoder's batches; right: Bert's, whose positions count from
    the first column): row i has i % 4 pad tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(rows):
        if side == "left":
            mask[i, :i % 4] = 0
        else:
            mask[i, length - i % 4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def real(ids, mask, i):
    """Row i without its padding, as a batch of one."""
    return ids[i:i + 1, mask[i].bool()]


def same_base(model, reference):
    """The base model bit for bit: same modules, parameters (names, values, requires_grad), no method."""
    assert not applied(model) and not any(isinstance(m, params.Wrapper) for m in model.modules())
    a, b = model.state_dict(), reference.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]


# ---- switching between adapters of any method -------------------------------------------------


def test_switching_between_adapters_of_every_method_equals_each_alone(tmp_path):
    base = tiny_llama()
    files = saved(base, SPECS, tmp_path)
    multi = holding(base, files)
    assert list(multi.configs) == list(SPECS) and multi.active_adapter is None
    assert [n for n in SPECS if multi.resident(n)] == list(RESIDENT)
    ids, mask = batch()
    with torch.no_grad():
        refs = {name: alone(base, file)(ids, mask) for name, file in files.items()}
        refs[None] = base(ids, mask)
        order = ["lora_qv", "prompt", "lora_mlp", None, "dora", "lora_qv", "ia3", "prefix", "lora_ko", "adapters",
                 "llama_adapter", "lora_head", None, "prompt", "lora_mlp", "llama_adapter", None]
        for name in order:
            multi.set_adapter(name)
            assert multi.active_adapter == name
            assert torch.equal(multi(ids, mask), refs[name]), name  # bit for bit: the same maths on the same tensors
            if name is not None:
                assert (refs[name] - refs[None]).abs().max() > 1e-2  # the adapter does change the outputs
    same_base(multi.model, base)  # none active: the base model, modules and parameters


def test_disable_adapter_gives_the_base_model_then_the_adapter_back_and_rng_is_untouched(tmp_path):
    base = tiny_llama()
    files = saved(base, ["lora_qv", "prefix"], tmp_path)
    rng = torch.get_rng_state()
    multi = MultiAdapter(copy.deepcopy(base)).load_adapter(files["lora_qv"], "a").load_adapter(files["prefix"], "p")
    assert torch.equal(torch.get_rng_state(), rng)  # adding and switching draw no random numbers of the caller's
    ids, _ = batch()
    for name, file in (("a", files["lora_qv"]), ("p", files["prefix"])):
        rng = torch.get_rng_state()
        multi.set_adapter(name)
        assert torch.equal(torch.get_rng_state(), rng)
        with torch.no_grad(), multi.disable_adapter():
            assert torch.equal(multi(ids), base(ids))
            same_base(multi.model, base)
        assert multi.active_adapter == name
        with torch.no_grad():
            assert torch.equal(multi(ids), alone(base, file)(ids))


def test_an_active_adapter_changed_in_place_keeps_its_change_when_switched_out(tmp_path):
    """Training (here: an in-place edit) and drop_reparam's new config survive a switch to another adapter."""
    base = tiny_llama()
    files = saved(base, ["prefix", "lora_qv"], tmp_path)
    multi = MultiAdapter(copy.deepcopy(base)).load_adapter(files["prefix"], "p").load_adapter(files["lora_qv"], "a")
    ids, _ = batch()
    multi.set_adapter("p")
    prefix_tuning.drop_reparam(multi.model)
    with torch.no_grad():
        prefix_tuning.prefix_encoder(multi.model).prompt_embeddings.mul_(2)
        before = multi(ids)
    multi.set_adapter("a")
    multi.set_adapter("p")
    assert multi.configs["p"].reparam is False
    with torch.no_grad():
        assert torch.equal(multi(ids), before)


def test_add_adapter_takes_a_copy_of_a_models_adapter(tmp_path):
    base = tiny_llama()
    source = trained(base, "lora_qv")
    source_ia3 = ia3.apply(trained(base, "lora_mlp"), ["k_proj"])  # two methods stacked: pick one
    lora.save(source, tmp_path / "a.safetensors")
    multi = MultiAdapter(copy.deepcopy(base)).add_adapter("a", source).add_adapter("m", source_ia3, method="lora")
    with torch.no_grad():
        for p in lora.trainable(source).values():
            p.zero_()  # the source changes afterwards: the added adapter does not
        multi.set_adapter("a")
        ids, _ = batch()
        assert torch.equal(multi(ids), alone(base, tmp_path / "a.safetensors")(ids))
    assert multi.configs["m"] == lora.get_config(source_ia3)
    with pytest.raises(ValueError, match="pass method="):
        multi.add_adapter("b", source_ia3)


def test_delete_adapter(tmp_path):
    base = tiny_llama()
    files = saved(base, ["lora_qv", "lora_mlp", "prompt"], tmp_path)
    multi = holding(base, files)
    ids, _ = batch()
    multi.set_adapter("lora_mlp")
    multi.delete_adapter("lora_mlp")  # the active one: the base model is left
    assert multi.active_adapter is None and list(multi.configs) == ["lora_qv", "prompt"]
    same_base(multi.model, base)
    multi.set_adapter("lora_qv")
    multi.delete_adapter("prompt")
    layers = {p for p, m in multi.model.named_modules() if isinstance(m, MultiLoRALinear)}
    assert layers == {p for p in lora.lora_layers(alone(base, files["lora_qv"]))}  # up/down_proj are bare again
    with torch.no_grad():
        assert torch.equal(multi(ids), alone(base, files["lora_qv"])(ids))
    with pytest.raises(ValueError, match="no adapter named 'lora_mlp'; adapters: 'lora_qv'"):
        multi.set_adapter("lora_mlp")
    multi.delete_adapter("lora_qv")
    same_base(multi.model, base)
    multi.load_adapter(files["lora_mlp"], "lora_mlp")  # a deleted name is free again
    multi.set_adapter("lora_mlp")
    with torch.no_grad():
        assert torch.equal(multi(ids), alone(base, files["lora_mlp"])(ids))


# ---- refusals -------------------------------------------------------------------------------------


def test_refusals_name_what_is_wrong_and_change_nothing(tmp_path):
    base = tiny_llama()
    files = saved(base, ["lora_qv", "prompt", "dora"], tmp_path)
    multi = MultiAdapter(copy.deepcopy(base)).load_adapter(files["lora_qv"], "a").load_adapter(files["prompt"], "p")
    multi.set_adapter("p")
    soft_prompt = prompt_tuning.soft_prompt(multi.model)
    with pytest.raises(ValueError, match=r"no adapter named 'b'; adapters: 'a', 'p'"):
        multi.set_adapter("b")
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        multi(batch()[0], adapter_names=["a", "b", None, "a"])
    with pytest.raises(ValueError, match=r"'a' is already loaded \(lora\)"):
        multi.load_adapter(files["dora"], "a")
    other = tiny_llama(intermediate_size=40)  # another base model (other shapes)
    lora.save(trained(other, "lora_qv"), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="saved from another base model"):
        multi.load_adapter(tmp_path / "other.safetensors", "o")
    for bad in ("x.y", "", "__base__", "keys", 3):
        with pytest.raises(ValueError, match="an adapter name must be"):
            multi.load_adapter(files["dora"], bad)
    with pytest.raises(ValueError, match="'p' is prompt tuning: a mixed batch takes plain LoRA adapters"):
        multi(batch()[0], adapter_names=["a", "p", None, "a"])
    with pytest.raises(ValueError, match="own model"):
        multi.add_adapter("s", multi.model)
    # nothing changed: the same adapters, the same active one, its very module still in the model
    assert list(multi.configs) == ["a", "p"] and multi.active_adapter == "p"
    assert prompt_tuning.soft_prompt(multi.model) is soft_prompt and list(applied(multi.model)) == ["prompt_tuning"]
    with pytest.raises(ValueError, match="takes a base model"):
        MultiAdapter(multi.model)
    multi.set_adapter(None)
    multi.model.train()
    with pytest.raises(ValueError, match="for inference"):
        multi(batch()[0], adapter_names=["a", None, None, None])
    multi.model.eval()
    with pytest.raises(RuntimeError, match="a mixed batch of 4 rows met an input of 2 rows"), multi.mixed_batch(
            ["a", None, "a", None]):
        multi.model(batch()[0][:2])
    with pytest.raises(RuntimeError, match="adapters are fixed"), multi.mixed_batch(["a"]):
        multi.set_adapter("p")
    same_base(multi.model, base)  # every refusal above left the model as it was


# ---- the mixed batch ----------------------------------------------------------------------------


ROWS = ["lora_qv", "lora_mlp", None, "lora_ko", "lora_qv", "__base__"]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_mixed_batch_rows_equal_each_adapter_alone(family, tmp_path):
    """h_i = W0 x_i + s_a(i) B_a(i) A_a(i) x_i: each row as if its adapter ran alone on it (TOL, fp32),
    adapters of different r, alpha, rsLoRA and targets, base rows among them."""
    base = tiny_llama() if family == "llama" else tiny_bert()
    targets = {"lora_qv": ["query", "value"], "lora_mlp": ["intermediate.dense", "value"],
               "lora_ko": ["key", "attention.output.dense"]}
    files = {}
    for name in RESIDENT:
        files[name] = tmp_path / f"{name}.safetensors"
        lora.save(trained(base, name, **({} if family == "llama" else {"targets": targets[name]})), files[name])
    multi = holding(base, files)
    ids, mask = batch(rows=len(ROWS), side="left" if family == "llama" else "right")
    with torch.no_grad():
        mixed = multi(ids, mask, adapter_names=ROWS)
        for i, name in enumerate(ROWS):
            model = base if name in (None, "__base__") else alone(base, files[name])
            own = model(real(ids, mask, i))[0]
            torch.testing.assert_close(mixed[i, mask[i].bool()], own, atol=TOL, rtol=0)
            if model is not base:
                assert (own - base(real(ids, mask, i))[0]).abs().max() > 1e-2  # not a base row in disguise
    same_base(multi.model, base)


def test_mixed_batch_generates_each_rows_tokens_as_its_adapter_alone(tmp_path):
    base = tiny_llama()
    files = saved(base, RESIDENT, tmp_path)
    multi = holding(base, files)
    multi.set_adapter("lora_ko")  # active before and after: a mixed batch does not disturb it
    ids, mask = batch(seed=1, rows=len(ROWS))
    seqs = multi.generate(ids, 8, attention_mask=mask, adapter_names=ROWS, eos_token_id=NO_EOS)
    assert multi.active_adapter == "lora_ko" and seqs.shape == (len(ROWS), ids.shape[1] + 8)
    continuations = []
    for i, name in enumerate(ROWS):
        model = base if name in (None, "__base__") else alone(base, files[name])
        row = real(ids, mask, i)
        own = model.generate(row, 8, eos_token_id=NO_EOS)[0, row.shape[1]:]
        assert torch.equal(seqs[i, ids.shape[1]:], own), f"row {i} ({name})"
        continuations.append(own)
        if model is not base:  # the adapter changes this row's tokens: the comparison proves something
            assert not torch.equal(own, base.generate(row, 8, eos_token_id=NO_EOS)[0, row.shape[1]:])


# ---- generation with any adapter active -----------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
def test_generation_with_any_adapter_active_equals_it_alone_and_merged(name, tmp_path):
    base = tiny_llama()
    files = saved(base, [name, "prompt" if name != "prompt" else "lora_qv"], tmp_path)
    multi = holding(base, files)
    multi.set_adapter(next(n for n in files if n != name))  # switch from another method's adapter
    multi.set_adapter(name)
    ids, mask = batch(seed=2)
    kwargs = dict(attention_mask=mask, eos_token_id=NO_EOS)
    seqs = multi.generate(ids, 6, **kwargs)
    reference = alone(base, files[name])
    assert torch.equal(seqs, reference.generate(ids, 6, **kwargs))
    assert not torch.equal(seqs, base.generate(ids, 6, **kwargs))
    if name in MERGES:
        SPECS[name][0].merge(reference)
        assert torch.equal(seqs, reference.generate(ids, 6, **kwargs))


# ---- combining LoRA adapters --------------------------------------------------------------------


def _three():
    """The tiny Llama and a MultiAdapter holding the three resident LoRA adapters (r 4, 2, 3)."""
    base = tiny_llama()
    names = ["lora_qv", "lora_mlp", "lora_ko"]
    multi = MultiAdapter(copy.deepcopy(base))
    for name in names:
        multi.add_adapter(name, trained(base, name))
    return base, multi, names


def _deltas(multi, name):
    return combine.delta_weights(multi.configs[name], multi.adapter_state_dict(name))


def test_cat_and_svd_are_the_weighted_sum_of_updates():
    """Task arithmetic: dW = sum_i w_i s_i B_i A_i in each layer, over the adapters that target it;
    "cat" is it exactly, "svd" is its best rank-k approximation (Eckart-Young), exact at k >= its rank."""
    base, multi, names = _three()
    weights = [1.0, -0.5, 0.7]
    expected: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights):
        for path, d in _deltas(multi, name).items():
            expected[path] = expected.get(path, 0) + w * d
    multi.add_weighted_adapter(names, weights, "cat", combination_type="cat")
    multi.add_weighted_adapter(names, weights, "svd6", combination_type="svd", svd_rank=6)  # v_proj: 4 + 2
    multi.add_weighted_adapter(names, weights, "svd2", combination_type="svd", svd_rank=2)
    config = multi.configs["cat"]
    assert (config.r, config.alpha, config.rslora) == (9, 9, False)
    assert set(config.targets) == {"q_proj", "v_proj", "up_proj", "down_proj", "k_proj", "o_proj"}
    for label in ("cat", "svd6", "svd2"):
        got = _deltas(multi, label)
        assert got.keys() == expected.keys()
        for path, d in expected.items():
            S = torch.linalg.svdvals(d)
            error = S[2:].square().sum().sqrt() if label == "svd2" else 0  # the smallest possible at rank 2
            assert abs(torch.linalg.norm(got[path] - d) - error) <= 1e-5, f"{label} {path}"
            assert label != "svd2" or "v_proj" not in path or error > 1e-2  # rank 2 does lose something there
    multi.add_weighted_adapter(["lora_mlp"], [0.5], "halved", combination_type="svd", svd_rank=1)
    one = multi.configs["halved"]
    assert one.r == 2  # a single adapter is always combined "linear" (svd_rank unused): exact, at its own rank
    for path, d in _deltas(multi, "halved").items():
        torch.testing.assert_close(d, 0.5 * _deltas(multi, "lora_mlp")[path], atol=1e-6, rtol=0)


def test_a_combined_adapter_saves_and_loads_like_any_lora(tmp_path):
    base, multi, names = _three()
    multi.add_weighted_adapter(names[:2], [0.6, 0.4], "mix", combination_type="cat")
    multi.save_adapter("mix", tmp_path / "mix.safetensors")
    multi.set_adapter("mix")
    ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(multi(ids), alone(base, tmp_path / "mix.safetensors")(ids))
        assert torch.allclose(multi(ids, adapter_names=["mix", "lora_qv", None, "mix"])[0], multi(ids)[0], atol=TOL)


def test_combination_refusals(tmp_path):
    base, multi, names = _three()
    multi.load_adapter(saved(base, ["dora"], tmp_path)["dora"], "dora")
    with pytest.raises(ValueError, match="needs adapters of one rank r, got"):
        multi.add_weighted_adapter(names, [1, 1, 1], "x", combination_type="linear")
    with pytest.raises(ValueError, match="'dora' is DoRA: combinations take LoRA adapters"):
        multi.add_weighted_adapter(["lora_qv", "dora"], [1, 1], "x")
    with pytest.raises(ValueError, match="unknown combination_type 'ties'; valid: svd, linear, cat"):
        multi.add_weighted_adapter(names, [1, 1, 1], "x", combination_type="ties")
    with pytest.raises(ValueError, match="svd_rank 40 is above"):
        multi.add_weighted_adapter(names, [1, 1, 1], "x", svd_rank=40)
    with pytest.raises(ValueError, match="2 weights for 3 adapters"):
        multi.add_weighted_adapter(names, [1, 1], "x")
    with pytest.raises(ValueError, match="already loaded"):
        multi.add_weighted_adapter(names, [1, 1, 1], "lora_qv")
    assert list(multi.configs) == [*names, "dora"]


PEFT_CASES = {  # name: combination kwargs, ranks of x and y
    "linear": (dict(combination_type="linear"), (2, 2)),
    "cat": (dict(combination_type="cat"), (4, 2)),
    "svd": (dict(combination_type="svd"), (4, 2)),
    "svd_rank3_clamp": (dict(combination_type="svd", svd_rank=3, svd_clamp=0.9), (4, 2)),
}


def _peft_pair(ranks, rslora=False):
    """(transformers' tiny Llama, peft's model of it holding LoRA adapters x and y, a MultiAdapter on our
    copy of it holding the same two), x and y perturbed and of different targets, r and alpha."""
    import peft

    hf = tiny_hf("llama")
    configs = {"x": dict(target_modules=["q_proj", "v_proj"], r=ranks[0], lora_alpha=8, use_rslora=rslora),
               "y": dict(target_modules=["v_proj", "up_proj", "down_proj"], r=ranks[1], lora_alpha=3)}
    torch.manual_seed(0)  # peft's initial A
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**configs["x"]), adapter_name="x")
    theirs.add_adapter("y", peft.LoraConfig(**configs["y"]))  # names without a letter of "lora_" (peft warns)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in sorted(theirs.named_parameters()):
            if ".lora_" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    state = theirs.state_dict()
    multi = MultiAdapter(Llama.from_hf(hf).eval())
    for name, c in configs.items():
        ours = lora.apply(Llama.from_hf(hf).eval(), c["target_modules"], r=c["r"], alpha=c["lora_alpha"],
                          rslora=c.get("use_rslora", False))
        lora.load_adapter_state_dict(ours, {k: state["base_model.model." + k.replace(".weight", f".{name}.weight")]
                                            for k in lora.adapter_state_dict(ours)})
        multi.add_adapter(name, ours)
    return hf, theirs, multi


def _peft_deltas(theirs, name):
    import peft

    return {n.removeprefix("base_model.model."): m.get_delta_weight(name) for n, m in theirs.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and name in m.lora_A}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_combinations_equal_peft_add_weighted_adapter(case):
    """Same adapters in peft and here (transformers' tiny Llama): the same new adapter's r and alpha,
    the same merged update of every layer, the same logits once it is active."""
    kwargs, ranks = PEFT_CASES[case]
    hf, theirs, multi = _peft_pair(ranks)
    weights = [0.8, -0.6]
    theirs.add_weighted_adapter(["x", "y"], weights, "xy", **kwargs)
    multi.add_weighted_adapter(["x", "y"], weights, "xy", **kwargs)
    config = theirs.peft_config["xy"]
    assert (multi.configs["xy"].r, multi.configs["xy"].alpha) == (config.r, config.lora_alpha)
    ours, peft_deltas = _deltas(multi, "xy"), _peft_deltas(theirs, "xy")
    assert ours.keys() == peft_deltas.keys()
    for path, d in peft_deltas.items():
        torch.testing.assert_close(ours[path], d, atol=1e-6, rtol=0, msg=path)
    theirs.set_adapter("xy")
    multi.set_adapter("xy")
    ids, mask = batch()
    with torch.no_grad():
        ref, base_out = theirs(input_ids=ids, attention_mask=mask).logits, hf(input_ids=ids, attention_mask=mask).logits
        real_tokens = mask.bool()
        diff = (multi(ids, mask) - ref)[real_tokens].abs().max()
    assert (ref - base_out)[real_tokens].abs().max() > 1e-2 and diff <= 1e-4


def test_with_an_rslora_adapter_first_peft_scales_the_combination_by_sqrt_r_and_we_do_not():
    """peft gives the new adapter the first one's use_rslora with alpha = r, so s = r / sqrt(r) = sqrt(r)
    instead of 1, although the weights and scalings are already inside A and B: its "cat" update is
    sqrt(r) (w_x dW_x + w_y dW_y). Ours has rslora=False, s = 1: the weighted sum itself."""
    _, theirs, multi = _peft_pair((4, 2), rslora=True)
    theirs.add_weighted_adapter(["x", "y"], [1.0, 1.0], "xy", combination_type="cat")
    multi.add_weighted_adapter(["x", "y"], [1.0, 1.0], "xy", combination_type="cat")
    x, y, ours, peft_deltas = _deltas(multi, "x"), _deltas(multi, "y"), _deltas(multi, "xy"), _peft_deltas(theirs, "xy")
    for path, d in ours.items():
        expected = x.get(path, 0) + y.get(path, 0)
        torch.testing.assert_close(d, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(peft_deltas[path], 6 ** 0.5 * expected, atol=1e-5, rtol=0)


# ---- the benchmark ------------------------------------------------------------------------------


def test_multi_adapter_benchmark_runs_and_checks_its_contestants(monkeypatch):
    """benchmarks/multi_adapter.py's `measure` on the tiny Llama: every contestant timed, after the mixed
    batch's tokens were checked against the swapped run's (it raises if they differ)."""
    bench = _script("multi_adapter", monkeypatch)
    base = tiny_llama()
    ids, mask = batch(rows=8)
    rows = bench.measure(base, ids, mask, n_adapters=4, r=2, new_tokens=3, repeats=1)
    assert {r["contestant"] for r in rows} >= {"mixed batch", "swap per group"}
    assert all(r["seconds"] > 0 and r["tokens_per_second"] > 0 for r in rows)


# ---- SmolLM2 ------------------------------------------------------------------------------------


@pytest.mark.real_models
def test_smollm2_mixed_batch_completes_each_prompt_as_its_adapter_alone(smollm2, tmp_path):
    """4 LoRA adapters (r 4 to 16, different targets) and the base model, in one batch of 6 prompts:
    every completion equals that prompt completed alone with its adapter alone, word for word."""
    from pefttutor import data, generation

    model, tok = smollm2  # a session fixture: it must come back as the base model
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    settings = {"qv": dict(targets=("q_proj", "v_proj"), r=8, alpha=16),
                "qkvo": dict(targets=("q_proj", "k_proj", "v_proj", "o_proj"), r=4, alpha=8, rslora=True),
                "mlp": dict(targets=("gate_proj", "up_proj", "down_proj"), r=16, alpha=16),
                "o": dict(targets=("o_proj",), r=8, alpha=32)}
    files = {}
    for i, (name, s) in enumerate(settings.items()):
        torch.manual_seed(i)  # lora_A's initial values
        lora.apply(model, **s)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in lora.trainable(model).items():
                if ".lora_B." in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        files[name] = tmp_path / f"{name}.safetensors"
        lora.save(model, files[name])
        lora.remove(model)
    multi = MultiAdapter(model)
    for name, file in files.items():
        multi.load_adapter(file, name)
    prompts = [data.restaurant_prompt(mr) for mr in (
        "name[The Eagle], food[French]", "name[Zizzi], eatType[pub], area[riverside]", "name[Bibimbap House]",
        "name[Aromi], food[Italian], priceRange[cheap]", "name[The Punter], area[city centre]", "name[Cotto]")]
    names = ["qv", "mlp", None, "qkvo", "o", "qv"]
    try:
        mixed = multi.complete(tok, prompts, 10, adapter_names=names)
        alone_out = []
        for prompt, name in zip(prompts, names):
            if name is not None:
                lora.load(model, files[name])
            alone_out += generation.complete(model, tok, [prompt], 10)
            if name is not None:
                lora.remove(model)
        base_out = generation.complete(model, tok, prompts, 10)
    finally:
        multi.set_adapter(None)
    assert mixed == alone_out and all(mixed)
    assert sum(a != b for a, b in zip(mixed, base_out)) >= 4  # the adapters change what most rows say
    state = model.state_dict()
    assert not applied(model) and list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)
