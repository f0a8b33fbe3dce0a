"""Registry of dense source families that can be upcycled (and merged) into hf_moe.

hf_moe keeps the dense model's own decoder (its config becomes `text_config`), so every tensor outside the MLPs is
copied verbatim under its own name. A family entry only says how it names its gated MLP:

- ``"separate"``: ``mlp.gate_proj`` / ``mlp.up_proj`` / ``mlp.down_proj`` (Llama and most families);
- ``"fused"``: ``mlp.gate_up_proj`` (gate rows, then up rows) and ``mlp.down_proj`` (Phi-3, GLM).

The activation comes from the base config (SiLU for SwiGLU, tanh-GELU for Gemma's GeGLU). Key rows are
``(source_pattern, target_pattern, op)`` with ``(?P<layer>\\d+)`` marking the decoder layer; ops:

- ``"copy"``: written unchanged under the same name (embeddings, norms, attention, anything of the base's own);
- ``"mlp.gate"`` / ``"mlp.up"`` / ``"mlp.down"`` / ``"mlp.gate_up"``: the dense MLP, handed to the expert init;
- ``"lm_head"``: copied unless the embeddings are tied;
- ``"skip"``: a tensor transformers recomputes (old ``rotary_emb.inv_freq`` buffers);
- ``"refuse"``: an MLP tensor a bias-free gated expert cannot hold (MLP biases).

Adding a family is one entry of :data:`SOURCES` (plus its tiny exactness test in tests/conversion).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig, PretrainedConfig

KeyRule = tuple[str, str, str]  # (source_pattern, target_pattern, op)
OPS = ("copy", "mlp.gate", "mlp.up", "mlp.down", "mlp.gate_up", "lm_head", "skip", "refuse")
MLP_LAYOUTS = ("separate", "fused")

_LAYER = r"model\.layers\.(?P<layer>\d+)\."
_MLP_ROWS: dict[str, tuple[KeyRule, ...]] = {
    "separate": (
        (_LAYER + r"mlp\.gate_proj\.weight", r"model.layers.\g<layer>.mlp.gate_proj.weight", "mlp.gate"),
        (_LAYER + r"mlp\.up_proj\.weight", r"model.layers.\g<layer>.mlp.up_proj.weight", "mlp.up"),
        (_LAYER + r"mlp\.down_proj\.weight", r"model.layers.\g<layer>.mlp.down_proj.weight", "mlp.down"),
    ),
    "fused": (
        (
            _LAYER + r"mlp\.gate_up_proj\.weight",
            r"model.layers.\g<layer>.mlp.gate_up_proj.weight",
            "mlp.gate_up",
        ),
        (_LAYER + r"mlp\.down_proj\.weight", r"model.layers.\g<layer>.mlp.down_proj.weight", "mlp.down"),
    ),
}
_COMMON_ROWS: tuple[KeyRule, ...] = (
    (_LAYER + r"self_attn\.rotary_emb\.inv_freq", r"", "skip"),
    (_LAYER + r"mlp\..*", r"", "refuse"),  # any other MLP tensor (a bias): no bias-free gated expert holds it
    (_LAYER + r"(?P<rest>.+)", r"model.layers.\g<layer>.\g<rest>", "copy"),
    (r"lm_head\.weight", r"lm_head.weight", "lm_head"),
    (r"model\.(?P<rest>.+)", r"model.\g<rest>", "copy"),
)

# Families with a non-gated MLP (one up and one down projection, often with biases): hf_moe's experts are gated.
REFUSED: dict[str, str] = {
    name: "its MLP is not gated (up -> activation -> down), and hf_moe experts are gated (gate * up -> down)"
    for name in (
        "gpt_neox",
        "gpt2",
        "gptj",
        "starcoder2",
        "phi",
        "falcon",
        "arcee",
        "nemotron",
        "bloom",
        "opt",
    )
}


@dataclass(frozen=True)
class DenseSource:
    """One dense decoder family.

    Attributes:
        model_type: the ``model_type`` in ``config.json``.
        mlp: how the family names its gated MLP, one of :data:`MLP_LAYOUTS`.
        refuses: config options hf_moe cannot represent, as ``{attribute: why}`` (refused when truthy).
    """

    model_type: str
    mlp: str = "separate"
    refuses: dict[str, str] = field(default_factory=dict)
    _compiled: list[tuple[re.Pattern, str, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mlp not in MLP_LAYOUTS:
            raise ValueError(
                f"DenseSource {self.model_type}: mlp={self.mlp!r}; allowed: {', '.join(MLP_LAYOUTS)}"
            )
        rows = _MLP_ROWS[self.mlp] + _COMMON_ROWS
        object.__setattr__(self, "_compiled", [(re.compile(s), t, op) for s, t, op in rows])

    @property
    def mlp_ops(self) -> tuple[str, ...]:
        """The ops that together make a layer's dense MLP."""
        return ("mlp.gate_up", "mlp.down") if self.mlp == "fused" else ("mlp.gate", "mlp.up", "mlp.down")

    def check(self, config: PretrainedConfig) -> None:
        """Raise ValueError naming an option of `config` hf_moe cannot represent."""
        for option, why in self.refuses.items():
            if getattr(config, option, False):
                raise ValueError(
                    f"{self.model_type} option `{option}`={getattr(config, option)!r} is not supported by hf_moe: {why}"
                )

    def match(self, name: str) -> tuple[str, str, int | None]:
        """Map a source tensor name to ``(target_name, op, layer_idx or None)``.

        Raises:
            ValueError: no row matches, or an MLP tensor hf_moe cannot hold (a tensor the converter would otherwise
                silently drop).
        """
        for pattern, target, op in self._compiled:
            m = pattern.fullmatch(name)
            if m:
                if op == "refuse":
                    raise ValueError(
                        f"tensor {name!r} of the {self.model_type} checkpoint is part of an MLP that hf_moe's "
                        "bias-free gated experts cannot hold (an MLP bias?); this checkpoint cannot be upcycled"
                    )
                layer = m.groupdict().get("layer")
                return m.expand(target) if target else "", op, None if layer is None else int(layer)
        raise ValueError(
            f"tensor {name!r} of the {self.model_type} checkpoint matches no row of the {self.model_type} key table; "
            "it is not part of a causal-LM decoder (model.*, lm_head.*) that hf_moe knows how to convert"
        )


