"""The hf-moe vLLM plugin: `HfMoeForCausalLM` checkpoints served directly (vLLM's Transformers backend with its fused
MoE) give transformers' greedy tokens and log-probs; batch-dependent routers are refused at load; the entry point
registers the architecture only when vLLM loads its plugins."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; run scripts/run_vllm_tests.sh (the .venv-vllm venv)"
)

import torch  # noqa: E402

from tests.helpers.native import tiny_target_model  # noqa: E402
from tests.helpers.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

from .vllm_helpers import assert_same_greedy, close_llm, hf_greedy, make_llm, vllm_greedy  # noqa: E402

pytestmark = pytest.mark.vllm

# (base target config, overrides): each router the plugin serves, routed by vLLM (softmax_topk: vLLM's own
# routing from the gate weight) or by our router module (the others).
PLUGIN_CASES = {
    "topk_softmax": ("mixtral", {}),
    "softmax_topk_norm_shared_gate": ("qwen2_moe", {"norm_topk_prob": True}),
    "softmax_topk_no_norm": ("qwen2_moe", {"norm_topk_prob": False, "routed_scaling_factor": 3.0}),
    "sigmoid_topk_groups_bias_scaling": ("glm4_moe", {}),
    "noisy_topk": ("mixtral", {"router_type": "noisy_topk"}),
    "switch_dropless": ("mixtral", {"router_type": "switch", "num_experts_per_tok": 1}),
}


def _save(model, path):
    model.save_pretrained(path)
    build_tiny_tokenizer(path, vocab_size=model.config.vocab_size)
    return path


@pytest.mark.parametrize("case", list(PLUGIN_CASES))
def test_plugin_matches_transformers(request, tmp_path, case):
    target, overrides = PLUGIN_CASES[case]
    model = tiny_target_model(target, **overrides)
    if case == "noisy_topk":
        with torch.no_grad():  # a non-zero noise projection: it must stay unused at inference
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    layer.mlp.gate.noise_weight.normal_(0.0, 1.0)
    path = _save(model, tmp_path / case)
    want = hf_greedy(model)
    llm = make_llm(path)
    try:
        got = vllm_greedy(llm)
    finally:
        close_llm(llm)
    print(f"[gap] {request.node.name}: max log-prob gap {assert_same_greedy(got, want):.2e}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"router_type": "expert_choice", "use_cache": False}, "expert_choice"),
        ({"router_type": "switch", "num_experts_per_tok": 1, "capacity_factor": 1.25}, "capacity_factor"),
    ],
)
def test_plugin_refuses_batch_dependent_routers(tmp_path, overrides, message):
    path = _save(tiny_target_model("mixtral", **overrides), tmp_path / "model")
    llm = None
    try:
        with pytest.raises(Exception, match=message):
            llm = make_llm(path)
    finally:
        close_llm(llm)


def test_entry_point_registers_only_when_vllm_loads_plugins():
    code = (
        "import sys\n"
        "import hf_moe\n"
        "assert 'vllm' not in sys.modules, 'import hf_moe imported vllm'\n"
        "from vllm import ModelRegistry\n"
        "assert 'HfMoeForCausalLM' not in ModelRegistry.get_supported_archs()\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "assert 'HfMoeForCausalLM' in ModelRegistry.get_supported_archs()\n"
        "assert 'hf_moe.serving.vllm_model' not in sys.modules, 'registration must stay lazy'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
