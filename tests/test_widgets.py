"""The notebooks' widgets, driven as a reader would: set controls, check what the picture shows.

Each panel's numbers must be those of the functions it stands for (the calculator's, the study's
JSON files, a brute-force attention computation), and its static picture must follow its state.
"""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_bert, tiny_llama

from pefttutor import attention_maps, widgets
from pefttutor import calculator as calc
from pefttutor.config import repo_root
from pefttutor.methods import prefix_tuning
from pefttutor.models.llama import LlamaAttention, apply_rotary
from pefttutor.widgets import calculator as calculator_module
from pefttutor.widgets import panel as panel_module


def shown(panel):
    return {name for name, c in panel.controls.items() if c.layout.display != "none"}


# --- the static picture ---------------------------------------------------------------------------


class FakeHandle:
    def __init__(self, output):
        self.outputs = [output]

    def update(self, output):
        self.outputs.append(output)


def test_a_displayed_panel_leaves_its_picture_as_plain_outputs_that_follow_the_controls(monkeypatch):
    displayed = []

    def display(obj, display_id=False):
        displayed.append(obj)
        return FakeHandle(obj) if display_id else None

    monkeypatch.setattr(panel_module, "display", display)
    panel = widgets.calculator_panel()
    panel._ipython_display_()
    widget, html, picture = displayed
    assert widget is panel.widget
    assert html.data == panel.html and picture.data == panel.png
    assert picture.data.startswith(b"\x89PNG") and widgets.calculator_panel().png == panel.png  # reproducible
    handles = panel._handles[0]
    panel.controls["r"].value = 64
    assert [h.outputs[-1].data for h in handles] == [panel.html, panel.png]
    assert f"{calc.peft_params('llama-7b', 'lora', r=64):,}" in handles[0].outputs[-1].data
    assert handles[1].outputs[-1].data != handles[1].outputs[0].data  # a new picture


# --- the SVD explorer (05) ------------------------------------------------------------------------