_MLP_BIAS = {"mlp_bias": "hf_moe experts are bias-free gated MLPs"}

SOURCES: dict[str, DenseSource] = {
    source.model_type: source
    for source in (
        DenseSource("llama", refuses=_MLP_BIAS),
        DenseSource("mistral"),
        DenseSource("ministral"),
        DenseSource("qwen2"),
        DenseSource("qwen3"),
        DenseSource("gemma"),
        DenseSource("gemma2"),
        DenseSource("gemma3_text"),
        DenseSource("phi3", mlp="fused"),
        DenseSource("olmo"),
        DenseSource("olmo2"),
        DenseSource("granite", refuses=_MLP_BIAS),
        DenseSource("smollm3", refuses=_MLP_BIAS),
        DenseSource("cohere"),
        DenseSource("cohere2"),
        DenseSource("glm", mlp="fused"),
        DenseSource("helium"),
    )
}


def get_source(model_type: str | None) -> DenseSource:
    """The registry entry for a dense `model_type`.

    Raises:
        ValueError: unsupported model type, saying why for known refusals, listing the supported ones.
    """
    if model_type in REFUSED:
        raise ValueError(f"cannot upcycle model_type={model_type!r}: {REFUSED[model_type]}")
    if model_type not in SOURCES:
        raise ValueError(
            f"unsupported source architecture model_type={model_type!r}; supported dense sources: "
            f"{', '.join(sorted(SOURCES))}. A gated-MLP family transformers ships is usually one entry in "
            "hf_moe/conversion/sources.py (see CONTRIBUTING.md)"
        )
    return SOURCES[model_type]


def dense_config(config_dict: dict[str, Any]) -> PretrainedConfig:
    """Parse a dense ``config.json`` dict with transformers' own config class (which normalises legacy rope
    fields and fills defaults), checking that hf_moe can represent it.

    Raises:
        ValueError: unsupported or missing model_type, or an option hf_moe cannot represent.
    """
    model_type = config_dict.get("model_type")
    source = get_source(model_type)
    kwargs = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model(model_type, **kwargs)
    source.check(config)
    return config


def translate_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Dense ``config.json`` dict -> HfMoeConfig keyword arguments for the decoder: ``{"text_config": config}``.

    Raises:
        ValueError: unsupported architecture or option.
    """
    config = dense_config(config_dict)
    config.architectures = None  # the hf_moe config names its own architecture
    return {"text_config": config}


__all__ = [
    "MLP_LAYOUTS",
    "REFUSED",
    "SOURCES",
    "DenseSource",
    "KeyRule",
    "dense_config",
    "get_source",
    "translate_config",
]
