"""Every upcycle reaches vLLM: a family with no native MoE twin (Phi-3, Gemma-3) through the hf_moe plugin on vLLM's
Transformers backend, and a Qwen2 upcycle without shared experts exported natively to Qwen2-MoE (which always has a
shared expert: hf-moe writes one whose output is exactly zero). Greedy tokens and log-probs equal transformers'."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; run scripts/run_vllm_tests.sh (the .venv-vllm venv)"
)

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import hf_moe  # noqa: E402
from hf_moe import HfMoeForCausalLM  # noqa: E402
from hf_moe.conversion.native import compatible_targets  # noqa: E402
from tests.helpers.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

from .vllm_helpers import assert_same_greedy, close_llm, hf_greedy, make_llm, vllm_greedy  # noqa: E402

pytestmark = pytest.mark.vllm

# Head dims of 32: what vLLM's CPU attention accepts.
DENSE = dict(
    vocab_size=99,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILY_EXTRA = {"gemma3_text": {"sliding_window": 4, "query_pre_attn_scalar": 32}}
# vLLM 0.32 (CPU) runs the Gemma-3-based model through its Transformers backend without error, but the outputs
# differ from transformers (window 4: same greedy tokens, log-probs 1.3e-2 apart; window 64: different tokens).
# Not the scaled word embedding: keeping Gemma's embed_scale on vLLM's replacement embedding left the gap unchanged.
# Not resolved here; serve Gemma-based upcycles with transformers until then.
GEMMA_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="vLLM 0.32 Transformers backend differs from transformers on "
    "Gemma-3 bases (see the comment above FAMILY_EXTRA)",
)


def _upcycled(tmp_path, family: str, **options):
    config = AutoConfig.for_model(family, **{**DENSE, **FAMILY_EXTRA.get(family, {})})
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in dense.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    dense.save_pretrained(tmp_path / "dense")
    build_tiny_tokenizer(tmp_path / "dense", vocab_size=DENSE["vocab_size"])
    out = hf_moe.upcycle(
        tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, progress=False, seed=1, **options
    )
    model = HfMoeForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():  # spread the routers so top-k choices are far from ties
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    model.save_pretrained(out)
    return out, model


@pytest.mark.parametrize("family", ["phi3", pytest.param("gemma3_text", marks=GEMMA_XFAIL)])
def test_plugin_serves_a_family_without_native_twin(request, tmp_path, family):
    out, model = _upcycled(tmp_path, family)
    assert compatible_targets(model.config) == []  # only the plugin can serve it
    want = hf_greedy(model)
    llm = make_llm(out)
    try:
        got = vllm_greedy(llm)
    finally:
        close_llm(llm)
    print(f"[gap] {request.node.name}: max log-prob gap {assert_same_greedy(got, want):.2e}")


def test_qwen2_upcycle_without_shared_experts_is_served_natively(request, tmp_path):
    out, model = _upcycled(tmp_path, "qwen2", router_type="softmax_topk")
    assert model.config.num_shared_experts == 0 and "qwen2_moe" in compatible_targets(model.config)
    native = hf_moe.export(out, tmp_path / "qwen2_moe", to="qwen2_moe")
    want = hf_greedy(model)
    llm = make_llm(native)
    try:
        got = vllm_greedy(llm)
    finally:
        close_llm(llm)
    print(f"[gap] {request.node.name}: max log-prob gap {assert_same_greedy(got, want):.2e}")
