"""vLLM serves a compressed native checkpoint (experts pruned or merged by hf_moe.compress) with transformers'
greedy tokens and log-probs (fp32)."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; run scripts/run_vllm_tests.sh (the .venv-vllm venv)"
)

import json  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_moe import export  # noqa: E402
from hf_moe.compression import compress  # noqa: E402
from tests.helpers.native import build_tiny_for_target  # noqa: E402
from tests.helpers.tiny_tokenizer import CORPUS  # noqa: E402

from .vllm_helpers import assert_same_greedy, close_llm, hf_greedy, make_llm, vllm_greedy  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize(("target", "merge"), [("qwen3_moe", False), ("mixtral", True)])
def test_compressed_native_matches_transformers(request, tmp_path, target, merge):
    src = build_tiny_for_target(target, tmp_path / "hf_moe", with_tokenizer=True)
    native = export(src, tmp_path / target, to=target)
    out = compress(
        native,
        tmp_path / "compressed",
        keep=0.5,
        method="frequency" if merge else "reap",
        merge=merge,
        calib=[" ".join(CORPUS) * 8],
        calib_tokens=256,
        progress=False,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == target
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reference).__name__ == config["architectures"][0]
    want = hf_greedy(reference)
    llm = make_llm(out)
    try:
        got = vllm_greedy(llm)
    finally:
        close_llm(llm)
    print(f"[gap] {request.node.name}: max log-prob gap {assert_same_greedy(got, want):.2e}")
