"""The model-tester mixin applied to a matrix of configurations: every router type, shared experts, dense
layers, and the attention / rotary options that the supported architectures need."""

import pytest

from tests.helpers.tiny import ROUTER_CASES
from tests.modeling.tester import MoeModelTesterMixin

CASES: dict[str, dict] = {
    **{f"router_{name}": {"router_type": name, **extra} for name, extra in ROUTER_CASES.items()},
    # Switch without a capacity factor is dropless and causal: it gets the cache and padding checks too.
    "router_switch_dropless": {"router_type": "switch", "num_experts_per_tok": 1},
    "router_sigmoid_topk_scaled_biased": {
        "router_type": "sigmoid_topk",
        "n_group": 2,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": False,
    },
    "router_softmax_topk_unnormalised": {"router_type": "softmax_topk", "norm_topk_prob": False},
    "shared_expert": {"num_shared_experts": 1},
    "shared_expert_gated": {
        "num_shared_experts": 2,
        "shared_expert_gate": True,
        "shared_expert_intermediate_size": 24,
    },
    "dense_mlp_only_layers": {"mlp_only_layers": [0]},
    "dense_first_k": {"first_k_dense_replace": 1},
    "dense_sparse_step": {"decoder_sparse_step": 2},
    "qk_norm": {"use_qk_norm": True},
    "attention_bias": {"attention_bias": True, "attention_output_bias": True},
    "sliding_window": {"sliding_window": 3},
    "tied_embeddings": {"tie_word_embeddings": True},
    "partial_rotary": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    },
    "rope_linear": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    "rope_yarn": {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    },
    "rope_llama3": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    },
}

# Capacity-limited routers let tokens compete for expert slots (see tests/modeling/tester.py).
NON_CAUSAL = {"router_switch", "router_expert_choice"}
NO_CACHE = {"router_expert_choice"}


def _make_class(name: str, overrides: dict) -> type:
    attrs = {
        "config_overrides": overrides,
        "causal_routing": name not in NON_CAUSAL,
        "supports_cache": name not in NO_CACHE,
    }
    return type(f"Test_{name}", (MoeModelTesterMixin,), attrs)


for _name, _overrides in CASES.items():
    globals()[f"Test_{_name}"] = _make_class(_name, _overrides)


def test_matrix_covers_every_router_type():
    from hf_moe.modeling.configuration_hf_moe import ROUTER_TYPES

    assert {c["router_type"] for c in CASES.values() if "router_type" in c} == set(ROUTER_TYPES)


@pytest.mark.parametrize("name", sorted(NON_CAUSAL))
def test_capacity_routers_really_drop_in_the_matrix(name):
    """The non-causal cases are exempt from the cache/padding checks only because they drop: show they do."""
    import torch

    model = _make_class(name, CASES[name])().make_model()
    with torch.no_grad():
        out = model(torch.randint(3, 99, (2, 7)), output_router_logits=True)
    assert any((idx == model.config.num_experts).any() for idx in out.router_indices)
