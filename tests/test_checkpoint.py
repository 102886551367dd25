"""The adapter-file helpers every method shares: header round trip, refusals naming the file, strict loading,
file modes, concurrent saves."""

import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def test_load_strict_refuses_other_dtypes_but_converts_floats():
    own = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"wrong dtypes: a \(file torch.int64, model torch.float32\)$"):
        checkpoint.load_strict(own, {"a": torch.ones(2, dtype=torch.int64), "b": torch.ones(2)})
    assert not own["b"].any()  # nothing copied
    bf16 = {"a": torch.zeros(2, dtype=torch.bfloat16)}
    checkpoint.load_strict(bf16, {"a": torch.full((2,), 0.5)})  # an fp32 file into a bf16 model
    assert bf16["a"].dtype == torch.bfloat16 and bf16["a"].tolist() == [0.5, 0.5]


@pytest.fixture
def umask():
    """A umask other than the usual 022 for the test: written files must follow it."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_save_writes_files_with_the_mode_of_a_plain_open(tmp_path, umask):
    path = tmp_path / "a.safetensors"
    checkpoint.save({"w": torch.zeros(1)}, path, HEADER)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # 0640 here; 0644 under umask 022


def test_threads_saving_one_path_never_collide(tmp_path):
    path = tmp_path / "a.safetensors"
    start = threading.Barrier(4)

    def save_often(value):
        start.wait()
        for _ in range(50):
            checkpoint.save({"w": torch.full((1000,), float(value))}, path, HEADER)

    with ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(save_often, v) for v in range(4)]:
            done.result()  # re-raises a thread's error
    _, tensors = checkpoint.read(path)
    assert torch.equal(tensors["w"], tensors["w"][:1].expand(1000))  # one save's tensor, whole
    assert list(tmp_path.iterdir()) == [path]


def _unreadable(path):
    path.write_text("x")
    path.chmod(0)
    try:
        open(path).close()
    except PermissionError:
        return
    pytest.skip("this user reads files without read permission (root)")


@pytest.mark.parametrize("make, error, says", [
    (lambda path: None, FileNotFoundError, "does not exist"),
    (Path.mkdir, IsADirectoryError, "is a directory"),  # safetensors says "No such device"
    (_unreadable, PermissionError, r"is not readable \(permission denied\)"),  # safetensors says "No such file"
], ids=["missing", "directory", "unreadable"])
def test_a_path_that_is_not_a_readable_file_says_what_is_wrong(tmp_path, make, error, says):
    path = tmp_path / "a.safetensors"
    make(path)
    with pytest.raises(error, match=f"{path} {says}"):
        checkpoint.read(path)
