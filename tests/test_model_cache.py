"""The SmolLM2 conversion cache (models/loading.py) and `cache_dir()`, with the GGUF step faked.

The real conversion takes ~25 s; here the GGUF is a small file in tmp_path and `_convert_gguf`
returns a tiny random Llama with MiniLM's tokenizer, so a test takes well under a second (the one
starting four processes spends a few seconds importing torch in each).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch
import transformers

from pefttutor import config
from pefttutor.models import Llama, load_smollm2, loading

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
LOCK = f".{loading.SMOLLM2_CACHE}.lock"


def tiny_hf_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


@torch.no_grad()
def is_tiny(model):
    """Same logits as the tiny model on every token id: any changed weight shows."""
    ids = torch.arange(TINY["vocab_size"])[None]
    return torch.equal(model(ids), Llama.from_hf(tiny_hf_llama())(ids))


@pytest.fixture
def env(monkeypatch, tmp_path):
    """An empty cache root, a fake GGUF and a fake conversion; `calls` lists the conversions."""
    root, gguf = tmp_path / "cache", tmp_path / "pkg" / loading.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    monkeypatch.setenv("PEFTTUTOR_CACHE", str(root))
    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: gguf)
    tok = transformers.AutoTokenizer.from_pretrained(loading.minilm_dir())
    calls = []

    def convert(path):
        calls.append(path)
        return tiny_hf_llama(), tok

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    return SimpleNamespace(root=root, folder=root / loading.SMOLLM2_CACHE, gguf=gguf, calls=calls)


def whole(env):
    return loading._cache_problem(env.folder, loading._source_record(env.gguf)) is None


def disk_full(*args, **kwargs):
    raise OSError("disk full")


def overwrite(path, offset, data, mtime="kept"):
    """Replace bytes in place (same size); keep the mtime, or move it as a later write would."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + (10**9 if mtime == "moved" else 0)))


# ---------------------------------------------------------------- writing and reusing


def test_conversion_is_cached(env):
    env.root.mkdir()
    (env.root / f".{loading.SMOLLM2_CACHE}-k1ll3d").mkdir()  # the temp folder of a killed writer
    model, _ = load_smollm2(device="cpu")
    assert len(env.calls) == 1
    again, _ = load_smollm2(device="cpu")
    assert len(env.calls) == 1  # second call read the cache
    assert is_tiny(again) and again.lm_head.weight is again.model.embed_tokens.weight
    hf = loading.load_smollm2_hf(device="cpu")
    assert torch.equal(hf.lm_head.weight, again.lm_head.weight)
    assert "quantization_config" not in json.loads((env.folder / "config.json").read_text())
    files = json.loads((env.folder / loading.MANIFEST).read_text())["files"]  # all an older pefttutor checks
    assert files == {p.name: p.stat().st_size for p in env.folder.iterdir() if p.name != loading.MANIFEST}
    assert sorted(p.name for p in env.root.iterdir()) == [LOCK, loading.SMOLLM2_CACHE]  # no temp folders


@pytest.mark.parametrize("damage", ["no_manifest", "truncated", "stale_partial", "old_manifest"])
def test_partial_cache_is_not_used(env, damage):
    if damage == "stale_partial":  # e.g. an older, non-atomic writer died half-way
        env.folder.mkdir(parents=True)
        (env.folder / "config.json").write_text("{}")
    else:
        load_smollm2(device="cpu")
        manifest = env.folder / loading.MANIFEST
        if damage == "no_manifest":
            manifest.unlink()
        elif damage == "old_manifest":  # sizes only, as pefttutor wrote before: cannot be checked
            files = json.loads(manifest.read_text())["files"]
            manifest.write_text(json.dumps({"source": env.gguf.name, "source_size": env.gguf.stat().st_size,
                                            "files": files}))
        else:
            weights = env.folder / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
    model, _ = load_smollm2(device="cpu")
    assert len(env.calls) == (1 if damage == "stale_partial" else 2)
    assert is_tiny(model) and whole(env)


