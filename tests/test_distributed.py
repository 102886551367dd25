"""`train(..., distributed=...)` under torchrun: 2 processes with B/2 rows each take the same steps
as 1 process with B rows (DDP and FSDP2, full finetuning and LoRA, tiny Bert and Llama, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distributed_worker import CASES  # noqa: E402 (tests/ is on sys.path under pytest)

from pefttutor import distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
# fp32 sums in another order (a gradient averaged over two halves, FSDP's shards): rounding only. Adam
# divides by sqrt(v), so a rounding-sized change in a tiny gradient can move a weight by a small
# fraction of lr = 1e-2 (measured: 1.5e-5 at most after 6 steps of full finetuning)
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-4


def _launch(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, *args], check=True, env=env, timeout=600, capture_output=True, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    _launch(str(WORKER), str(out), "--single")
    try:
        _launch("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(out))
    except subprocess.CalledProcessError as error:
        pytest.fail(f"torchrun failed:\n{error.stdout[-3000:]}\n{error.stderr[-3000:]}")
    return out


def _read(path: Path) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items() if k != "format"}
        return meta["loss_curve"], {k: f.get_tensor(k) for k in f.keys()}, meta


@pytest.mark.parametrize("family,method,how", CASES)
def test_two_processes_equal_one(runs, family, method, how):
    loss_1, weights_1, _ = _read(runs / f"{family}-{method}-single.safetensors")
    loss_2, weights_2, meta = _read(runs / f"{family}-{method}-{how}.safetensors")
    assert loss_1[-1] < loss_1[0]  # it trains at all
    assert torch.allclose(torch.tensor(loss_2), torch.tensor(loss_1), atol=LOSS_TOL, rtol=0), (loss_1, loss_2)
    assert weights_2.keys() == weights_1.keys()
    worst = max((weights_2[k] - weights_1[k]).abs().max().item() for k in weights_1)
    spread = max((weights_1[k] - weights_1[k].mean()).abs().max().item() for k in weights_1)
    assert worst < WEIGHT_TOL < spread, (worst, spread)  # and the weights are not all alike
    if how == "ddp":  # every step all-reduces exactly the trainable gradients, in fp32; each process holds all
        assert meta["allreduce"] == 4 * sum(w.numel() for w in weights_1.values())
        assert meta["local_bytes"] == meta["total_bytes"]
    else:  # each process holds half of every parameter (rows padded to an even count)
        assert meta["allreduce"] is None
        assert 0.5 * meta["total_bytes"] <= meta["local_bytes"] < 0.52 * meta["total_bytes"], meta


def test_unused_parameter_fails_clearly_and_the_fix_works(runs):
    report = json.loads((runs / "unused.json").read_text())
    assert "Expected to have finished reduction in the prior iteration" in report["ddp"]  # DDP's own failure
    assert "got no gradient" in report["ours"] and "spare.weight" in report["ours"] and "find_unused_parameters" in report["ours"]
    assert report["fixed_steps"] == 2


def test_shard_and_strategy_refuse_what_would_train_wrongly():
    batch = {"input_ids": torch.arange(12).view(6, 2), "n": 3}
    assert distributed.shard(batch, 1, 3)["input_ids"].tolist() == [[4, 5], [6, 7]]
    assert distributed.shard(batch, 1, 3)["n"] == 3
    with pytest.raises(ValueError, match="does not split evenly over 4"):
        distributed.shard(batch, 0, 4)
    with pytest.raises(ValueError, match=r"one of \('ddp', 'fsdp'\)"):
        distributed.Strategy("dp")
    with pytest.raises(ValueError, match="DDP's setting"):
        distributed.Strategy("fsdp", find_unused_parameters=True)


def test_without_torchrun_says_how_to_launch(monkeypatch):
    from pefttutor import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="torchrun"):
        train.train(model, [{"x": torch.ones(2, 2)}], lambda m, b: m(b["x"]).sum(), steps=1, device="cpu",
                    progress=False, distributed="ddp")
