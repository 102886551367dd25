"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub


# --- models: the real checkpoints, loaded once per session (SmolLM2 converts once into the default cache)


@pytest.fixture(scope="session")
def smollm2():
    """(pefttutor Llama, tokenizer) for SmolLM2-135M-Instruct on CPU."""
    from pefttutor.models import load_smollm2

    return load_smollm2(device="cpu")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """The same weights as a transformers LlamaForCausalLM."""
    from pefttutor.models import load_smollm2_hf

    return load_smollm2_hf(device="cpu")


@pytest.fixture(scope="session")
def minilm():
    """(pefttutor Bert, tokenizer) for all-MiniLM-L6-v2 on CPU."""
    from pefttutor.models import load_minilm

    return load_minilm(device="cpu")


@pytest.fixture(scope="session")
def minilm_hf():
    from pefttutor.models import load_minilm_hf

    return load_minilm_hf(device="cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_models: needs the installed SmolLM2 / all-MiniLM weight packages (run by default)")
