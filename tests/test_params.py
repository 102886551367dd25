import pytest
import torch
from torch import nn

from pefttutor import config, params


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "xq_proj": nn.Linear(4, 4)})
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight  # tied


def test_find_modules_matches_suffix_not_substring():
    found = params.find_modules(Toy(), ["q_proj"])
    assert list(found) == ["attn.q_proj"]


def test_find_modules_error_lists_valid_names():
    with pytest.raises(ValueError) as err:
        params.find_modules(Toy(), ["q_proj", "value"])
    message = str(err.value)
    assert "['value']" in message and "head" in message and "xq_proj" in message


def test_find_modules_needs_targets():
    with pytest.raises(ValueError):
        params.find_modules(Toy(), [])


def test_freeze_unfreeze_and_count_tied_once():
    model = params.freeze(Toy())
    assert params.count_parameters(model) == (0, 4 * 4 * 2 + 8 + 8 + 10 + 40)
    assert params.unfreeze(model, ["head"]) == ["head"]
    assert params.count_parameters(model)[0] == 10
    with pytest.raises(ValueError):
        params.unfreeze(model, ["nope"])
    assert "trainable 10 of" in params.trainable_summary(model)


def test_modes_and_seed(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTTUTOR_FAST", "1")
    assert config.is_fast() and config.full_or_fast(100, 5) == 5
    monkeypatch.setenv("PEFTTUTOR_FAST", "0")
    assert not config.is_fast() and config.full_or_fast(100, 5) == 100
    config.seed_everything(3)
    a = torch.rand(3)
    config.seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    monkeypatch.setenv("PEFTTUTOR_CACHE", str(tmp_path / "c"))
    assert config.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.setenv("PEFTTUTOR_DEVICE", "cpu")
    assert config.get_device() == torch.device("cpu")
