"""The hf_moe architecture (self-contained: ships as Hub remote code)."""

from .configuration_hf_moe import HfMoeConfig
from .modeling_hf_moe import (
    ROUTERS,
    HfMoeExperts,
    HfMoeForCausalLM,
    HfMoeModel,
    HfMoePreTrainedModel,
    HfMoeSparseMoeBlock,
    load_balancing_loss,
    router_probabilities,
    router_z_loss,
)

__all__ = [
    "HfMoeConfig",
    "HfMoeExperts",
    "HfMoeForCausalLM",
    "HfMoeModel",
    "HfMoePreTrainedModel",
    "HfMoeSparseMoeBlock",
    "ROUTERS",
    "load_balancing_loss",
    "router_probabilities",
    "router_z_loss",
]
