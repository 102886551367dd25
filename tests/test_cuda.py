"""Device-agnostic code, checked on a GPU: every method built on CUDA behaves as on the CPU.

Skipped without CUDA (CI has none); run where a GPU is present: `pytest tests/test_cuda.py`.
"""

import copy

import pytest
import torch

from pefttutor import compare, methods, train
from pefttutor.methods import adapters, llama_adapter, lora, prefix_tuning, prompt_tuning
from pefttutor.models.bert import Bert, BertClassifier, BertConfig
from pefttutor.models.llama import Llama, LlamaConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LLAMA = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
BERT = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=64)
METHODS = {  # name -> apply on a model (any device), with nonzero trainable values so the method matters
    "lora": lambda m: lora.apply(m, ("q_proj", "v_proj") if isinstance(m, Llama) else ("query", "value"), r=4),
    "prompt_tuning": lambda m: prompt_tuning.apply(m, 5),
    "prefix_tuning": lambda m: prefix_tuning.apply(m, 5, reparam=True, hidden=16),
    "adapters": lambda m: adapters.apply(m, 8, "houlsby"),
    "llama_adapter": lambda m: llama_adapter.apply(m, n_tokens=4, init_gate=0.5),
}


@pytest.fixture(autouse=True)
def exact_float32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _perturb(model):
    """Make every trainable tensor nonzero and random (B of LoRA, gates, ...)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g).to(p.device))
    return model


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_cuda_equals_cpu(method, family, tmp_path):
    if method == "llama_adapter" and family == "bert":
        pytest.skip("LLaMA-Adapter is for Llama")
    torch.manual_seed(0)
    base = Llama(LLAMA).eval() if family == "llama" else Bert(BERT).eval()
    cpu = _perturb(METHODS[method](copy.deepcopy(base)))
    methods.get(method).save(cpu, tmp_path / "a.safetensors")
    gpu = METHODS[method](copy.deepcopy(base).cuda())  # applied on the GPU: new tensors must land there
    methods.get(method).load(gpu, tmp_path / "a.safetensors")
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    if family == "bert":
        mask = mask.flip(1)  # encoders pad on the right
    with torch.no_grad():
        want = cpu(ids, attention_mask=mask)
        got = gpu(ids.cuda(), attention_mask=mask.cuda()).cpu()
    assert (got - want).abs().max() < 1e-4
    if family == "llama":
        out_cpu = cpu.generate(ids[:1], 5)
        out_gpu = gpu.generate(ids[:1].cuda(), 5).cpu()
        assert torch.equal(out_cpu, out_gpu)


def test_training_step_and_measurements_on_cuda():
    torch.manual_seed(0)
    model = BertClassifier(Bert(BERT), num_classes=3).cuda()
    lora.apply(model, ("query", "value"), r=4, train="classifier")
    batch = {"input_ids": torch.randint(0, 64, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long),
             "labels": torch.randint(0, 3, (8,))}
    result = train.train(model, [batch], train.classification_loss, steps=3, lr=1e-2, progress=False)
    assert result.peak_memory_mb > 0 and len(result.loss_curve) == 3
    assert next(model.parameters()).device.type == "cuda"
    lat = compare.latency_ms(model, batch, repeats=3)
    assert 0 < lat["min"] <= lat["median"]


def test_a_tiny_study_runs_on_cuda(tmp_path, monkeypatch):
    """The study runner on CUDA, unchanged: a sweep run and the final run it chooses the rate for,
    both tasks' protocols (fast mode), bf16 autocast, provenance naming the GPU."""
    from pefttutor.study import runner

    monkeypatch.setenv("PEFTTUTOR_FAST", "1")
    monkeypatch.setattr(runner, "MAX_EXTENSIONS", 0)
    spec = {"method": "lora", "targets": ["query", "value"], "r": 4, "alpha": 8}
    exps = [{"id": "minilm-tweets/sweep/lora_lr1e-02_s0", "task": "minilm-tweets", "group": "sweep", "name": "lora",
             "spec": spec, "lr": 1e-2, "seed": 0, "epochs": 0.5, "autocast": "bf16"},
            {"id": "minilm-tweets/final/lora_s0", "task": "minilm-tweets", "group": "final", "name": "lora",
             "spec": spec, "lr": "sweep", "seed": 0, "epochs": 1, "autocast": "bf16"},
            {"id": "smollm2-restaurants/final/lora_s0", "task": "smollm2-restaurants", "group": "final",
             "name": "lora", "spec": {**spec, "targets": ["q_proj", "v_proj"]}, "lr": 2e-3, "seed": 0, "epochs": None,
             "autocast": "bf16"}]
    device = torch.device("cuda")
    assert runner.run_study(exps, exps, tmp_path, device, log=lambda s: None)["ran"] == 3
    for e in exps:
        record = runner.read(e["id"], tmp_path)
        assert record["provenance"]["device"] == "cuda" and record["provenance"]["device_name"]
        assert record["cost"]["peak_memory_mb"] > 0 and record["steps"] >= 1
