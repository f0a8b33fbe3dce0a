"""The real SmolLM2-135M, upcycled to 4 experts (top-2), exported to Mixtral and served by vLLM, decodes the same
greedy text as transformers (fp32)."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; run scripts/run_vllm_tests.sh (the .venv-vllm venv)"
)

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from hf_moe import HfMoeForCausalLM, export, upcycle  # noqa: E402

from .vllm_helpers import close_llm, hf_greedy, make_llm, vllm_greedy  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "The three most important things to know about the ocean are"
MAX_TOKENS = 24


def test_upcycled_smollm2_served_by_vllm_matches_transformers(tmp_path, smollm2_dir):
    moe = upcycle(
        smollm2_dir,
        tmp_path / "moe",
        num_experts=4,
        top_k=2,
        router_type="topk_softmax",
        noise_std=0.05,
        seed=0,
        progress=False,
    )  # noisy copies: the experts differ, routing matters
    native = export(moe, tmp_path / "mixtral", to="mixtral")
    tokenizer = AutoTokenizer.from_pretrained(native)
    prompt = tokenizer(PROMPT)["input_ids"]

    model = HfMoeForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    (want,) = hf_greedy(model, prompts=[prompt], max_tokens=MAX_TOKENS)
    del model
    llm = make_llm(native, max_model_len=256)
    try:
        (got,) = vllm_greedy(llm, prompts=[prompt], max_tokens=MAX_TOKENS)
    finally:
        close_llm(llm)
    text = tokenizer.decode(got.tokens, skip_special_tokens=True)
    assert got.tokens == want.tokens, (text, tokenizer.decode(want.tokens, skip_special_tokens=True))
    assert len(text.split()) > 5  # a real model says something
    # 30 layers of a real model: sums in another order drift more than on the tiny models, still far below 1e-2.
    assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) < 2e-3
    print(f"[smollm2] {text!r}")
