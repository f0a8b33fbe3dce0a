"""Native MoE architectures that hf_moe exports to and imports from: what each can represent, how an `HfMoeConfig`
translates to its config, and how tensor names map. Data first (`SPECS`, `EXPORT_RULES`), small pure functions after.

Facts checked against transformers 5.23 (`models/*/modeling_*.py`, `conversion_mapping.py`) and vLLM 0.32
(`model_executor/models/*.py`):

- Hub checkpoints of all four store experts per expert (Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2`, the others
  `mlp.experts.{e}.gate_proj/up_proj/down_proj`); transformers 5 fuses them at load time through its conversion
  mapping, vLLM's loaders read them directly. We write that per-expert layout.
- Mixtral routes softmax -> top-k -> renormalise, which equals our `topk_softmax` (softmax over the k largest
  logits) and `softmax_topk` with `norm_topk_prob=True`. Experts use `intermediate_size`.
- Qwen2-MoE always has one shared expert with a sigmoid gate, and vLLM 0.32 always builds q/k/v biases and derives
  `head_dim` from `hidden_size / num_attention_heads`, ignoring `qkv_bias` and `head_dim`.
- Qwen3-MoE always has q/k RMSNorm; its `attention_bias` puts a bias on q, k, v *and* o in transformers, but vLLM
  builds o_proj without bias, so only bias-free attention is exported.
- GLM-4.5-MoE (`Glm4MoeForCausalLM`): sigmoid routing with `e_score_correction_bias` (kept float32), group-limited
  top-k, `routed_scaling_factor`, ungated shared experts of width `n_shared_experts * moe_intermediate_size`, the
  first `first_k_dense_replace` layers dense, partial rotary, optional q/k norm and q/k/v bias. vLLM reads
  `config.head_dim` and defaults `partial_rotary_factor` to 0.5, so both are always written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..modeling.configuration_hf_moe import HfMoeConfig

TARGETS = ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe")


@dataclass(frozen=True)
class NativeSpec:
    """How one native architecture names things."""

    target: str  # our name for it (`export(to=...)`), equal to its transformers `model_type`
    architecture: str  # `architectures[0]` in config.json
    config_class: str  # transformers config class name
    title: str  # for messages
    moe_prefix: str  # module holding router + experts inside a decoder layer
    expert_names: tuple[str, str, str]  # per-expert linear names for (gate, up, down)
    shared_prefix: str | None  # module holding the shared expert(s), None = no shared experts


SPECS: dict[str, NativeSpec] = {
    "mixtral": NativeSpec("mixtral", "MixtralForCausalLM", "MixtralConfig", "Mixtral", "block_sparse_moe",
                          ("w1", "w3", "w2"), None),
    "qwen2_moe": NativeSpec("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", "Qwen2-MoE", "mlp",
                            ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "qwen3_moe": NativeSpec("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", "Qwen3-MoE", "mlp",
                            ("gate_proj", "up_proj", "down_proj"), None),
    "glm4_moe": NativeSpec("glm4_moe", "Glm4MoeForCausalLM", "Glm4MoeConfig", "GLM-4.5-MoE", "mlp",
                           ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
}

# Native model types we know but cannot import, with the reason.
UNSUPPORTED_SOURCES: dict[str, str] = {
    "deepseek_v3": "DeepSeek-V3 uses multi-head latent attention (MLA: q_a/q_b/kv_a/kv_b projections), which hf_moe "
    "does not implement; GLM-4.5-MoE has the same sigmoid/group routing on ordinary GQA attention and is supported",
    "deepseek_v2": "DeepSeek-V2 uses multi-head latent attention (MLA), which hf_moe does not implement",
}


# ================================================================================================================
# What each target can represent.
# ================================================================================================================


def routing_family(config: HfMoeConfig) -> str:
    """The inference-time routing function of `config`, as native architectures distinguish them:
    "softmax_renorm" (softmax over the top-k logits; Mixtral, Qwen with norm_topk_prob), "softmax" (top-k of the
    full softmax, not renormalised), "sigmoid" (DeepSeek-V3 / GLM-4.5), "expert_choice" or "token_dropping".

    `noisy_topk` adds noise in training only, so at inference it is `topk_softmax`. `switch` without a capacity
    factor is top-1 of the full softmax, weighted by that probability."""
    rt = config.router_type
    if rt == "expert_choice":
        return "expert_choice"
    if rt == "switch":
        return "token_dropping" if config.capacity_factor is not None else "softmax"
    if rt in ("topk_softmax", "noisy_topk"):
        return "softmax_renorm"
    if rt == "softmax_topk":
        return "softmax_renorm" if config.norm_topk_prob else "softmax"
    return "sigmoid"


def dense_layers(config: HfMoeConfig) -> list[int]:
    """Indices of the decoder layers that keep a dense MLP."""
    return [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]


def partial_rotary_factor(config: HfMoeConfig) -> float:
    return float((config.rope_parameters or {}).get("partial_rotary_factor", 1.0))


def _common_problems(config: HfMoeConfig) -> list[str]:
    problems = []
    family = routing_family(config)
    if family == "expert_choice":
        problems.append("router_type='expert_choice' (experts pick tokens; every native architecture is token-choice)")
    if family == "token_dropping":
        problems.append(
            f"router_type='switch' with capacity_factor={config.capacity_factor} (token dropping; native "
            "architectures are dropless: set capacity_factor=None to keep every token)"
        )
    if config.attention_output_bias:
        problems.append("attention_output_bias=True (no target has a bias on o_proj)")
    if config.hidden_act != "silu":
        # vLLM 0.32 raises for the Qwen/GLM MoE models and silently computes SiLU for Mixtral.
        problems.append(f"hidden_act={config.hidden_act!r} (vLLM's native MoE models run SiLU experts only)")
    return problems


def _mixtral_problems(config: HfMoeConfig) -> list[str]:
    problems = []
    family = routing_family(config)
    if family not in ("softmax_renorm", "expert_choice", "token_dropping"):
        problems.append(
            f"router_type={config.router_type!r}"
            + (" with norm_topk_prob=False" if config.router_type == "softmax_topk" else "")
            + " (Mixtral renormalises softmax weights over the top-k: needs topk_softmax, noisy_topk, or "
            "softmax_topk with norm_topk_prob=True)"
        )
    if config.num_shared_experts:
        problems.append(f"num_shared_experts={config.num_shared_experts} (Mixtral has no shared experts)")
    if dense_layers(config):
        problems.append(f"dense layers {dense_layers(config)} (Mixtral has an MoE block in every layer)")
    if config.use_qk_norm:
        problems.append("use_qk_norm=True (Mixtral has no q/k norm)")
    if config.attention_bias:
        problems.append("attention_bias=True (Mixtral has no q/k/v bias)")
    if partial_rotary_factor(config) != 1.0:
        problems.append(f"partial_rotary_factor={partial_rotary_factor(config)} (Mixtral rotates whole heads)")
    return problems


def _qwen_softmax_problem(config: HfMoeConfig, title: str) -> list[str]:
    if routing_family(config) in ("softmax_renorm", "softmax", "expert_choice", "token_dropping"):
        return []
    return [f"router_type={config.router_type!r} ({title} routes with a softmax over all experts)"]


def _no_sliding(config: HfMoeConfig, title: str) -> list[str]:
    if config.sliding_window is None:
        return []
    return [f"sliding_window={config.sliding_window} ({title} checkpoints served by vLLM use full attention; "
            "only mixtral applies one sliding window to every layer)"]


def _qwen2_moe_problems(config: HfMoeConfig) -> list[str]:
    problems = _qwen_softmax_problem(config, "Qwen2-MoE")
    if config.num_shared_experts == 0:
        problems.append("num_shared_experts=0 (Qwen2-MoE always has a shared expert)")
    if config.use_qk_norm:
        problems.append("use_qk_norm=True (Qwen2-MoE has no q/k norm)")
    default_head_dim = config.hidden_size // config.num_attention_heads
    if config.head_dim != default_head_dim:
        problems.append(
            f"head_dim={config.head_dim} (vLLM's Qwen2-MoE uses hidden_size/num_attention_heads={default_head_dim})"
        )
    if partial_rotary_factor(config) != 1.0:
        problems.append(f"partial_rotary_factor={partial_rotary_factor(config)} (Qwen2-MoE rotates whole heads)")
    return problems + _no_sliding(config, "Qwen2-MoE")


def _qwen3_moe_problems(config: HfMoeConfig) -> list[str]:
    problems = _qwen_softmax_problem(config, "Qwen3-MoE")
    if config.num_shared_experts:
        problems.append(f"num_shared_experts={config.num_shared_experts} (Qwen3-MoE has no shared experts)")
    if not config.use_qk_norm:
        problems.append("use_qk_norm=False (Qwen3-MoE always applies q/k RMSNorm)")
    if config.attention_bias:
        problems.append("attention_bias=True (Qwen3-MoE as served by vLLM has no attention bias)")
    if partial_rotary_factor(config) != 1.0:
        problems.append(f"partial_rotary_factor={partial_rotary_factor(config)} (Qwen3-MoE rotates whole heads)")
    return problems + _no_sliding(config, "Qwen3-MoE")


def _glm4_moe_problems(config: HfMoeConfig) -> list[str]:
    problems = []
    if routing_family(config) not in ("sigmoid", "expert_choice", "token_dropping"):
        problems.append(
            f"router_type={config.router_type!r} (GLM-4.5-MoE routes with sigmoid scores: needs sigmoid_topk)"
        )
    if config.num_shared_experts == 0:
        problems.append("num_shared_experts=0 (GLM-4.5-MoE always has shared experts)")
    elif config.shared_expert_intermediate_size % config.moe_intermediate_size:
        problems.append(
            f"shared_expert_intermediate_size={config.shared_expert_intermediate_size} (GLM-4.5-MoE needs a multiple "
            f"of moe_intermediate_size={config.moe_intermediate_size}: n_shared_experts * moe_intermediate_size)"
        )
    if config.shared_expert_gate:
        problems.append("shared_expert_gate=True (GLM-4.5-MoE adds its shared experts ungated)")
    dense = dense_layers(config)
    if dense != list(range(len(dense))):
        problems.append(f"dense layers {dense} (GLM-4.5-MoE keeps exactly the first first_k_dense_replace layers dense)")
    return problems + _no_sliding(config, "GLM-4.5-MoE")


_PROBLEMS: dict[str, Callable[[HfMoeConfig], list[str]]] = {
    "mixtral": _mixtral_problems,
    "qwen2_moe": _qwen2_moe_problems,
    "qwen3_moe": _qwen3_moe_problems,
    "glm4_moe": _glm4_moe_problems,
}


def check_target(target: str) -> NativeSpec:
    if target in UNSUPPORTED_SOURCES:
        raise ValueError(
            f"{target!r} is not an export target: {UNSUPPORTED_SOURCES[target]}; export DeepSeek-style routing "
            "with to='glm4_moe'"
        )
    if target not in SPECS:
        raise ValueError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    return SPECS[target]


def representability_problems(config: HfMoeConfig, target: str) -> list[str]:
    """What keeps `config` from being written exactly as `target` (empty list = exportable)."""
    check_target(target)
    return _common_problems(config) + _PROBLEMS[target](config)


def compatible_targets(config: HfMoeConfig) -> list[str]:
    """The targets that can represent `config` exactly."""
    return [t for t in TARGETS if not representability_problems(config, t)]


# ================================================================================================================
# Config translation.
# ================================================================================================================

# Fields every target shares with HfMoeConfig under the same name and meaning.
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_act",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "tie_word_embeddings",
    "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id", "num_experts_per_tok",
    "router_aux_loss_coef",
)


def native_config_kwargs(config: HfMoeConfig, target: str) -> dict:
    """Keyword arguments of the target's transformers config class for an exportable `config`."""
    kwargs = {name: getattr(config, name) for name in _SHARED_FIELDS}
    kwargs["rope_parameters"] = dict(config.rope_parameters)
    kwargs["output_router_logits"] = False
    if target == "mixtral":
        kwargs.update(
            intermediate_size=config.moe_intermediate_size,  # Mixtral's experts use intermediate_size
            num_local_experts=config.num_experts,
            head_dim=config.head_dim,
            sliding_window=config.sliding_window,
            router_jitter_noise=config.router_jitter_noise,
        )
        kwargs["rope_parameters"].pop("partial_rotary_factor", None)
        return kwargs
    kwargs.update(
        intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.moe_intermediate_size,
        norm_topk_prob=config.norm_topk_prob,
    )
    if target in ("qwen2_moe", "qwen3_moe"):
        kwargs["rope_parameters"].pop("partial_rotary_factor", None)
        kwargs.update(
            num_experts=config.num_experts,
            decoder_sparse_step=1,  # the dense layers are listed explicitly instead
            mlp_only_layers=dense_layers(config),
            use_sliding_window=False,
        )
        if routing_family(config) == "softmax_renorm":
            kwargs["norm_topk_prob"] = True  # topk_softmax / noisy_topk: same weights as renormalised softmax
        elif routing_family(config) == "softmax":
            kwargs["norm_topk_prob"] = False  # switch (dropless): top-1 probability, not renormalised
    if target == "qwen2_moe":
        kwargs.update(shared_expert_intermediate_size=config.shared_expert_intermediate_size, qkv_bias=True)
    elif target == "qwen3_moe":
        kwargs.update(head_dim=config.head_dim, attention_bias=False)
    elif target == "glm4_moe":
        kwargs["rope_parameters"]["partial_rotary_factor"] = partial_rotary_factor(config)
        kwargs.update(
            n_routed_experts=config.num_experts,
            n_shared_experts=config.shared_expert_intermediate_size // config.moe_intermediate_size,
            routed_scaling_factor=config.routed_scaling_factor,
            n_group=config.n_group,
            topk_group=config.topk_group,
            first_k_dense_replace=len(dense_layers(config)),
            use_qk_norm=config.use_qk_norm,
            attention_bias=config.attention_bias,
            head_dim=config.head_dim,
            num_nextn_predict_layers=0,  # hf_moe has no multi-token-prediction layer
        )
    return kwargs