@pytest.mark.parametrize("damage", ["weights_header", "weights_nan", "weights_rewritten", "tokenizer"])
def test_same_size_corruption_is_rebuilt(env, monkeypatch, damage):
    """Before: NaN logits, or a raw SafetensorError / tokenizer JSON error with no hint to rebuild."""
    if damage == "weights_rewritten":  # the part no load hashes: found because the mtime moved
        monkeypatch.setattr(loading, "SAMPLE", 1024)
    load_smollm2(device="cpu")
    weights = env.folder / "model.safetensors"
    if damage == "weights_header":
        overwrite(weights, 10, b"#" * 8)  # the JSON header after its 8-byte length
    elif damage == "tokenizer":
        overwrite(env.folder / "tokenizer.json", 0, b"#")
    else:
        mtime = "moved" if damage == "weights_rewritten" else "kept"
        overwrite(weights, weights.stat().st_size // 2, b"\xff" * 64, mtime)  # NaNs in some weight
    model, _ = load_smollm2(device="cpu")
    assert len(env.calls) == 2
    assert is_tiny(model) and whole(env)


def test_touched_whole_cache_is_kept(env, monkeypatch):
    """A moved mtime (a copy without -p) costs a full hash, not a rebuild."""
    monkeypatch.setattr(loading, "SAMPLE", 1024)
    load_smollm2(device="cpu")
    weights = env.folder / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    model, _ = load_smollm2(device="cpu")
    assert len(env.calls) == 1 and is_tiny(model)


@pytest.mark.parametrize("change", ["size", "content"])
def test_another_gguf_rebuilds_the_cache(env, change):
    """Before: only the file sizes in the cache were compared, so a new GGUF reused the old cache."""
    load_smollm2(device="cpu")
    data = env.gguf.read_bytes()
    env.gguf.write_bytes(data + b"\0" if change == "size" else data[:-1] + b"\1")
    load_smollm2(device="cpu")
    assert len(env.calls) == 2 and whole(env)


# ---------------------------------------------------------------- failing safely


def test_failed_conversion_leaves_nothing(env, monkeypatch):
    monkeypatch.setattr(loading, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        load_smollm2(device="cpu")
    assert [p.name for p in env.root.iterdir()] == [LOCK]


def test_failed_rebuild_keeps_the_old_folder(env, monkeypatch):
    load_smollm2(device="cpu")
    before = {p.name: p.read_bytes() for p in env.folder.iterdir()}
    env.gguf.write_bytes(env.gguf.read_bytes() + b"\0")  # a new GGUF: the cache must be rebuilt
    monkeypatch.setattr(loading, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        load_smollm2(device="cpu")
    assert {p.name: p.read_bytes() for p in env.folder.iterdir()} == before
    assert sorted(p.name for p in env.root.iterdir()) == [LOCK, loading.SMOLLM2_CACHE]


@pytest.mark.parametrize("state", ["empty", "stale"])
def test_unwritable_cache_fails_before_converting(env, monkeypatch, state):
    """Before: found only when the (~25 s) conversion tried to write."""
    if state == "stale":
        load_smollm2(device="cpu")
        env.gguf.write_bytes(env.gguf.read_bytes() + b"\0")
    env.root.mkdir(exist_ok=True)
    env.root.chmod(0o555)

    def refuse(*args, dir=None, **kwargs):  # root ignores the mode: refuse as the kernel would for anyone else
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    try:
        with pytest.raises(PermissionError, match="is not writable .*set PEFTTUTOR_CACHE to a writable folder") as e:
            load_smollm2(device="cpu")
    finally:
        env.root.chmod(0o755)
    assert len(env.calls) == (0 if state == "empty" else 1)
    assert ("another GGUF" if state == "stale" else "does not exist yet") in str(e.value)
    assert (env.folder / loading.MANIFEST).exists() == (state == "stale")  # the old folder is left as it was


# ---------------------------------------------------------------- processes starting together

CHILD = """
import json, sys, time
from pathlib import Path
from types import SimpleNamespace as NS
import torch
from safetensors.torch import load_file
from pefttutor.models import loading

gguf, go, log = map(Path, sys.argv[1:])
WEIGHT = torch.arange(4096.0)

def convert(path):  # what _write_cache uses of a transformers model and tokenizer, without importing transformers
    with open(log, "a") as f:
        f.write("converted\\n")
    time.sleep(1)  # the real one takes ~25 s: all processes look at the cache before one has written it
    write = lambda name: lambda folder: (Path(folder) / name).write_text("{}")
    model = NS(state_dict=lambda: {"weight": WEIGHT}, config=NS(tie_word_embeddings=False, to_dict=dict),
               generation_config=NS(save_pretrained=write("generation_config.json")))
    return model, NS(save_pretrained=write("tokenizer.json"))

loading.smollm2_gguf_path, loading._convert_gguf = (lambda: gguf), convert
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
folder = loading.smollm2_cache_dir()
for name in ("config.json", "generation_config.json", "tokenizer.json"):
    json.loads((folder / name).read_text())
assert torch.equal(load_file(folder / "model.safetensors")["weight"], WEIGHT)
"""


def test_processes_starting_together_convert_once(env, tmp_path):
    """Before: each converted, and one could delete the folder another had just published and was reading."""
    go, log = tmp_path / "go", tmp_path / "conversions"
    cmd = [sys.executable, "-c", CHILD, str(env.gguf), str(go), str(log)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(4)]
    try:
        ready = [p.stdout.readline() for p in procs]
        go.touch()  # all four start loading at once
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert ready == ["ready\n"] * 4 and [p.returncode for p in procs] == [0] * 4, [err[-3000:] for _, err in outs]
    assert log.read_text() == "converted\n"
    assert whole(env)
    assert sorted(p.name for p in env.root.iterdir()) == [LOCK, loading.SMOLLM2_CACHE]


# ---------------------------------------------------------------- cache_dir()


def test_cache_dir_expands_user_and_treats_empty_as_unset(monkeypatch, tmp_path):
    """Before: "" put the cache in the working directory and "~/x" made a folder named "~"."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for value in ("", " "):
        monkeypatch.setenv("PEFTTUTOR_CACHE", value)
        assert config.cache_dir() == home / ".cache" / "pefttutor"
    monkeypatch.setenv("PEFTTUTOR_CACHE", "~/models")
    assert config.cache_dir() == home / "models" and (home / "models").is_dir()
    assert list(work.iterdir()) == []


def test_uncreatable_cache_dir_says_what_to_do(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PEFTTUTOR_CACHE", str(tmp_path / "file"))
    with pytest.raises(FileExistsError, match="cannot create the cache folder .*file.*set PEFTTUTOR_CACHE"):
        config.cache_dir()
