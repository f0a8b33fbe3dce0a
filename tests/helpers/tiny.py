"""Tiny hf_moe configs and models shared by the tests (vocab 99, hidden 32, 2 layers, as transformers' tests)."""

import torch

from hf_moe import HfMoeConfig, HfMoeForCausalLM
from tests.helpers.dense import SMALL

# The tiny dense decoder (tests/helpers/dense.py: what upcycling tests start from) plus the MoE fields.
TINY = dict(SMALL, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)

# One extra-config per router type that makes it valid on the tiny model.
ROUTER_CASES: dict[str, dict] = {
    "topk_softmax": {},
    "softmax_topk": {"norm_topk_prob": True},
    "sigmoid_topk": {"n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.0},
    "noisy_topk": {},
    "switch": {"num_experts_per_tok": 1, "capacity_factor": 1.0},
    "expert_choice": {"use_cache": False},
}


def tiny_config(**overrides) -> HfMoeConfig:
    """A tiny valid config; `overrides` win (e.g. router_type=..., num_shared_experts=1)."""
    return HfMoeConfig(**{**TINY, **overrides})


def tiny_router_config(router_type: str, **overrides) -> HfMoeConfig:
    return tiny_config(router_type=router_type, **{**ROUTER_CASES[router_type], **overrides})


def tiny_model(seed: int = 0, **overrides) -> HfMoeForCausalLM:
    torch.manual_seed(seed)
    return HfMoeForCausalLM(tiny_config(**overrides)).eval()