def native_config_dict(config: HfMoeConfig, target: str, *, dtype: torch.dtype | None = None) -> dict:
    """The config.json content of the exported checkpoint, built through the target's transformers config class."""
    import transformers

    spec = check_target(target)
    native = getattr(transformers, spec.config_class)(**native_config_kwargs(config, target))
    native.architectures = [spec.architecture]
    if dtype is not None:
        native.dtype = dtype
    elif getattr(config, "dtype", None) is not None:
        native.dtype = config.dtype
    out = native.to_dict()
    for ours, hub in _HUB_KEYS.get(target, {}).items():
        if ours in out:
            out[hub] = out.pop(ours)
    return out


# transformers 5.23 serialises some fields under an aliased name; Hub checkpoints (and older transformers, as in
# vLLM's environment) use these. transformers reads both through `attribute_map`.
_HUB_KEYS: dict[str, dict[str, str]] = {"qwen3_moe": {"num_local_experts": "num_experts"}}


def _first(native: dict, *keys: str):
    for key in keys:
        if native.get(key) is not None:
            return native[key]
    raise ValueError(f"config.json has none of {keys}; is it a complete {native.get('model_type')} config?")


def hf_moe_config_kwargs(native: dict) -> dict:
    """HfMoeConfig keyword arguments for a native config.json (`model_type` one of TARGETS).

    Raises:
        ValueError: for an unsupported model type or a native option hf_moe cannot represent.
    """
    model_type = native.get("model_type")
    if model_type in UNSUPPORTED_SOURCES:
        raise ValueError(f"cannot import model_type={model_type!r}: {UNSUPPORTED_SOURCES[model_type]}.")
    if model_type not in SPECS:
        raise ValueError(
            f"cannot import model_type={model_type!r}: supported native architectures are {', '.join(TARGETS)}."
        )
    import transformers

    # Through the transformers config class first: it turns older Hub keys (`rope_theta`, `rope_scaling`,
    # top-level `partial_rotary_factor`, `torch_dtype`) into today's fields and fills the class defaults.
    native = getattr(transformers, SPECS[model_type].config_class).from_dict(native).to_dict()
    kwargs = {name: native[name] for name in _SHARED_FIELDS if name in native}
    rope = dict(native["rope_parameters"])
    kwargs["rope_parameters"] = rope
    heads = native["num_attention_heads"]
    kwargs["head_dim"] = native.get("head_dim") or native["hidden_size"] // heads
    if native.get("dtype") is not None:
        kwargs["dtype"] = native["dtype"]
    if model_type == "mixtral":
        kwargs.update(
            router_type="topk_softmax",
            num_experts=_first(native, "num_local_experts", "num_experts"),
            moe_intermediate_size=native["intermediate_size"],
            intermediate_size=native["intermediate_size"],
            sliding_window=native.get("sliding_window"),
            router_jitter_noise=native.get("router_jitter_noise", 0.0),
        )
        return kwargs
    kwargs.update(
        intermediate_size=native["intermediate_size"],
        moe_intermediate_size=native["moe_intermediate_size"],
        norm_topk_prob=native.get("norm_topk_prob", False),
    )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        if native.get("use_sliding_window"):
            raise ValueError(
                f"cannot import {model_type} with use_sliding_window=True: its per-layer window pattern "
                "(max_window_layers / layer_types) is not an hf_moe option."
            )
        kwargs.update(
            router_type="softmax_topk",
            num_experts=_first(native, "num_experts", "num_local_experts"),
            mlp_only_layers=list(native.get("mlp_only_layers") or []),
            decoder_sparse_step=native.get("decoder_sparse_step", 1),
        )
    if model_type == "qwen2_moe":
        shared = native.get("shared_expert_intermediate_size", 0)
        kwargs.update(
            attention_bias=native.get("qkv_bias", True),
            num_shared_experts=1 if shared else 0,
            shared_expert_intermediate_size=shared or None,
            shared_expert_gate=bool(shared),
        )
        kwargs["head_dim"] = native["hidden_size"] // heads  # vLLM's Qwen2-MoE ignores head_dim; so do we
    elif model_type == "qwen3_moe":
        bias = native.get("attention_bias", False)
        kwargs.update(use_qk_norm=True, attention_bias=bias, attention_output_bias=bias)
    elif model_type == "glm4_moe":
        rope.setdefault("partial_rotary_factor", 0.5)  # transformers' and vLLM's default for GLM-4.5
        n_shared = native.get("n_shared_experts") or 0
        kwargs.update(
            router_type="sigmoid_topk",
            num_experts=_first(native, "n_routed_experts", "num_local_experts"),
            num_shared_experts=n_shared,
            shared_expert_intermediate_size=n_shared * native["moe_intermediate_size"] or None,
            routed_scaling_factor=native.get("routed_scaling_factor", 1.0),
            n_group=native.get("n_group", 1),
            topk_group=native.get("topk_group", 1),
            first_k_dense_replace=native.get("first_k_dense_replace", 0),
            use_qk_norm=native.get("use_qk_norm", False),
            attention_bias=native.get("attention_bias", False),
        )
    return kwargs


