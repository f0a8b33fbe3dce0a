"""Tiny hf_moe checkpoints configured for each native export target (random, non-trivial weights).

Head dims are 32 or 64 so vLLM's attention backends accept the exported models; the vLLM tests reuse
`build_tiny_for_target`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hf_moe import HfMoeConfig, HfMoeForCausalLM
from hf_moe.modeling.modeling_hf_moe import SigmoidTopKRouter

from .tiny import TINY

# Shared by all targets: vocab 99, hidden 64, 2 layers, 2 query heads of 32 (GQA: 1 kv head).
_BASE = {
    **TINY,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
}

# One config per target that exercises its options (shared experts, dense layers, biases, qk-norm, groups).
TARGET_CONFIGS: dict[str, dict] = {
    # The base decoder of each is the target's dense twin (or the target's own decoder for GLM-4.5).
    "mixtral": {"base_model_type": "mistral", "router_type": "topk_softmax", "sliding_window": 4096},
    "qwen2_moe": {
        "router_type": "softmax_topk",
        "norm_topk_prob": False,
        "num_shared_experts": 1,
        "shared_expert_intermediate_size": 48,
        "shared_expert_gate": True,
        "base_model_type": "qwen2",
        "num_hidden_layers": 3,
        "mlp_only_layers": [1],
        "head_dim": 32,
    },
    "qwen3_moe": {
        "base_model_type": "qwen3",
        "router_type": "softmax_topk",
        "norm_topk_prob": True,
        "head_dim": 64,
        "num_hidden_layers": 3,
        "mlp_only_layers": [0],
    },
    "glm4_moe": {
        "router_type": "sigmoid_topk",
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "num_shared_experts": 1,
        "first_k_dense_replace": 1,
        "num_hidden_layers": 3,
        "use_qk_norm": True,
        "attention_bias": True,
        "base_model_type": "glm4_moe",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    },
    "olmoe": {"base_model_type": "olmoe", "router_type": "softmax_topk", "norm_topk_prob": False},
    # Multi-head latent attention (MLA): the base decoder is DeepSeek-V3's own.
    "deepseek_v3": {
        "base_model_type": "deepseek_v3",
        "router_type": "sigmoid_topk",
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "num_shared_experts": 1,
        "first_k_dense_replace": 1,
        "num_hidden_layers": 3,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16,
        "v_head_dim": 32,
        "head_dim": 16,
    },
}


def tiny_target_config(target: str, **overrides) -> HfMoeConfig:
    return HfMoeConfig(**{**_BASE, **TARGET_CONFIGS[target], **overrides})


def tiny_target_model(target: str, *, seed: int = 0, **overrides) -> HfMoeForCausalLM:
    """A random tiny model for `target`; norms, biases and routing biases are randomised too, so that an exporter
    that drops or misplaces any of them changes the logits."""
    torch.manual_seed(seed)
    model = HfMoeForCausalLM(tiny_target_config(target, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
            elif "gate.weight" in name:
                param.normal_(0.0, 0.5)  # spread the router so top-k choices are not near ties
        for module in model.modules():
            if isinstance(module, SigmoidTopKRouter):
                module.e_score_correction_bias.copy_(0.1 * torch.randn_like(module.e_score_correction_bias))
    return model


def build_tiny_for_target(
    target: str, out_dir: str | Path, *, seed: int = 0, with_tokenizer: bool = False, **overrides
) -> Path:
    """Save a tiny random hf_moe checkpoint configured for `target` ("mixtral", "qwen2_moe", "qwen3_moe",
    "glm4_moe") to `out_dir` and return it. Export it with `hf_moe.export(out_dir, ..., to=target)`; the export
    copies the tokenizer that `with_tokenizer=True` adds (`tests/helpers/tiny_tokenizer.py`, vocab 99), which
    vLLM needs."""
    out_dir = Path(out_dir)
    model = tiny_target_model(target, seed=seed, **overrides)
    model.save_pretrained(out_dir)
    if with_tokenizer:
        from .tiny_tokenizer import build_tiny_tokenizer

        build_tiny_tokenizer(out_dir, vocab_size=model.config.vocab_size)
    return out_dir
