"""Registry of dense source architectures that can be upcycled (and merged) into hf_moe.

Each entry is data: a config translation (dense ``config.json`` -> :class:`HfMoeConfig` keyword arguments) and a
key table of ``(source_pattern, target_pattern, op)`` rows. Patterns are regular expressions over tensor names;
``(?P<layer>\\d+)`` marks the decoder layer so a converter can stream layer by layer; ``target_pattern`` is a
``re`` replacement template. Ops:

- ``"copy"``: the tensor is written unchanged (embeddings, norms, attention);
- ``"mlp.gate"`` / ``"mlp.up"`` / ``"mlp.down"``: the dense MLP of a layer, handed to the expert initialisation;
- ``"lm_head"``: copied unless the embeddings are tied;
- ``"skip"``: a tensor that transformers recomputes (old ``rotary_emb.inv_freq`` buffers).

Adding a family (e.g. Gemma, Phi-3) is a new :class:`DenseSource` in :data:`SOURCES` plus tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig, PretrainedConfig

KeyRule = tuple[str, str, str]  # (source_pattern, target_pattern, op)
OPS = ("copy", "mlp.gate", "mlp.up", "mlp.down", "lm_head", "skip")

_LAYER = r"model\.layers\.(?P<layer>\d+)\."

# Llama-style decoder keys shared by every supported family: HF names already match hf_moe's for everything but
# the MLP, so most rows are identity copies.
LLAMA_KEYS: tuple[KeyRule, ...] = (
    (r"model\.embed_tokens\.weight", r"model.embed_tokens.weight", "copy"),
    (r"model\.norm\.weight", r"model.norm.weight", "copy"),
    (r"lm_head\.weight", r"lm_head.weight", "lm_head"),
    (
        _LAYER + r"self_attn\.(?P<proj>[qkvo])_proj\.(?P<kind>weight|bias)",
        r"model.layers.\g<layer>.self_attn.\g<proj>_proj.\g<kind>",
        "copy",
    ),
    (
        _LAYER + r"(?P<norm>input_layernorm|post_attention_layernorm)\.weight",
        r"model.layers.\g<layer>.\g<norm>.weight",
        "copy",
    ),
    (_LAYER + r"self_attn\.rotary_emb\.inv_freq", r"", "skip"),
    (_LAYER + r"mlp\.gate_proj\.weight", r"model.layers.\g<layer>.mlp.gate_proj.weight", "mlp.gate"),
    (_LAYER + r"mlp\.up_proj\.weight", r"model.layers.\g<layer>.mlp.up_proj.weight", "mlp.up"),
    (_LAYER + r"mlp\.down_proj\.weight", r"model.layers.\g<layer>.mlp.down_proj.weight", "mlp.down"),
)
QK_NORM_KEYS: tuple[KeyRule, ...] = (
    (
        _LAYER + r"self_attn\.(?P<norm>[qk]_norm)\.weight",
        r"model.layers.\g<layer>.self_attn.\g<norm>.weight",
        "copy",
    ),
)


@dataclass(frozen=True)
class DenseSource:
    """One dense architecture family.

    Attributes:
        model_type: the ``model_type`` in ``config.json``.
        translate_config: transformers config of the dense model -> HfMoeConfig keyword arguments (decoder part).
            Raises ValueError naming an option hf_moe cannot represent.
        keys: the key table.
    """

    model_type: str
    translate_config: Callable[[PretrainedConfig], dict[str, Any]]
    keys: tuple[KeyRule, ...]
    _compiled: list[tuple[re.Pattern, str, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for _, _, op in self.keys:
            if op not in OPS:
                raise ValueError(
                    f"DenseSource {self.model_type}: unknown op {op!r}; allowed: {', '.join(OPS)}"
                )
        object.__setattr__(self, "_compiled", [(re.compile(s), t, op) for s, t, op in self.keys])

    def match(self, name: str) -> tuple[str, str, int | None]:
        """Map a source tensor name to ``(target_name, op, layer_idx or None)``.

        Raises:
            ValueError: no row matches (a tensor the converter would otherwise silently drop).
        """
        for pattern, target, op in self._compiled:
            m = pattern.fullmatch(name)
            if m:
                layer = m.groupdict().get("layer")
                return m.expand(target) if target else "", op, None if layer is None else int(layer)
        raise ValueError(
            f"tensor {name!r} of the {self.model_type} checkpoint matches no row of the {self.model_type} key table; "
            "the checkpoint has parameters hf_moe does not know how to convert"
        )


def _unsupported(model_type: str, option: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{model_type} option `{option}`={value!r} is not supported by hf_moe: {why}")


def _common(config: PretrainedConfig) -> dict[str, Any]:
    """Fields every Llama-style family stores under the same names."""
    if getattr(config, "hidden_act", "silu") is None:
        raise _unsupported(config.model_type, "hidden_act", None, "a SwiGLU activation is needed")
    rope = getattr(config, "rope_parameters", None)
    if rope is None:  # configs older than transformers 5 keep rope_theta / rope_scaling at the top level
        rope = dict(getattr(config, "rope_scaling", None) or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=getattr(config, "initializer_range", 0.02),
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_parameters=dict(rope),
        attention_dropout=getattr(config, "attention_dropout", 0.0),
        pad_token_id=getattr(config, "pad_token_id", None),
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
    )


def _translate_llama(config: PretrainedConfig) -> dict[str, Any]:
    if getattr(config, "mlp_bias", False):
        raise _unsupported("llama", "mlp_bias", True, "hf_moe experts are bias-free SwiGLU MLPs")
    bias = bool(getattr(config, "attention_bias", False))
    # Llama's attention_bias puts a bias on q, k, v *and* o.
    return {**_common(config), "attention_bias": bias, "attention_output_bias": bias}


def _translate_mistral(config: PretrainedConfig) -> dict[str, Any]:
    # Mistral applies its sliding window (if any) to every layer.
    return {**_common(config), "sliding_window": getattr(config, "sliding_window", None)}


def _uniform_sliding_window(config: PretrainedConfig) -> int | None:
    """Qwen2/Qwen3 give each layer a type; hf_moe has one window for all layers, so the types must agree."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return config.sliding_window
    raise _unsupported(
        config.model_type,
        "use_sliding_window",
        True,
        f"max_window_layers={getattr(config, 'max_window_layers', None)} < num_hidden_layers="
        f"{config.num_hidden_layers} mixes full and sliding-window layers ({layer_types}); hf_moe uses one "
        "sliding_window for every layer",
    )