def low_rank(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def report(W, r):
    S2 = torch.linalg.svdvals(W.double()) ** 2
    energy = (S2[:r].sum() / S2.sum()).item()
    return {"params": r * sum(W.shape), "params %": round(100 * r * sum(W.shape) / W.numel(), 2),
            "energy": round(energy, 4), "error": round(max(0.0, 1 - energy) ** 0.5, 4)}


def test_svd_explorer_shows_the_report_and_the_three_corners():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(96, 4, generator=g) @ torch.randn(4, 80, generator=g)  # rank 4
    matrices = {"A": torch.randn(96, 80, generator=g), "B": low}
    panel = widgets.svd_explorer(matrices, low_rank, report)
    for matrix, r in (("A", 8), ("A", 3), ("B", 3), ("B", 50)):
        panel.set(matrix=matrix, r=r)
        W, W_r = matrices[matrix], low_rank(matrices[matrix], r)
        assert panel.state["report"] == report(W, r)
        assert f"relative error {report(W, r)['error']:.3f}" in panel.html
        images = [ax.get_images()[0].get_array() for ax in panel.figure.axes]
        for image, M in zip(images, (W, W_r, W - W_r)):
            np.testing.assert_allclose(image, M[:64, :64].numpy(), atol=1e-6)
    assert panel.state["report"]["error"] < 1e-3  # B has rank 4


# --- the calculator (06) --------------------------------------------------------------------------

SETTINGS = [  # (arch, method, hyperparameters, dtype, optimizer, batch, sequence)
    ("gpt3-175b", "lora", {"r": 4, "targets": ("q", "v")}, "bf16", "adamw", 1, 2048),
    ("llama-7b", "qlora", {"r": 16, "targets": tuple(calc.LINEARS), "double_quant": False}, "bf16", "adamw", 4, 512),
    ("llama-7b", "dora", {"r": 8, "targets": ("q", "k", "v", "o")}, "fp32", "sgd", 2, 256),
    ("roberta-base", "adapters", {"size": 16, "placement": "pfeiffer"}, "fp32", "adamw", 32, 128),
    ("smollm2-135m", "prefix_tuning", {"n_tokens": 30, "reparam": True, "hidden": 256}, "bf16", "momentum", 8, 64),
    ("smollm2-135m", "prefix_tuning", {"n_tokens": 10, "reparam": False}, "bf16", "adamw", 8, 64),
    ("minilm", "prompt_tuning", {"n_tokens": 50}, "fp32", "adamw", 16, 64),
    ("llama-7b", "llama_adapter", {"n_tokens": 10, "n_layers": 30}, "fp16", "adamw", 1, 512),
    ("minilm", "ia3", {"targets": ("k", "v", "down")}, "fp32", "adamw", 16, 64),
    ("llama-65b", "full", {}, "bf16", "adamw", 1, 1024),
]


def cells(html):
    """The HTML table's rows, each the text of its cells."""
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", html)]


@pytest.mark.parametrize("arch, method, hparams, dtype, optimizer, batch, seq", SETTINGS,
                         ids=[f"{s[1]}-{s[0]}" for s in SETTINGS])
def test_calculator_panel_shows_the_calculators_numbers(arch, method, hparams, dtype, optimizer, batch, seq):
    panel = widgets.calculator_panel()
    panel.set(arch=arch, method=method, dtype=dtype, optimizer=optimizer, batch_size=batch, seq_len=seq, **hparams)
    own = set(calc.HPARAMS[method]) - {"feedforward"} - ({"hidden"} if not hparams.get("reparam", True) else set())
    assert shown(panel) == {*calculator_module.COMMON, *own}  # only the controls the method uses
    setting = {"dtype": dtype, "optimizer": optimizer, "batch_size": batch, "seq_len": seq}
    expected = calc.training_memory(arch, method, **setting, **hparams)
    full = calc.training_memory(arch, "full", **setting)
    assert panel.state["trainable"] == calc.peft_params(arch, method, **hparams)
    assert panel.state["memory"] == expected and panel.state["full finetuning"] == full
    b = calc.BYTES_PER_VALUE[dtype]
    assert expected["activations (estimate)"] == calc.activation_memory_bytes(arch, batch, seq, b)
    if method == "qlora":
        frozen = calc.quantized_bytes(arch, hparams["targets"], False, dtype)
        assert expected["weights"] == frozen + b * panel.state["trainable"]
        assert f"{calc.bits_per_parameter(False):.3f} bits per weight" in panel.html
    columns = [expected] if method == "full" else [expected, full]
    rows = {row[0]: row[1:] for row in cells(panel.html)[2:]}
    for part in expected:
        for text, memory in zip(rows[f"{part}, GB"], columns):
            assert float(text.replace(",", "")) == pytest.approx(calc.gb(memory[part]), rel=5e-3, abs=1e-9)
    bars = {c.get_label(): [bar.get_width() for bar in c] for c in panel.figure.axes[0].containers}
    assert list(bars) == [part for part in expected if part != "total"]
    for part, widths in bars.items():
        assert widths == pytest.approx([calc.gb(m[part]) for m in columns])


def test_calculator_follows_the_architecture_and_says_what_it_cannot_count():
    panel = widgets.calculator_panel(arch="llama-7b")
    panel.set(targets=("q", "gate"), method="llama_adapter")
    assert panel.controls["n_layers"].value == 32  # every layer
    panel.set(arch="minilm")  # BERT: no gate matrix, 6 layers
    assert panel.controls["targets"].options == tuple(calc.block_linears("minilm"))
    assert panel.controls["targets"].value == ("q",)
    assert panel.controls["n_layers"].max == panel.controls["n_layers"].value == 6
    assert panel.state["trainable"] == calc.peft_params("minilm", "llama_adapter", n_tokens=20, n_layers=6)
    panel.set(method="lora", targets=())
    assert panel.state is None and panel.figure is None and "no targets given" in panel.html


# --- the learning curves (06) ---------------------------------------------------------------------


def committed_runs():
    runs = {}
    for path in sorted((repo_root() / "results").glob("*/final/*.json")):
        record = json.loads(path.read_text())
        if record["loss_curve"]:
            runs[record["config"]["id"]] = record
    return runs


def test_learning_curves_draw_the_committed_json_data():
    runs = committed_runs()
    panel = widgets.learning_curves()
    seen = set()
    for task in panel.controls["task"].options:
        panel.set(task=task)
        panel.set(methods=panel.controls["methods"].options)  # all of the task's
        for x in ("step", "time"):
            for y in ("validation", "train"):
                panel.set(x=x, y=y, smooth=1)
                lines = {line.get_gid(): line for line in panel.figure.axes[0].lines}
                assert {r for r in runs if r.startswith(f"{task}/")} == set(lines)
                for run_id, line in lines.items():
                    r = runs[run_id]
                    per_step = r["cost"]["median_step_s"] if x == "time" else 1
                    if y == "validation":
                        steps = [s for s, _ in r["validation_curve"]]
                        ys = [m[r["metric"]] for _, m in r["validation_curve"]]
                    else:
                        steps, ys = list(range(1, len(r["loss_curve"]) + 1)), r["loss_curve"]
                    np.testing.assert_allclose(line.get_xdata(), np.array(steps) * per_step)
                    np.testing.assert_allclose(line.get_ydata(), ys)
                    seen.add(run_id)
        assert ("estimated" in panel.html) == (panel.controls["x"].value == "time")
    assert seen == set(runs)


def test_learning_curves_smooth_the_train_loss_and_keep_methods_across_tasks(tmp_path):
    def record(task, name, seed, losses, validation):
        folder = tmp_path / task / "final"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}_s{seed}.json").write_text(json.dumps({
            "config": {"id": f"{task}/final/{name}_s{seed}", "task": task, "group": "final", "name": name,
                       "seed": seed},
            "metric": "accuracy", "loss_curve": losses, "validation_curve": validation,
            "cost": {"median_step_s": 0.5}}))

    losses = [1.0, 0.0, 2.0, 4.0, 3.0]
    record("minilm-tweets", "lora-qv", 0, losses, [[2, {"accuracy": 0.5}], [4, {"accuracy": 0.7}]])
    record("minilm-tweets", "full", 1, losses, [[2, {"accuracy": 0.6}]])
    record("minilm-tweets", "features", 0, [], [])  # no curve: not offered
    record("smollm2-restaurants", "lora", 0, losses, [[5, {"accuracy": 0.1}]])
    panel = widgets.learning_curves(methods=("lora-qv",), folder=tmp_path)
    assert panel.controls["methods"].options == ("full", "lora-qv")  # the study's order
    assert panel.controls["methods"].value == ("lora-qv",)
    assert "smooth" not in shown(panel)
    panel.set(y="train", smooth=2)
    assert "smooth" in shown(panel)
    np.testing.assert_allclose(panel.figure.axes[0].lines[0].get_ydata(), [1.0, 0.5, 1.0, 3.0, 3.5])
    panel.set(task="smollm2-restaurants")
    assert panel.controls["methods"].value == ("lora",)  # lora-qv is not there: its first methods
    panel.set(task="minilm-tweets", methods=("full",))  # the task's methods are offered before choosing
    assert [line.get_gid() for line in panel.figure.axes[0].lines] == ["minilm-tweets/final/full_s1"]
    panel.set(task="smollm2-restaurants")
    panel.set(task="minilm-tweets")
    assert panel.controls["methods"].value == ("lora-qv",)


