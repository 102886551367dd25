import json

import torch
from safetensors.torch import save_file
from torch import nn

from pefttutor import compare


def test_cached_runs_once_per_config(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTTUTOR_RECOMPUTE", raising=False)
    calls = []

    def run():
        calls.append(1)
        return {"accuracy": 0.5 + 0.1 * len(calls)}

    a = compare.cached({"method": "lora", "r": 8, "targets": ("q", "v")}, run, tmp_path)
    b = compare.cached({"targets": ["q", "v"], "r": 8, "method": "lora"}, run, tmp_path)  # same config
    assert a == b == {"accuracy": 0.6} and len(calls) == 1
    c = compare.cached({"method": "lora", "r": 4, "targets": ("q", "v")}, run, tmp_path)
    assert c == {"accuracy": 0.7} and len(calls) == 2
    monkeypatch.setenv("PEFTTUTOR_RECOMPUTE", "1")
    assert compare.cached({"method": "lora", "r": 4, "targets": ("q", "v")}, run, tmp_path) == {"accuracy": 0.8}
    assert not list(tmp_path.glob(".*.tmp"))
    stored = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(stored) == {"config", "result"}


def test_cached_checks_the_stored_config(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTTUTOR_RECOMPUTE", raising=False)
    config = {"seed": 0}
    path = tmp_path / f"{compare.key_of(config)}.json"
    path.write_text(json.dumps({"config": {"seed": 1}, "result": {"x": 1}}))  # as if hashes collided
    assert compare.cached(config, lambda: {"x": 2}, tmp_path) == {"x": 2}


def test_latency_and_file_size():
    model = nn.Sequential(nn.Linear(8, 8)).train()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m(x)

    lat = compare.latency_ms(Wrap().train(), {"x": torch.randn(4, 8), "labels": torch.zeros(4)}, repeats=3)
    assert 0 < lat["min"] <= lat["median"] <= lat["max"]
    size = compare.file_bytes(lambda m, p: save_file({"w": m[0].weight.detach()}, p), model)
    assert 8 * 8 * 4 < size < 8 * 8 * 4 + 1024  # the tensor plus a small header


def test_mean_std_and_pareto():
    assert compare.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert compare.mean_std([5.0]) == (5.0, 0.0)
    pts = [(100, 0.7), (10, 0.6), (1000, 0.65), (10, 0.5), (5000, 0.8)]
    assert compare.pareto_front(pts) == [1, 0, 4]
