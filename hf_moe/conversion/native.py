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
from typing import Any

import torch
import transformers

from ..modeling.configuration_hf_moe import HfMoeConfig
from ..modeling.modeling_hf_moe import ROUTERS

# How a target keeps its shared experts: none, exactly one with a sigmoid gate (Qwen2-MoE), or
# `n_shared_experts` ungated copies of the routed width (GLM-4.5, DeepSeek-V3).
SHARED_POLICIES = ("none", "one_gated", "n_ungated")
# Which layers a target can keep dense: none (Mixtral, OLMoE), any listed (Qwen: mlp_only_layers), or the first k.
DENSE_POLICIES = ("none", "listed", "first_k")


@dataclass(frozen=True)
class NativeSpec:
    """One native MoE architecture: names, what it can represent, and its config mapping both ways.

    Attributes:
        target: our name for it (`export(to=...)`), equal to its transformers `model_type`.
        architecture: `architectures[0]` in config.json.
        config_class: transformers config class name.
        title: for messages.
        moe_prefix: module holding router + experts inside a decoder layer in Hub checkpoints.
        expert_names: per-expert linear names for (gate, up, down) in Hub checkpoints.
        shared_prefix: module holding the shared expert(s) (None = no shared experts).
        twins: base decoder families whose decoder is this architecture's (the target itself, and dense families
            with the same attention/norm/rotary layout), so that export is key renaming plus config mapping.
        routing: the router families (`HfMoeRouter.routing_family`) the architecture computes.
        shared: one of SHARED_POLICIES.
        dense: one of DENSE_POLICIES.
        to_native: HfMoeConfig -> the target config's MoE fields.
        from_native: the target's config -> HfMoeConfig MoE fields.
    """

    target: str
    architecture: str
    config_class: str
    title: str
    moe_prefix: str
    expert_names: tuple[str, str, str]
    shared_prefix: str | None
    twins: tuple[str, ...]
    routing: tuple[str, ...]
    shared: str
    dense: str
    to_native: Callable[[HfMoeConfig], dict[str, Any]]
    from_native: Callable[[Any], dict[str, Any]]


def dense_layers(config: HfMoeConfig) -> list[int]:
    """Indices of the decoder layers that keep a dense MLP."""
    return [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]


def _softmax_routing(config: HfMoeConfig) -> dict[str, Any]:
    # Qwen/OLMoE: softmax over all experts, top-k, renormalised iff norm_topk_prob. topk_softmax / noisy_topk are
    # the renormalised form; switch (dropless) is top-1 of the full softmax, not renormalised.
    family = ROUTERS[config.router_type].routing_family(config)
    return {"norm_topk_prob": family == "softmax_renorm"}


def _shared_width(config: HfMoeConfig) -> int:
    # An hf_moe model without shared experts exports to Qwen2-MoE with a shared expert of width 1 whose output is
    # exactly zero (down_proj and gate zero): 3 * hidden_size + hidden_size extra parameters per layer.
    return config.shared_expert_intermediate_size if config.num_shared_experts else 1


def _sigmoid_to_native(config: HfMoeConfig) -> dict[str, Any]:
    return dict(
        n_routed_experts=config.num_experts,
        moe_intermediate_size=config.moe_intermediate_size,
        n_shared_experts=config.shared_expert_intermediate_size // config.moe_intermediate_size,
        routed_scaling_factor=config.routed_scaling_factor,
        n_group=config.n_group,
        topk_group=config.topk_group,
        norm_topk_prob=config.norm_topk_prob,
        first_k_dense_replace=len(dense_layers(config)),
    )


def _sigmoid_from_native(native) -> dict[str, Any]:
    n_shared = getattr(native, "n_shared_experts", 0) or 0
    return dict(
        router_type="sigmoid_topk",
        num_experts=native.n_routed_experts,
        moe_intermediate_size=native.moe_intermediate_size,
        num_shared_experts=n_shared,
        shared_expert_intermediate_size=n_shared * native.moe_intermediate_size or None,
        routed_scaling_factor=float(getattr(native, "routed_scaling_factor", 1.0) or 1.0),
        n_group=getattr(native, "n_group", 1) or 1,
        topk_group=getattr(native, "topk_group", 1) or 1,
        norm_topk_prob=bool(getattr(native, "norm_topk_prob", True)),
        first_k_dense_replace=getattr(native, "first_k_dense_replace", 0) or 0,
    )


