"""Every bad config value fails at construction with `HfMoeConfigError` (a `ValueError`) naming the field, the value
and what is allowed; no value poisons the model silently. The cases a reliability sweep found, then a property test
over generated configs: either the project's error, or a model that builds and runs a finite forward."""

from __future__ import annotations

import math

import pytest
import torch

# The vLLM venv (transformers 5.19, scripts/run_vllm_tests.sh) runs tests/modeling without the dev extras.
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hf_moe import HfMoeConfig, HfMoeForCausalLM
from hf_moe.modeling.configuration_hf_moe import HfMoeConfigError
from tests.helpers.tiny import TINY

NAN, INF = float("nan"), float("inf")
SIGMOID = {"router_type": "sigmoid_topk"}
SWITCH = {"router_type": "switch", "num_experts_per_tok": 1}

# case -> (overrides, the field the message names)
BAD = {
    "nan-rms-eps": ({"rms_norm_eps": NAN}, "text_config.rms_norm_eps"),
    "inf-rms-eps": ({"rms_norm_eps": INF}, "text_config.rms_norm_eps"),
    "negative-rms-eps": ({"rms_norm_eps": -1e-6}, "text_config.rms_norm_eps"),
    "nan-scaling": ({**SIGMOID, "routed_scaling_factor": NAN}, "routed_scaling_factor"),
    "inf-scaling": ({**SIGMOID, "routed_scaling_factor": INF}, "routed_scaling_factor"),
    "negative-scaling": ({**SIGMOID, "routed_scaling_factor": -2.0}, "routed_scaling_factor"),
    "nan-init-range": ({"initializer_range": NAN}, "text_config.initializer_range"),
    "negative-init-range": ({"initializer_range": -0.1}, "text_config.initializer_range"),
    "nan-rope-theta": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": NAN}},
        "text_config.rope_parameters.rope_theta",
    ),
    "negative-rope-theta": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
        "text_config.rope_parameters.rope_theta",
    ),
    "bogus-rope-type": (
        {"rope_parameters": {"rope_type": "bogus", "rope_theta": 1e4}},
        "text_config.rope_parameters.rope_type",
    ),
    "nan-aux-coef": ({"router_aux_loss_coef": NAN}, "router_aux_loss_coef"),
    "nan-z-coef": ({"router_z_loss_coef": NAN}, "router_z_loss_coef"),
    "kv-heads-zero": ({"num_key_value_heads": 0}, "num_key_value_heads"),
    "unknown-act": ({"hidden_act": "swishy"}, "text_config.hidden_act"),
    "inf-capacity": ({**SWITCH, "capacity_factor": INF}, "capacity_factor"),
    "huge-capacity": ({**SWITCH, "capacity_factor": 1e9}, "capacity_factor"),
    "pad-out-of-vocab": ({"pad_token_id": 99}, "text_config.pad_token_id"),
    "negative-hidden": ({"hidden_size": -32}, "hidden_size"),
    "negative-intermediate": ({"intermediate_size": -1}, "text_config.intermediate_size"),
    "negative-moe-width": ({"moe_intermediate_size": -16}, "moe_intermediate_size"),
    "negative-layers": ({"num_hidden_layers": -2}, "num_hidden_layers"),
    "str-experts": ({"num_experts": "8"}, "num_experts"),
    "float-experts": ({"num_experts": 2.5}, "num_experts"),
    "bool-top-k": ({"num_experts_per_tok": True}, "num_experts_per_tok"),
    "str-vocab": ({"vocab_size": "big"}, "vocab_size"),
    "unknown-base": ({"text_config": {"model_type": "not-a-family"}}, "text_config.model_type"),
    "hf-moe-as-base": ({"text_config": {"model_type": "hf_moe"}}, "text_config.model_type"),
    "base-without-type": ({"text_config": {"hidden_size": 32}}, "text_config"),
    "window-zero": ({"base_model_type": "mistral", "sliding_window": 0}, "text_config.sliding_window"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_value_is_refused_naming_field_and_value(case):
    overrides, field = BAD[case]
    with pytest.raises(HfMoeConfigError) as info:
        HfMoeConfig(**{**TINY, **overrides})
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert f"`{field}`" in message, message
    assert "invalid" in message and ";" in message  # "...=VALUE; what is allowed"


def test_expert_choice_defaults_the_cache_off_and_refuses_an_explicit_cache():
    config = HfMoeConfig(**{**TINY, "router_type": "expert_choice"})
    assert config.use_cache is False and config.get_text_config().use_cache is False
    with pytest.raises(HfMoeConfigError, match="use_cache"):
        HfMoeConfig(**{**TINY, "router_type": "expert_choice", "use_cache": True})


# --- generated configs ----------------------------------------------------------------------------------------

_NUMBERS = st.one_of(
    st.integers(-4, 64),
    st.sampled_from([NAN, INF, -INF, 0.0, -0.5, 1e-6, 0.02, 1.25, 1e30]),
    st.none(),
    st.sampled_from(["8", "silu", "", "gelu_pytorch_tanh"]),
    st.booleans(),
)
_FIELDS = {
    "hidden_size": st.sampled_from([32, 0, -32, 33, "32", NAN]),
    "num_attention_heads": st.sampled_from([4, 0, 3, -4]),
    "num_key_value_heads": st.sampled_from([2, 0, 3, 4, None]),
    "num_experts": _NUMBERS,
    "num_experts_per_tok": _NUMBERS,
    "moe_intermediate_size": _NUMBERS,
    "num_shared_experts": _NUMBERS,
    "router_type": st.sampled_from(
        ["topk_softmax", "softmax_topk", "sigmoid_topk", "noisy_topk", "switch", "expert_choice", "hash", ""]
    ),
    "capacity_factor": _NUMBERS,
    "router_jitter_noise": _NUMBERS,
    "n_group": _NUMBERS,
    "topk_group": _NUMBERS,
    "routed_scaling_factor": _NUMBERS,
    "router_aux_loss_coef": _NUMBERS,
    "router_z_loss_coef": _NUMBERS,
    "rms_norm_eps": _NUMBERS,
    "initializer_range": _NUMBERS,
    "hidden_act": st.sampled_from(["silu", "gelu", "nope", 3]),
    "pad_token_id": st.sampled_from([0, 98, 99, -1, None]),
    "mlp_only_layers": st.sampled_from([[], [0], [2], [-1], None, "0"]),
    "first_k_dense_replace": _NUMBERS,
    "decoder_sparse_step": _NUMBERS,
    "base_model_type": st.sampled_from(["llama", "qwen3", "mistral", "gemma3_text", "phi3", "nope"]),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=_FIELDS))
def test_generated_configs_raise_our_error_or_give_a_working_model(overrides):
    try:
        config = HfMoeConfig(**{**TINY, **overrides})
    except HfMoeConfigError:
        event("refused with HfMoeConfigError")
        return
    event("valid: built and ran")
    model = HfMoeForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, config.vocab_size)
    assert math.isfinite(float(logits.abs().max())), overrides
