"""vLLM serves every native export of an hf_moe checkpoint with transformers' greedy tokens and log-probs (fp32)."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; run scripts/run_vllm_tests.sh (the .venv-vllm venv)"
)

import torch  # noqa: E402

from hf_moe import HfMoeForCausalLM, export  # noqa: E402
from tests.helpers.native import build_tiny_for_target  # noqa: E402

from .vllm_helpers import assert_same_greedy, close_llm, hf_greedy, make_llm, vllm_greedy  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("target", ["mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe"])
def test_native_export_matches_transformers(request, tmp_path, target):
    src = build_tiny_for_target(target, tmp_path / "hf_moe", with_tokenizer=True)
    out = export(src, tmp_path / target, to=target)
    reference = HfMoeForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want = hf_greedy(reference)
    llm = make_llm(out)
    try:
        got = vllm_greedy(llm)
    finally:
        close_llm(llm)
    print(f"[gap] {request.node.name}: max log-prob gap {assert_same_greedy(got, want):.2e}")