def _qwen_from_native(native) -> dict[str, Any]:
    return dict(
        router_type="softmax_topk",
        num_experts=native.num_experts,
        moe_intermediate_size=native.moe_intermediate_size,
        norm_topk_prob=bool(native.norm_topk_prob),
        mlp_only_layers=list(getattr(native, "mlp_only_layers", None) or []),
        decoder_sparse_step=getattr(native, "decoder_sparse_step", 1) or 1,
    )


def _qwen_to_native(config: HfMoeConfig) -> dict[str, Any]:
    return dict(
        num_experts=config.num_experts,
        moe_intermediate_size=config.moe_intermediate_size,
        decoder_sparse_step=1,  # the dense layers are listed explicitly instead
        mlp_only_layers=dense_layers(config),
        **_softmax_routing(config),
    )


SPECS: dict[str, NativeSpec] = {
    spec.target: spec
    for spec in (
        NativeSpec(
            "mixtral",
            "MixtralForCausalLM",
            "MixtralConfig",
            "Mixtral",
            "block_sparse_moe",
            ("w1", "w3", "w2"),
            None,
            twins=("mixtral", "llama", "mistral"),
            routing=("softmax_renorm",),
            shared="none",
            dense="none",
            # Mixtral's experts use `intermediate_size`.
            to_native=lambda c: dict(
                num_local_experts=c.num_experts,
                intermediate_size=c.moe_intermediate_size,
                router_jitter_noise=c.router_jitter_noise,
            ),
            from_native=lambda n: dict(
                router_type="topk_softmax",
                num_experts=n.num_local_experts,
                moe_intermediate_size=n.intermediate_size,
                router_jitter_noise=n.router_jitter_noise or 0.0,
            ),
        ),
        NativeSpec(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            "Qwen2MoeConfig",
            "Qwen2-MoE",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            "shared_expert",
            twins=("qwen2_moe", "qwen2"),
            routing=("softmax_renorm", "softmax"),
            shared="one_gated",
            dense="listed",
            to_native=lambda c: dict(_qwen_to_native(c), shared_expert_intermediate_size=_shared_width(c)),
            from_native=lambda n: dict(
                _qwen_from_native(n),
                num_shared_experts=1 if n.shared_expert_intermediate_size else 0,
                shared_expert_intermediate_size=n.shared_expert_intermediate_size or None,
                shared_expert_gate=bool(n.shared_expert_intermediate_size),
            ),
        ),
        NativeSpec(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            "Qwen3MoeConfig",
            "Qwen3-MoE",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            None,
            twins=("qwen3_moe", "qwen3"),
            routing=("softmax_renorm", "softmax"),
            shared="none",
            dense="listed",
            to_native=_qwen_to_native,
            from_native=_qwen_from_native,
        ),
        NativeSpec(
            "olmoe",
            "OlmoeForCausalLM",
            "OlmoeConfig",
            "OLMoE",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            None,
            twins=("olmoe",),
            routing=("softmax_renorm", "softmax"),
            shared="none",
            dense="none",
            to_native=lambda c: dict(
                num_experts=c.num_experts, intermediate_size=c.moe_intermediate_size, **_softmax_routing(c)
            ),
            from_native=lambda n: dict(
                router_type="softmax_topk",
                num_experts=n.num_experts,
                moe_intermediate_size=n.intermediate_size,
                norm_topk_prob=bool(n.norm_topk_prob),
            ),
        ),
        NativeSpec(
            "glm4_moe",
            "Glm4MoeForCausalLM",
            "Glm4MoeConfig",
            "GLM-4.5-MoE",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            "shared_experts",
            twins=("glm4_moe",),
            routing=("sigmoid",),
            shared="n_ungated",
            dense="first_k",
            to_native=_sigmoid_to_native,
            from_native=_sigmoid_from_native,
        ),
        NativeSpec(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            "DeepseekV3Config",
            "DeepSeek-V3",
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            "shared_experts",
            twins=("deepseek_v3",),
            routing=("sigmoid",),
            shared="n_ungated",
            dense="first_k",
            to_native=_sigmoid_to_native,
            from_native=_sigmoid_from_native,
        ),
    )
}
TARGETS = tuple(SPECS)