def _translate_qwen2(config: PretrainedConfig) -> dict[str, Any]:
    # Qwen2 always has a bias on q/k/v and none on o.
    return {**_common(config), "attention_bias": True, "sliding_window": _uniform_sliding_window(config)}


def _translate_qwen3(config: PretrainedConfig) -> dict[str, Any]:
    bias = bool(getattr(config, "attention_bias", False))
    return {
        **_common(config),
        "attention_bias": bias,
        "attention_output_bias": bias,
        "use_qk_norm": True,
        "sliding_window": _uniform_sliding_window(config),
    }


SOURCES: dict[str, DenseSource] = {
    "llama": DenseSource("llama", _translate_llama, LLAMA_KEYS),
    "mistral": DenseSource("mistral", _translate_mistral, LLAMA_KEYS),
    "qwen2": DenseSource("qwen2", _translate_qwen2, LLAMA_KEYS),
    "qwen3": DenseSource("qwen3", _translate_qwen3, LLAMA_KEYS + QK_NORM_KEYS),
}


def get_source(model_type: str | None) -> DenseSource:
    """The registry entry for a dense `model_type`.

    Raises:
        ValueError: unsupported model type, listing the supported ones.
    """
    if model_type not in SOURCES:
        raise ValueError(
            f"unsupported source architecture model_type={model_type!r}; supported dense sources: "
            f"{', '.join(sorted(SOURCES))}"
        )
    return SOURCES[model_type]


def dense_config(config_dict: dict[str, Any]) -> PretrainedConfig:
    """Parse a dense ``config.json`` dict with transformers' own config class (which normalises legacy rope
    fields and fills defaults).

    Raises:
        ValueError: unsupported or missing model_type.
    """
    model_type = config_dict.get("model_type")
    get_source(model_type)
    kwargs = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")}
    return AutoConfig.for_model(model_type, **kwargs)


def translate_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Dense ``config.json`` dict -> HfMoeConfig keyword arguments for the decoder (no MoE fields).

    Raises:
        ValueError: unsupported architecture or option.
    """
    config = dense_config(config_dict)
    return get_source(config.model_type).translate_config(config)


__all__ = [
    "SOURCES",
    "DenseSource",
    "KeyRule",
    "LLAMA_KEYS",
    "dense_config",
    "get_source",
    "translate_config",
]
