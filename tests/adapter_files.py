"""Tamper with saved adapter files, to test that loading refuses what does not fit."""

from safetensors import safe_open
from safetensors.torch import save_file


def rewrite(path, change):
    """Apply `change(tensors)` (a dict, changed in place) to the file at `path`, keeping its metadata."""
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, path, metadata=metadata)