# Native model types we know but cannot import, with the reason.
UNSUPPORTED_SOURCES: dict[str, str] = {
    "deepseek_v2": "DeepSeek-V2's transformers model keeps its experts in a layout hf_moe does not map yet; "
    "DeepSeek-V3 (same MLA attention) is supported",
}

# The upcycle option that produces each property, for refusals ("which options would have made it exportable").
_ROUTER_HINT = {
    "softmax_renorm": "--router topk_softmax (or softmax_topk with norm_topk_prob)",
    "softmax": "--router softmax_topk",
    "sigmoid": "--router sigmoid_topk",
}


# ================================================================================================================
# What each target can represent.
# ================================================================================================================


def representability_problems(config: HfMoeConfig, target: str) -> list[str]:
    """What keeps `config` from being written exactly as `target` (empty list = exportable). Each problem names
    the blocking field and, where one exists, the upcycle option that would have avoided it."""
    spec = check_target(target)
    text = config.get_text_config()
    base = text.model_type
    problems = []
    if base not in spec.twins:
        problems.append(
            f"base decoder {base!r} ({spec.title}'s decoder is that of {', '.join(spec.twins)}); upcycle a "
            f"{'/'.join(t for t in spec.twins if t != target) or target} checkpoint for this target, or serve this "
            "one through the hf_moe vLLM plugin (hf-moe serve)"
        )
    family = ROUTERS[config.router_type].routing_family(config)
    if family.startswith("unexportable"):
        problems.append(family.removeprefix("unexportable: "))
    elif family not in spec.routing:
        problems.append(
            f"router_type={config.router_type!r}"
            + (
                f" with norm_topk_prob={config.norm_topk_prob}"
                if config.router_type == "softmax_topk"
                else ""
            )
            + f" ({spec.title} routes as {' or '.join(spec.routing)}; upcycle with "
            + " or ".join(_ROUTER_HINT[r] for r in spec.routing)
            + ")"
        )
    if spec.shared == "none" and config.num_shared_experts:
        problems.append(
            f"num_shared_experts={config.num_shared_experts} ({spec.title} has no shared experts; upcycle with "
            "--shared-experts 0)"
        )
    if spec.shared == "n_ungated":
        if config.num_shared_experts == 0:
            problems.append(
                f"num_shared_experts=0 ({spec.title} always has shared experts; upcycle with --shared-experts 1)"
            )
        elif config.shared_expert_intermediate_size % config.moe_intermediate_size:
            problems.append(
                f"shared_expert_intermediate_size={config.shared_expert_intermediate_size} ({spec.title} needs a "
                f"multiple of moe_intermediate_size={config.moe_intermediate_size})"
            )
        if config.shared_expert_gate:
            problems.append(f"shared_expert_gate=True ({spec.title} adds its shared experts ungated)")
    dense = dense_layers(config)
    if spec.dense == "none" and dense:
        problems.append(
            f"dense layers {dense} ({spec.title} has an MoE block in every layer; upcycle with "
            "--moe-layers all)"
        )
    if spec.dense == "first_k" and dense != list(range(len(dense))):
        problems.append(
            f"dense layers {dense} ({spec.title} keeps exactly the first first_k_dense_replace layers dense)"
        )
    act = config.hidden_act
    if act != "silu":
        # vLLM 0.32 raises for the Qwen/GLM MoE models and silently computes SiLU for Mixtral.
        problems.append(f"hidden_act={act!r} (vLLM's native MoE models run SiLU experts only)")
    if base in ("llama", "qwen3") and getattr(text, "attention_bias", False):
        problems.append(
            f"attention_bias=True on the {base} base ({spec.title} as served by vLLM has no such bias)"
        )
    if target in ("qwen2_moe", "qwen3_moe") and getattr(text, "use_sliding_window", False):
        problems.append(
            f"use_sliding_window=True ({spec.title} checkpoints served by vLLM use full attention)"
        )
    return problems


