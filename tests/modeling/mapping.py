"""Small mappings from transformers' native models to hf_moe, for the parity tests: configs by field, tensors
by name. transformers 5 already stores MoE experts fused (`experts.gate_up_proj [E, 2I, H]`,
`experts.down_proj [E, H, I]`) under the same names as hf_moe, so MoE models need only the shared-expert
rename; dense models put their MLP into a single expert."""

import copy
import dataclasses

import torch

from hf_moe import HfMoeConfig

# Decoder fields with the same name and meaning in every Llama-family config.
_DECODER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
)


def decoder_kwargs(native) -> dict:
    """The decoder part of an hf_moe config equal to `native` (head_dim and rope parameters included)."""
    kwargs = {name: getattr(native, name) for name in _DECODER_FIELDS}
    kwargs["head_dim"] = getattr(native, "head_dim", None) or native.hidden_size // native.num_attention_heads
    kwargs["rope_parameters"] = dict(native.rope_parameters)
    kwargs["pad_token_id"] = None  # no padding-row zeroing in the embedding on either side
    return kwargs


_MOE_FIELDS = {f.name for f in dataclasses.fields(HfMoeConfig)} - {"text_config"}


def hf_moe_config_from_native(native, **moe) -> HfMoeConfig:
    """An hf_moe config whose base decoder is `native`'s own (a copy), with the MoE fields in `moe`; decoder flags
    in `moe` (attention_bias, use_qk_norm, ...) are the base's already and are ignored."""
    base = copy.deepcopy(native)
    base.pad_token_id = None  # no padding-row zeroing in the embedding on either side
    if hasattr(base, "output_router_logits"):
        base.output_router_logits = False
    return HfMoeConfig(text_config=base, **{k: v for k, v in moe.items() if k in _MOE_FIELDS})


def rename_moe_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral / Qwen2-MoE / Qwen3-MoE / GLM-4.5-MoE names -> hf_moe names (Qwen2-MoE's `shared_expert`)."""
    return {name.replace(".mlp.shared_expert.", ".mlp.shared_experts."): t for name, t in state_dict.items()}


def dense_state_dict_to_single_expert(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dense decoder's `mlp.{gate,up,down}_proj` -> one fused expert plus a one-row router (softmax of a
    single logit is exactly 1.0, so the router weight's value does not matter)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if ".mlp.up_proj." in name or ".mlp.down_proj." in name:
            continue  # consumed with gate_proj below
        if ".mlp.gate_proj.weight" in name:
            prefix = name.removesuffix("gate_proj.weight")  # "...layers.i.mlp."
            gate, up = tensor, state_dict[prefix + "up_proj.weight"]  # (I, H) each
            out[prefix + "experts.gate_up_proj"] = torch.cat([gate, up], dim=0).unsqueeze(0)  # (1, 2I, H)
            down = state_dict[prefix + "down_proj.weight"]  # (H, I)
            out[prefix + "experts.down_proj"] = down.unsqueeze(0)  # (1, H, I)
            out[prefix + "gate.weight"] = torch.zeros(1, tensor.shape[1], dtype=tensor.dtype)  # (1, H)
            continue
        out[name] = tensor
    return out


def randomize_(model: torch.nn.Module, *, router_std: float = 0.5, seed: int = 0) -> None:
    """Make every tensor matter: norms away from 1, biases and routing-correction biases away from 0, routers
    spread so that top-k choices are far from ties."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.add_(0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.1 * noise)
            elif name.endswith("gate.weight"):  # routers and Qwen2-MoE's shared_expert_gate
                param.copy_(router_std * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
