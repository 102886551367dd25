"""The adapter-file helpers every method shares: header round trip, refusals naming the file, strict loading."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pefttutor import checkpoint

HEADER = {"method": "m", "config": {"n": 2, "names": ["q", "v"]}, "base": {"shapes": "abc"}}


def test_round_trip_keeps_tensors_and_header(tmp_path):
    path = tmp_path / "a.safetensors"
    checkpoint.save({"w": torch.arange(3.0)}, path, HEADER)
    header, tensors = checkpoint.read(path)
    assert header == HEADER and torch.equal(tensors["w"], torch.arange(3.0))
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away


@pytest.mark.parametrize("metadata, message", [
    (None, "not a pefttutor adapter file"),
    ({"pefttutor": "{oops"}, "header is not valid JSON"),
    ({"pefttutor": json.dumps([1, 2])}, "must be a JSON object with"),
    ({"pefttutor": json.dumps({"method": "m", "config": {}})}, "must be a JSON object with"),
])
def test_other_files_are_refused_naming_the_file(tmp_path, metadata, message):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata=metadata)
    with pytest.raises(ValueError, match=message) as err:
        checkpoint.read(path)
    assert str(path) in str(err.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not safetensors")
    with pytest.raises(ValueError, match=f"{junk} is not a readable safetensors file"):
        checkpoint.read(junk)


def test_load_strict_copies_all_or_nothing():
    own = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"missing keys: b; unexpected keys: c; wrong shapes: a \(file \(3,\), model \(2,\)\)"):
        checkpoint.load_strict(own, {"a": torch.ones(3), "c": torch.ones(1)})
    assert not own["a"].any() and not own["b"].any()  # nothing copied
    checkpoint.load_strict(own, {"x.a": torch.ones(2), "x.b": torch.ones(3)}, prefix="x.")
    assert own["a"].all() and own["b"].all()