def check_target(target: str) -> NativeSpec:
    if target not in SPECS:
        raise ValueError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    return SPECS[target]


def compatible_targets(config: HfMoeConfig) -> list[str]:
    """The targets that can represent `config` exactly."""
    return [t for t in TARGETS if not representability_problems(config, t)]


# ================================================================================================================
# Config translation, both ways.
# ================================================================================================================


def native_config_dict(config: HfMoeConfig, target: str, *, dtype: torch.dtype | None = None) -> dict:
    """The config.json content of the exported checkpoint: the base decoder's fields that the target's config class
    declares, plus the target's MoE fields, built through that class."""
    spec = check_target(target)
    config_class = getattr(transformers, spec.config_class)
    # Every field of the base decoder is kept: its twin reads the same names (fields a config class does not declare,
    # such as Qwen3's head_dim for Qwen3-MoE, are read with getattr by transformers and vLLM).
    kwargs = {
        k: v
        for k, v in config.get_text_config().to_dict().items()
        if k
        not in ("architectures", "dtype", "model_type", "transformers_version", "_name_or_path", "auto_map")
    }
    kwargs.update(
        spec.to_native(config),
        num_experts_per_tok=config.num_experts_per_tok,
        output_router_logits=False,
        router_aux_loss_coef=config.router_aux_loss_coef,
    )
    native = config_class(**kwargs)
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


def hf_moe_config_kwargs(native: dict) -> dict:
    """HfMoeConfig keyword arguments for a native config.json: its own config as the base decoder (`text_config`),
    and the MoE fields it implies.

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
    # Through the transformers config class: it turns older Hub keys (`rope_theta`, `rope_scaling`, `torch_dtype`)
    # into today's fields and fills the class defaults.
    base = getattr(transformers, SPECS[model_type].config_class).from_dict(
        {k: v for k, v in native.items() if k not in ("architectures", "auto_map")}
    )
    base.output_router_logits = False  # hf_moe computes its own router losses
    kwargs: dict[str, Any] = {"text_config": base, "num_experts_per_tok": base.num_experts_per_tok}
    kwargs.update(SPECS[model_type].from_native(base))
    kwargs["router_aux_loss_coef"] = float(getattr(base, "router_aux_loss_coef", 0.001) or 0.0)
    if native.get("dtype") or native.get("torch_dtype"):
        kwargs["dtype"] = native.get("dtype") or native.get("torch_dtype")
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
    if spec.target != "qwen2_moe" or not config.is_moe_layer(layer):
        return
    prefix = f"model.layers.{layer}.mlp."
    hidden = config.hidden_size
    if config.num_shared_experts == 0:
        # Qwen2-MoE always has a shared expert: one of width 1 with a zero down projection outputs exactly zero.
        yield f"{prefix}shared_expert.gate_proj.weight", torch.zeros(1, hidden, dtype=dtype)
        yield f"{prefix}shared_expert.up_proj.weight", torch.zeros(1, hidden, dtype=dtype)
        yield f"{prefix}shared_expert.down_proj.weight", torch.zeros(hidden, 1, dtype=dtype)
    if not config.shared_expert_gate:
        yield f"{prefix}shared_expert_gate.weight", torch.zeros(1, hidden, dtype=dtype)


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
        rules.append(
            (
                rf"mlp\.{spec.shared_prefix}\.(gate_proj|up_proj|down_proj)\.weight",
                r"mlp.shared_experts.\1.weight",
                "copy",
            )
        )
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
        rest = name[len(prefix) :]
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
        out[prefix + "mlp.experts.down_proj"] = torch.stack(
            [per_expert["down"][e] for e in range(num_experts)]
        )
    return out
