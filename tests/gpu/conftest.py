"""Device selection for the `gpu` tests.

They run on CUDA and are skipped where there is none. `HF_MOE_TEST_DEVICE=cpu` runs the same code on the CPU (the
CPU dry run of scripts/gpu_check.sh does this, so the tests cannot rot between GPU visits); the comparisons then
hold trivially, what is exercised is the code that builds, moves and compares the models.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE_ENV = "HF_MOE_TEST_DEVICE"


def requested_device() -> torch.device:
    return torch.device(os.environ.get(DEVICE_ENV, "cuda"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device under test; skips when it is CUDA and none is present."""
    dev = requested_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA device (set {DEVICE_ENV}=cpu to run this test's code on the CPU)")
    if dev.type == "cuda":
        # fp32 comparisons against the CPU need true fp32 matmuls, not TF32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev
