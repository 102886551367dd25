"""The adapter-file helpers every method shares: config round trip, refusals with clear messages."""

import json
from dataclasses import asdict, dataclass

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pefttutor import checkpoint


@dataclass(frozen=True)
class Cfg:
    n: int
    names: tuple[str, ...] = ()


def test_round_trip_rebuilds_the_dataclass(tmp_path):
    path = tmp_path / "a.safetensors"
    checkpoint.save({"w": torch.arange(3.0)}, path, "test.key", asdict(Cfg(2, ("q", "v"))))
    config, tensors = checkpoint.read(path, "test.key", "test", Cfg)
    assert config == Cfg(2, ("q", "v"))  # the JSON list came back as a tuple
    assert torch.equal(tensors["w"], torch.arange(3.0))
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away


def test_other_files_and_unknown_settings_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match="not a pefttutor test file"):
        checkpoint.read(plain, "test.key", "test", Cfg)
    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.zeros(1)}, newer, metadata={"test.key": json.dumps({"n": 1, "gamma": 0.5})})
    with pytest.raises(ValueError, match=r"unknown test settings \['gamma'\]"):
        checkpoint.read(newer, "test.key", "test", Cfg)


def test_require_same_lists_every_difference():
    checkpoint.require_same(Cfg(2, ("q",)), Cfg(2, ("v",)), ("n",), "f", "test")  # names not compared
    with pytest.raises(ValueError, match=r"test config mismatch with f: n: model 2, file 3; names: model"):
        checkpoint.require_same(Cfg(2, ("q",)), Cfg(3, ("v",)), ("n", "names"), "f", "test")


def test_attached_config():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="call apply first"):
        checkpoint.attached_config(model, "test_config", Cfg, "call apply first")
    model.test_config = Cfg(1)
    assert checkpoint.attached_config(model, "test_config", Cfg, "") == Cfg(1)
