"""benchmarks/quantization.py's measurements on a tiny Llama (the script itself runs on SmolLM2)."""

import copy
import importlib.util

import pytest
import torch

from pefttutor import calculator, params, quant, quantized, train
from pefttutor.config import repo_root
from pefttutor.methods import lora, qlora
from tests.tiny_models import LLAMA, tiny_llama

pytest.importorskip("peft")  # harness.machine names the peft version


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(repo_root() / "benchmarks"))  # it imports harness from its folder
        spec = importlib.util.spec_from_file_location("quantization", repo_root() / "benchmarks" / "quantization.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module


def test_errors_and_storage_of_every_format(bench, tmp_path):
    model = tiny_llama()
    models = {name: quantized.quantize_model(copy.deepcopy(model), quantized.DECODER, t, dq)
              for name, (t, dq) in bench.FORMATS.items()}
    errors = bench.weight_errors(model, models)
    assert errors["weights"] == LLAMA.num_hidden_layers * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48)
    formats = errors["formats"]
    assert set(formats) == {"nf4", "nf4+dq", "fp4", "fp4+dq", "int4", "int4+dq"}
    assert all(0 < e["mean_abs_error_rel"] < e["rms_error_rel"] < 0.3 for e in formats.values())
    assert formats["nf4"]["rms_error_rel"] < min(formats["fp4"]["rms_error_rel"], formats["int4"]["rms_error_rel"])
    W = [m.weight.detach() for m in params.find_modules(model, quantized.DECODER).values()]
    E = torch.cat([(quant.dequantize(*quant.quantize(w, "int4", True)) - w).reshape(-1) for w in W]).double()
    rms = torch.cat([w.reshape(-1) for w in W]).double().pow(2).mean().sqrt()
    assert formats["int4+dq"]["rms_error_rel"] == pytest.approx(float(E.pow(2).mean().sqrt() / rms), rel=1e-9)
    assert formats["int4+dq"]["mean_abs_error_rel"] == pytest.approx(float(E.abs().mean() / rms), rel=1e-9)
    arch = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "ffn": 48, "vocab": 64, "tied": False}
    for name, dq in (("nf4", False), ("nf4+dq", True)):
        s = bench.storage(model, models[name])
        assert s["model_bytes"] == calculator.quantized_bytes(arch, double_quant=dq)
        assert s["model_bytes_fp32"] == 4 * calculator.total_params(arch) > 3 * s["model_bytes"]
        assert s["bits_per_parameter"] == 8 * s["linear_bytes_4bit"] / (s["linear_bytes_fp32"] / 4)
        assert s["file_bytes"] > s["model_bytes"]  # the tensors and a header
    assert bench.storage(model, models["nf4"])["bits_per_parameter"] == 4.5
    tied = tiny_llama(tie_word_embeddings=True)  # SmolLM2's LM head is its embedding matrix: counted once
    assert bench.model_bytes(tied) == 4 * calculator.total_params({**arch, "tied": True})


def test_step_times_train_both_models(bench):
    batch = {"input_ids": torch.randint(3, 64, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    models = {"lora": lora.apply(tiny_llama(), **bench.LORA),
              "qlora": qlora.apply(quantized.quantize_model(tiny_llama()), **bench.LORA)}
    before = {k: {n: p.clone() for n, p in m.named_parameters() if p.requires_grad} for k, m in models.items()}
    times = bench.step_times(models, [batch] * 3, train.causal_lm_loss)
    assert set(times) == {"lora", "qlora"} and all(t > 0 for t in times.values())
    for k, m in models.items():
        assert all(not torch.equal(p, before[k][n]) for n, p in m.named_parameters() if p.requires_grad)
    loss, seconds = bench.timed_loss(lambda m: 1.5, models["lora"])
    assert loss == 1.5 and seconds >= 0


def test_provenance_names_the_commit_and_the_machine(bench):
    p = bench.provenance()
    assert len(p["git_commit"]) == 40 and isinstance(p["git_dirty"], bool)
    assert {"cpu", "torch", "date"} <= p.keys()