# ================================================================================================================
# Tensor names. Export rules map one hf_moe tensor (inside `model.layers.{i}.`) to native tensors; every tensor no
# rule matches keeps its name (embeddings, norms, attention, dense MLPs, lm_head).
# ================================================================================================================

# (pattern on the name after `model.layers.{i}.`, op). Ops are pure functions below.
EXPORT_RULES: tuple[tuple[str, str], ...] = (
    (r"mlp\.gate\.weight", "router"),
    (r"mlp\.gate\.e_score_correction_bias", "router_bias"),
    (r"mlp\.gate\.noise_weight", "drop"),  # noisy_topk: training-only noise projection
    (r"mlp\.experts\.gate_up_proj", "split_gate_up"),
    (r"mlp\.experts\.down_proj", "split_down"),
    (r"mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight", "shared"),
    (r"mlp\.shared_expert_gate\.weight", "shared_gate"),
)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def layer_of(name: str) -> int | None:
    """Decoder-layer index of a tensor name, None for embeddings / final norm / lm_head."""
    match = _LAYER_RE.match(name)
    return int(match.group(1)) if match else None


def export_tensor(
    name: str, tensor: torch.Tensor, *, spec: NativeSpec, config: HfMoeConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """The native (name, tensor) pairs for one hf_moe tensor."""
    match = _LAYER_RE.match(name)
    if not match:
        yield name, tensor
        return
    prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
    moe = prefix + spec.moe_prefix
    gate, up, down = spec.expert_names
    for pattern, op in EXPORT_RULES:
        found = re.fullmatch(pattern, rest)
        if not found:
            continue
        if op == "router":
            yield f"{moe}.gate.weight", tensor
        elif op == "router_bias":
            yield f"{moe}.gate.e_score_correction_bias", tensor.float()  # fp32 in GLM (_keep_in_fp32_modules)
        elif op == "split_gate_up":  # (E, 2I, H) -> E x (I, H) gate, E x (I, H) up
            inter = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield f"{moe}.experts.{e}.{gate}.weight", tensor[e, :inter].contiguous()
                yield f"{moe}.experts.{e}.{up}.weight", tensor[e, inter:].contiguous()
        elif op == "split_down":  # (E, H, I) -> E x (H, I)
            for e in range(tensor.shape[0]):
                yield f"{moe}.experts.{e}.{down}.weight", tensor[e].contiguous()
        elif op == "shared":
            if spec.target == "qwen2_moe" and not config.shared_expert_gate and found.group(1) == "down_proj":
                # Qwen2-MoE always gates the shared expert with sigmoid(g . h); we write g = 0, so the gate is
                # exactly 1/2, and double down_proj. Both are powers of two: the output is bit-identical.
                tensor = tensor * 2
            yield f"{prefix}mlp.{spec.shared_prefix}.{found.group(1)}.weight", tensor
        elif op == "shared_gate":
            yield f"{prefix}mlp.shared_expert_gate.weight", tensor
        return  # op == "drop" yields nothing
    yield name, tensor


def extra_layer_tensors(
    layer: int, *, spec: NativeSpec, config: HfMoeConfig, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors the target requires that hf_moe does not store for this config; each is chosen so the native model
    computes exactly what the hf_moe model computes."""
    if spec.target != "qwen2_moe":
        return
    prefix = f"model.layers.{layer}."
    if not config.attention_bias:  # vLLM's Qwen2-MoE always loads q/k/v biases: zeros add nothing
        q_dim, kv_dim = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        for proj, dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            yield f"{prefix}self_attn.{proj}.bias", torch.zeros(dim, dtype=dtype)
    if config.is_moe_layer(layer) and not config.shared_expert_gate:
        yield f"{prefix}mlp.shared_expert_gate.weight", torch.zeros(1, config.hidden_size, dtype=dtype)


# Import: native tensor name (after `model.layers.{i}.`) -> (hf_moe name or fused target, op).
def import_rules(spec: NativeSpec) -> tuple[tuple[str, str, str], ...]:
    """(pattern, hf_moe name template, op) for the tensors inside one decoder layer; unmatched names are kept."""
    moe = re.escape(spec.moe_prefix)
    gate, up, down = spec.expert_names
    rules = [
        (rf"{moe}\.gate\.weight", "mlp.gate.weight", "copy"),
        (rf"{moe}\.gate\.e_score_correction_bias", "mlp.gate.e_score_correction_bias", "copy"),
        (rf"{moe}\.experts\.(\d+)\.{gate}\.weight", "mlp.experts.gate_up_proj", "expert_gate"),
        (rf"{moe}\.experts\.(\d+)\.{up}\.weight", "mlp.experts.gate_up_proj", "expert_up"),
        (rf"{moe}\.experts\.(\d+)\.{down}\.weight", "mlp.experts.down_proj", "expert_down"),
    ]
    if spec.shared_prefix:
        rules.append((rf"mlp\.{spec.shared_prefix}\.(gate_proj|up_proj|down_proj)\.weight",
                      r"mlp.shared_experts.\1.weight", "copy"))
    if spec.target == "qwen2_moe":
        rules.append((r"mlp\.shared_expert_gate\.weight", "mlp.shared_expert_gate.weight", "copy"))
    return tuple(rules)


def _check_expert_shapes(
    per_expert: dict[str, dict[int, torch.Tensor]], names: dict[tuple[str, int], str], layer: int
) -> None:
    """Every expert's gate/up are (I, H) and down is (H, I), the same for all experts; else a ValueError that
    names the layer, the expert and the tensor (instead of a bare torch.cat / torch.stack error)."""
    for part, tensors in per_expert.items():
        shapes = [tuple(t.shape) for t in tensors.values()]
        usual = max(set(shapes), key=shapes.count)  # the shape most experts have
        for expert, tensor in sorted(tensors.items()):
            if tuple(tensor.shape) != usual:
                raise ValueError(
                    f"layer {layer}, expert {expert}: {names[part, expert]} has shape {list(tensor.shape)} but the "
                    f"other experts' {part} weights have {list(usual)}; the checkpoint is corrupt or does not match "
                    "its config.json"
                )
    gate, up, down = (tuple(per_expert[p][0].shape) for p in ("gate", "up", "down"))
    if len(gate) != 2 or gate != up or down != gate[::-1]:
        raise ValueError(
            f"layer {layer}, expert 0: gate {list(gate)}, up {list(up)} and down {list(down)} weights do not fit "
            "together (expected gate = up = (I, H) and down = (H, I)); the checkpoint is corrupt"
        )


def import_layer(
    tensors: dict[str, torch.Tensor], *, layer: int, spec: NativeSpec, num_experts: int
) -> dict[str, torch.Tensor]:
    """Convert every native tensor of decoder layer `layer` (full names) to hf_moe names, fusing the experts."""
    prefix = f"model.layers.{layer}."
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = {"gate": {}, "up": {}, "down": {}}
    expert_names: dict[tuple[str, int], str] = {}  # (part, expert) -> checkpoint name, for error messages
    rules = import_rules(spec)
    for name, tensor in tensors.items():
        rest = name[len(prefix):]
        for pattern, template, op in rules:
            found = re.fullmatch(pattern, rest)
            if not found:
                continue
            if op == "copy":
                out[prefix + found.expand(template)] = tensor
            else:
                part, expert = op.removeprefix("expert_"), int(found.group(1))
                per_expert[part][expert] = tensor
                expert_names[part, expert] = name
            break
        else:
            out[name] = tensor
    if any(per_expert.values()):
        for part, found in per_expert.items():
            if sorted(found) != list(range(num_experts)):
                missing = sorted(set(range(num_experts)) - set(found))
                raise ValueError(
                    f"layer {layer}: expert {part} weights missing for experts {missing} (expected {num_experts}); "
                    "the checkpoint is incomplete"
                )
        _check_expert_shapes(per_expert, expert_names, layer)
        gate_up = [torch.cat([per_expert["gate"][e], per_expert["up"][e]], dim=0) for e in range(num_experts)]
        out[prefix + "mlp.experts.gate_up_proj"] = torch.stack(gate_up)  # (E, 2I, H)
        out[prefix + "mlp.experts.down_proj"] = torch.stack([per_expert["down"][e] for e in range(num_experts)])
    return out