# --- attention on the prefix (03) -----------------------------------------------------------------


def brute_force_prefix_mass(model, ids, mask):
    """(B, L, H, T): each layer's attention on its prefix, by hand from the layer's input, one
    query at a time: q and k from the frozen projections (rotary for Llama), the prefix keys in
    front, a softmax over the visible keys (the prefix always, real tokens unpadded and, for
    Llama, not in the future)."""
    layers = prefix_tuning.attention_layers(model)
    inputs = []
    hooks = [a.register_forward_pre_hook(lambda module, args: inputs.append(args)) for a in layers]
    with torch.no_grad():
        model(ids, mask)
        for h in hooks:
            h.remove()
        out = torch.zeros(ids.shape[0], len(layers), layers[0].n_heads, ids.shape[1])
        for l, (attn, args) in enumerate(zip(layers, inputs)):
            x, (B, T, _) = args[0], args[0].shape
            H, Hkv, hd = attn.n_heads, attn.n_kv, attn.hd
            causal = isinstance(attn, LlamaAttention)
            q, k = (attn.q_proj(x), attn.k_proj(x)) if causal else (attn.query(x), attn.key(x))
            q, k = q.view(B, T, H, hd).transpose(1, 2), k.view(B, T, Hkv, hd).transpose(1, 2)
            pk, _ = attn.peft["prefix_tuning"].kv_prefix(B)
            P = pk.shape[2]
            if causal:
                cos, sin = args[1](P)  # the model's rope positions: the real tokens start at P
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            for b in range(B):
                for h in range(H):
                    keys = torch.cat([pk[b, h // (H // Hkv)], k[b, h // (H // Hkv)]]).double()  # (P + T, hd)
                    for t in range(T):
                        real = [bool(mask[b, j]) and (j <= t or not causal) for j in range(T)]
                        visible = torch.tensor([True] * P + real)
                        e = torch.exp(keys @ q[b, h, t].double() / hd**0.5) * visible
                        out[b, l, h, t] = (e[:P].sum() / e.sum()).item()
    return out


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_prefix_mass_equals_brute_force_on_a_padded_batch(family):
    model = tiny_llama() if family == "llama" else tiny_bert()
    prefix_tuning.apply(model, n_tokens=3, reparam=False)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if family == "llama":
        mask[1, :2] = 0  # left padding
    else:
        mask[1, 4:] = 0  # right padding
    prefix, real = attention_maps.prefix_mass(model, ids, mask)
    expected = brute_force_prefix_mass(model, ids, mask)
    rows = mask.bool()[:, None, None, :].expand_as(prefix)  # real query tokens
    torch.testing.assert_close(prefix[rows], expected[rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefix + real, torch.ones_like(prefix))


@pytest.mark.parametrize("gqa, causal, mask", [(False, False, False), (True, True, False), (True, False, True)])
def test_recorded_weights_are_what_sdpa_multiplies_the_values_by(gqa, causal, mask):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)  # (B, H, T, hd)
    k, v = torch.randn(2, 2, 2 if gqa else 4, 5, 8, generator=g)  # (B, Hkv, S, hd) each
    kwargs = {"is_causal": causal, "enable_gqa": gqa}
    if mask:
        kwargs["attn_mask"] = torch.rand(2, 1, 5, 5, generator=g) > 0.3
        kwargs["attn_mask"][..., 0] = True  # every query sees a key
    with attention_maps.AttentionRecorder() as recorder:
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    (weights,) = recorder.weights
    torch.testing.assert_close(weights @ (v.repeat_interleave(2, dim=1) if gqa else v), out)
    with pytest.raises(ValueError, match="eval mode"):
        attention_maps.sdpa_weights(q, k, v, dropout_p=0.1)


def test_prefix_mass_needs_a_prefix():
    with pytest.raises(ValueError, match="prefix tuning"):
        attention_maps.prefix_mass(tiny_llama(), torch.ones(1, 4, dtype=torch.long))


class CharTokenizer:
    """A stand-in tokenizer: one token per character."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[ord(c) % 64 for c in text]])}

    def decode(self, ids):
        return "".join(chr(c) for c in ids)


def test_prefix_attention_viewer_shows_brute_force_masses_per_example_and_layer():
    model = prefix_tuning.apply(tiny_llama(num_hidden_layers=3), n_tokens=4, reparam=False)
    examples = {"short": "abcde", "longer": "hello world"}
    panel = widgets.prefix_attention_viewer(model, CharTokenizer(), examples)
    for example, text in examples.items():
        ids = CharTokenizer()(text)["input_ids"]
        expected = brute_force_prefix_mass(model, ids, torch.ones_like(ids))[0]  # (L, H, T)
        for layer in (0, 2):
            panel.set(example=example, layer=layer)
            s = panel.state
            torch.testing.assert_close(s["prefix"], expected.mean(-1), atol=1e-5, rtol=0)
            torch.testing.assert_close(s["prefix"] + s["real"], torch.ones_like(s["prefix"]))
            torch.testing.assert_close(s["per token"], expected[layer], atol=1e-5, rtol=0)
            assert s["tokens"] == [CharTokenizer().decode([i]) for i in ids[0].tolist()]
            by_layer, by_token = (ax.get_images()[0].get_array() for ax in panel.figure.axes[:2])
            np.testing.assert_allclose(by_layer, s["prefix"].numpy())
            np.testing.assert_allclose(by_token, s["per token"].numpy())
            assert f"layer {layer}: {s['prefix'][layer].mean():.1%}" in panel.html
