"""Configuration of the hf_moe architecture: a dense decoder that transformers ships, whose MLPs are sparse MoE blocks.

hf_moe owns the MoE block (router, experts, shared experts, losses); transformers owns the rest. The config nests
the dense decoder's own config as `text_config` (transformers' composite-config pattern): its `model_type` names
the base family (llama, qwen2, qwen3, gemma3_text, phi3, olmo2, granite, ..., or a native MoE family such as
deepseek_v3 for imported checkpoints). The MoE fields live at the top level, named as in transformers' MoE models.

This file ships as Hub remote code next to `modeling_hf_moe.py`: it imports only the standard library, torch,
transformers and huggingface_hub (a transformers dependency).
"""

import copy
import dataclasses
import math
import re
from typing import Any

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

# Keys of the router registry in `modeling_hf_moe.ROUTERS` (a test keeps the two equal); kept here so a config can
# be validated without importing the modeling code.
ROUTER_TYPES = ("topk_softmax", "softmax_topk", "sigmoid_topk", "noisy_topk", "switch", "expert_choice")
# Routers that drop tokens over capacity, and so may take a `capacity_factor`.
CAPACITY_ROUTERS = ("switch", "expert_choice")
ROUTER_BIAS_UPDATE_MODES = ("forward", "manual")
# Written into every saved config: all three Auto classes, not only the class that saved (vLLM's Transformers
# backend, for one, builds the base model with AutoModel from remote code).
AUTO_MAP = {
    "AutoConfig": "configuration_hf_moe.HfMoeConfig",
    "AutoModel": "modeling_hf_moe.HfMoeModel",
    "AutoModelForCausalLM": "modeling_hf_moe.HfMoeForCausalLM",
}
# The base family when decoder fields are given at the top level and no base is named.
DEFAULT_BASE = "llama"
# Decoder flags of configs saved by hf_moe 0.1 (a Llama-style decoder of its own), and the family each implies.
_LEGACY_FLAGS = ("use_qk_norm", "attention_output_bias", "attention_bias", "sliding_window")
# MoE fields also written into the base config, whatever its family: serving stacks that read the model's text config
# (vLLM's Transformers backend sizes its fused-MoE layers from it) find the MoE geometry there.
_MIRRORED_MOE_FIELDS = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "output_router_logits",
    "router_aux_loss_coef",
)
# PreTrainedConfig keys that stay on the top-level config even though dense configs declare them too.
_TOP_LEVEL_KEYS = {f.name for f in dataclasses.fields(PreTrainedConfig)} | {
    "auto_map",
    "architectures",
    "model_type",
    "transformers_version",
    "name_or_path",
    "_name_or_path",
    "torch_dtype",
    "dtype",
}


class HfMoeConfigError(ValueError):
    """An invalid hf_moe config value. Names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"HfMoeConfig: invalid `{field}`={value!r}; {allowed}.")


def _legacy_base(kwargs: dict[str, Any]) -> str:
    """The dense family that reproduces an hf_moe 0.1 flat config's decoder flags."""
    if kwargs.pop("use_qk_norm", False):
        kwargs.pop("attention_output_bias", None)
        return "qwen3"
    if kwargs.get("sliding_window") is not None and not kwargs.get("attention_bias"):
        kwargs.pop("attention_output_bias", None)
        return "mistral"
    if kwargs.get("attention_bias") and not kwargs.pop("attention_output_bias", False):
        kwargs.pop("attention_bias")
        return "qwen2"
    kwargs.pop("sliding_window", None)
    return DEFAULT_BASE


def base_config_class(model_type: str) -> type[PreTrainedConfig]:
    """transformers' config class for a dense family `model_type` (raises naming the known ones)."""
    if model_type == "hf_moe" or model_type not in CONFIG_MAPPING:
        raise HfMoeConfigError(
            "text_config.model_type",
            model_type,
            "must be a decoder family transformers ships (llama, qwen2, qwen3, gemma3_text, phi3, olmo2, granite, "
            "smollm3, mixtral, deepseek_v3, ...)",
        )
    return CONFIG_MAPPING[model_type]


def _finite(name: str, value: Any, *, low: float | None = None, strict_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HfMoeConfigError(name, value, "must be a finite number")
    if low is not None and (value <= low if strict_low else value < low):
        raise HfMoeConfigError(name, value, f"must be {'>' if strict_low else '>='} {low}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HfMoeConfigError(name, value, "must be a positive integer")


@strict
class HfMoeConfig(PreTrainedConfig):
    r"""Configuration of an [`HfMoeForCausalLM`] model: a dense base decoder (`text_config`) plus MoE fields.

    Building from scratch is one call; decoder fields given at the top level with no base named build a Llama
    decoder from them. Name a base with `text_config` (a transformers config, or a dict with its `model_type`).
    Invalid values raise `HfMoeConfigError` (a `ValueError`) naming the field, the value and what is allowed.

    Example:
    ```python
    >>> import hf_moe
    >>> from transformers import AutoConfig, Gemma3TextConfig
    >>> llama_based = AutoConfig.for_model("hf_moe", hidden_size=256, num_hidden_layers=4, num_experts=8)
    >>> gemma_based = AutoConfig.for_model("hf_moe", text_config=Gemma3TextConfig(hidden_size=256), num_experts=8)
    ```
    """

    model_type = "hf_moe"
    sub_configs = {"text_config": AutoConfig}
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_local_experts": "num_experts", "n_routed_experts": "num_experts"}

    # --- the dense base decoder -----------------------------------------------------------------------------
    text_config: dict | PreTrainedConfig | None = (
        None  # the base family's own config (None: Llama from kwargs)
    )

    # --- mixture of experts ---------------------------------------------------------------------------------
    num_experts: int = 8  # routed experts per MoE layer
    num_experts_per_tok: int = 2  # experts each token is routed to (top-k)
    moe_intermediate_size: int = 1408  # width of each routed expert
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to one (softmax_topk, sigmoid_topk)
    num_shared_experts: int = 0  # always-active experts, stored fused as one gated MLP
    shared_expert_intermediate_size: int | None = None  # None = num_shared_experts * moe_intermediate_size
    shared_expert_gate: bool = False  # sigmoid gate on the shared-expert output (Qwen2-MoE)
    mlp_only_layers: list[int] | None = None  # layer indices that keep the base's dense MLP
    first_k_dense_replace: int = 0  # the first k layers keep a dense MLP (DeepSeek / GLM-4.5)
    decoder_sparse_step: int = 1  # every n-th layer is MoE (Qwen2-MoE); 1 = every layer
    router_type: str = "softmax_topk"  # key of the router registry, see ROUTER_TYPES
    # Tokens per expert and forward: ceil(capacity_factor * tokens / num_experts), clamped to [1, tokens]. None is
    # dropless for switch; expert_choice then takes num_experts_per_tok as the factor.
    capacity_factor: float | None = None  # switch and expert_choice only; at most num_experts
    router_jitter_noise: float = 0.0  # multiplicative input jitter in training (Switch / Mixtral)
    n_group: int = 1  # expert groups for group-limited routing (sigmoid_topk)
    topk_group: int = 1  # groups each token may pick experts from (sigmoid_topk)
    routed_scaling_factor: float = 1.0  # scale applied to the routed output weights (sigmoid_topk)
    router_bias_update_rate: float = 0.0  # aux-loss-free balancing step size (sigmoid_topk); 0 = off
    router_bias_update: str = "forward"  # when the bias moves: after each training forward, or "manual"
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in the LM loss
    router_z_loss_coef: float = 0.0  # weight of the router z-loss in the LM loss (ST-MoE)
    output_router_logits: bool = False  # return router logits and add the router losses to the loss

    def __post_init__(self, **kwargs):
        self.text_config, kwargs = self._build_text_config(self.text_config, kwargs)
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        if self.shared_expert_intermediate_size is None and isinstance(self.num_shared_experts, int):
            moe_width = self.moe_intermediate_size if isinstance(self.moe_intermediate_size, int) else 0
            self.shared_expert_intermediate_size = self.num_shared_experts * moe_width
        self._check_moe()
        self._sync_base_moe_fields()
        super().__post_init__(**kwargs)

    def _sync_base_moe_fields(self) -> None:
        """A native MoE base (deepseek_v3, qwen2_moe, ...) builds its own MoE blocks where its config says; keep its
        same-named MoE fields equal to ours, so that its dense layers are ours and hf_moe's blocks replace exactly
        its MoE ones. `output_router_logits` is mirrored too, so that tools reading the text config (TRL's fused LM
        head)
        ask for router logits; hf_moe's causal LM computes the router losses itself and never lets the base do so."""
        base = self.text_config
        for f in dataclasses.fields(type(self)):
            if f.name != "text_config" and (f.name in vars(base) or f.name in _MIRRORED_MOE_FIELDS):
                setattr(base, f.name, getattr(self, f.name))
        for alias in ("num_local_experts", "n_routed_experts"):
            if alias in vars(base):
                setattr(base, alias, self.num_experts)
        if "n_shared_experts" in vars(base):
            base.n_shared_experts = self.shared_expert_intermediate_size // self.moe_intermediate_size

    def _build_text_config(
        self, text_config: dict | PreTrainedConfig | None, kwargs: dict[str, Any]
    ) -> tuple[PreTrainedConfig, dict[str, Any]]:
        """The base config from `text_config` or from decoder fields at the top level; returns the leftover kwargs
        (the PreTrainedConfig fields this config keeps)."""
        if isinstance(text_config, PreTrainedConfig):
            base = text_config
            overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in _TOP_LEVEL_KEYS}
            if self.router_type == "expert_choice" and "use_cache" not in overrides and base.use_cache:
                overrides["use_cache"] = False  # expert choice is not causal: the cache defaults off
            if overrides:  # decoder fields next to a base config object: applied to a copy of it
                base = copy.deepcopy(base)
                for name, value in overrides.items():
                    setattr(base, name, value)
        else:
            decoder = {k: v for k, v in kwargs.items() if k not in _TOP_LEVEL_KEYS}
            kwargs = {k: v for k, v in kwargs.items() if k in _TOP_LEVEL_KEYS}
            if isinstance(text_config, dict):
                decoder = {**decoder, **text_config}
                model_type = decoder.pop("model_type", None)
                if model_type is None:
                    raise HfMoeConfigError("text_config", text_config, "a dict must name its `model_type`")
            elif text_config is None:
                model_type = decoder.pop("base_model_type", None) or (
                    _legacy_base(decoder) if any(k in decoder for k in _LEGACY_FLAGS) else DEFAULT_BASE
                )
            else:
                raise HfMoeConfigError(
                    "text_config", type(text_config).__name__, "must be a transformers config, a dict or None"
                )
            decoder.pop("transformers_version", None)
            if self.router_type == "expert_choice":
                # Expert choice is not causal: the cache defaults off; an explicit use_cache=True is refused below.
                decoder.setdefault("use_cache", False)
            base = self._make_base(model_type, decoder)
        if getattr(base, "model_type", None) == "hf_moe":
            raise HfMoeConfigError(
                "text_config.model_type", "hf_moe", "must be a dense or native decoder family"
            )
        return base, kwargs

    def _make_base(self, model_type: str, decoder: dict[str, Any]) -> PreTrainedConfig:
        config_class = base_config_class(model_type)
        for name in (
            "num_key_value_heads",
            "num_attention_heads",
            "hidden_size",
            "num_hidden_layers",
            "vocab_size",
        ):
            value = decoder.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise HfMoeConfigError(name, value, "must be a positive integer")
        try:
            return config_class(**decoder)
        except (TypeError, ValueError, StrictDataclassError) as err:  # type errors, transformers' own checks
            field = _strict_field(err)
            if field is not None:
                raise HfMoeConfigError(
                    f"text_config.{field}", decoder.get(field), _strict_cause(err)
                ) from err
            raise HfMoeConfigError(
                f"text_config ({model_type})", decoder, f"the {model_type} config refused it: {err}"
            ) from err

    def _check_moe(self) -> None:
        base = self.text_config
        if self.router_type not in ROUTER_TYPES:
            raise HfMoeConfigError("router_type", self.router_type, f"allowed: {', '.join(ROUTER_TYPES)}")
        for name in (
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "n_group",
            "topk_group",
            "decoder_sparse_step",
        ):
            _positive_int(name, getattr(self, name))
        if not self.num_experts_per_tok <= self.num_experts:
            raise HfMoeConfigError(
                "num_experts_per_tok",
                self.num_experts_per_tok,
                f"must be in [1, num_experts={self.num_experts}]",
            )
        if (
            isinstance(self.num_shared_experts, bool)
            or not isinstance(self.num_shared_experts, int)
            or (self.num_shared_experts < 0)
        ):
            raise HfMoeConfigError("num_shared_experts", self.num_shared_experts, "must be an integer >= 0")
        if self.num_shared_experts > 0:
            _positive_int("shared_expert_intermediate_size", self.shared_expert_intermediate_size)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise HfMoeConfigError("shared_expert_gate", True, "needs num_shared_experts >= 1")
        if self.capacity_factor is not None:
            _finite("capacity_factor", self.capacity_factor, low=0.0, strict_low=True)
            if self.router_type not in CAPACITY_ROUTERS:
                raise HfMoeConfigError(
                    "capacity_factor",
                    self.capacity_factor,
                    f"token dropping is implemented by router_type {' and '.join(map(repr, CAPACITY_ROUTERS))}, "
                    f"not {self.router_type!r}; use None (dropless)",
                )
            if self.capacity_factor > self.num_experts:
                raise HfMoeConfigError(
                    "capacity_factor",
                    self.capacity_factor,
                    f"must be at most num_experts={self.num_experts} (a larger factor gives every expert every "
                    "token); use None for dropless routing",
                )
        if self.router_type == "switch" and self.num_experts_per_tok != 1:
            raise HfMoeConfigError(
                "num_experts_per_tok", self.num_experts_per_tok, "router_type='switch' routes top-1: use 1"
            )
        if self.router_type == "expert_choice" and getattr(base, "use_cache", False):
            raise HfMoeConfigError(
                "use_cache",
                True,
                "router_type='expert_choice' lets each expert pick tokens among all tokens of the forward pass, "
                "so cached one-token decoding would route differently from the full sequence; set use_cache=False "
                "(the default for expert choice; generate then recomputes the whole sequence) or use a token-choice "
                "router",
            )
        _finite("router_jitter_noise", self.router_jitter_noise, low=0.0)
        if self.num_experts % self.n_group != 0:
            raise HfMoeConfigError("n_group", self.n_group, f"must divide num_experts={self.num_experts}")
        if not self.topk_group <= self.n_group:
            raise HfMoeConfigError("topk_group", self.topk_group, f"must be in [1, n_group={self.n_group}]")
        if self.n_group > 1:
            if self.router_type != "sigmoid_topk":
                raise HfMoeConfigError(
                    "n_group", self.n_group, "group-limited routing needs router_type='sigmoid_topk'"
                )
            per_group = self.num_experts // self.n_group
            if per_group < 2 or self.topk_group * per_group < self.num_experts_per_tok:
                raise HfMoeConfigError(
                    "topk_group",
                    self.topk_group,
                    f"the {self.topk_group} selected groups of {per_group} experts (need >= 2 per group) must "
                    f"hold num_experts_per_tok={self.num_experts_per_tok} experts",
                )
        _finite("router_bias_update_rate", self.router_bias_update_rate, low=0.0)
        if self.router_bias_update_rate > 0 and self.router_type != "sigmoid_topk":
            raise HfMoeConfigError(
                "router_bias_update_rate",
                self.router_bias_update_rate,
                "aux-loss-free balancing needs 'sigmoid_topk'",
            )
        if self.router_bias_update not in ROUTER_BIAS_UPDATE_MODES:
            raise HfMoeConfigError(
                "router_bias_update",
                self.router_bias_update,
                f"allowed: {', '.join(ROUTER_BIAS_UPDATE_MODES)}",
            )
        _finite("routed_scaling_factor", self.routed_scaling_factor, low=0.0, strict_low=True)
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            _finite(name, getattr(self, name), low=0.0)
        num_layers = self.num_hidden_layers
        if not isinstance(self.mlp_only_layers, list) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers
            for i in self.mlp_only_layers
        ):
            raise HfMoeConfigError(
                "mlp_only_layers",
                self.mlp_only_layers,
                f"layer indices must be integers in [0, {num_layers})",
            )
        if (
            isinstance(self.first_k_dense_replace, bool)
            or not isinstance(self.first_k_dense_replace, int)
            or not (0 <= self.first_k_dense_replace <= num_layers)
        ):
            raise HfMoeConfigError(
                "first_k_dense_replace",
                self.first_k_dense_replace,
                f"must be an integer in [0, {num_layers}]",
            )
        self._check_base()

    def _check_base(self) -> None:
        """The base decoder fields the MoE block and the decoder rely on: finite, positive, known."""
        base = self.text_config
        for name in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads"):
            _positive_int(f"text_config.{name}", getattr(base, name, None))
        for name in ("intermediate_size", "head_dim", "max_position_embeddings"):
            if getattr(base, name, None) is not None:
                _positive_int(f"text_config.{name}", getattr(base, name))
        kv_heads = getattr(base, "num_key_value_heads", None)
        if kv_heads is not None:
            _positive_int("text_config.num_key_value_heads", kv_heads)
            if base.num_attention_heads % kv_heads:
                raise HfMoeConfigError(
                    "text_config.num_key_value_heads",
                    kv_heads,
                    f"must divide num_attention_heads={base.num_attention_heads}",
                )
        window = getattr(base, "sliding_window", None)
        if (
            window is not None
            and getattr(base, "use_sliding_window", True)
            and (isinstance(window, bool) or not isinstance(window, int) or window < 1)
        ):
            raise HfMoeConfigError("text_config.sliding_window", window, "must be a positive integer or None")
        for name in ("rms_norm_eps", "layer_norm_eps", "norm_eps"):
            if getattr(base, name, None) is not None:
                _finite(f"text_config.{name}", getattr(base, name), low=0.0, strict_low=True)
        if getattr(base, "initializer_range", None) is not None:
            _finite("text_config.initializer_range", base.initializer_range, low=0.0)
        rope = getattr(base, "rope_parameters", None)
        if isinstance(rope, dict):
            theta = rope.get("rope_theta")
            if theta is not None:
                _finite("text_config.rope_parameters.rope_theta", theta, low=0.0, strict_low=True)
            rope_type = rope.get("rope_type", "default")
            if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
                raise HfMoeConfigError(
                    "text_config.rope_parameters.rope_type",
                    rope_type,
                    f"allowed: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}",
                )
        act = expert_activation(base)
        if act not in ACT2FN:
            raise HfMoeConfigError("text_config.hidden_act", act, f"allowed: {', '.join(sorted(ACT2FN))}")
        pad = getattr(base, "pad_token_id", None)
        if pad is not None and not (isinstance(pad, int) and 0 <= pad < base.vocab_size):
            raise HfMoeConfigError(
                "text_config.pad_token_id",
                pad,
                f"must be a token id in [0, vocab_size={base.vocab_size}) or None",
            )

    # --- views of the base ----------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Read-only view of the base decoder's fields (config.num_attention_heads, config.max_position_embeddings,
        # ...), for tools that read them off the top-level config (PEFT, accelerate, vLLM, user code). Only called
        # when normal lookup fails; the fields are stored once, in text_config.
        text_config = self.__dict__.get("text_config")
        if (
            name.startswith("_")
            or not isinstance(text_config, PreTrainedConfig)
            or not hasattr(text_config, name)
        ):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(text_config, name)

    @property
    def base_model_type(self) -> str:
        """The base family, e.g. "llama" or "gemma3_text"."""
        return self.text_config.model_type

    @property
    def num_hidden_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def tie_word_embeddings(self) -> bool:
        # transformers reads the tying flag from the model's own (top-level) config.
        return bool(getattr(self.text_config, "tie_word_embeddings", False))

    @tie_word_embeddings.setter
    def tie_word_embeddings(self, value: bool) -> None:
        self.text_config.tie_word_embeddings = value

    @property
    def use_cache(self) -> bool:
        return bool(getattr(self.text_config, "use_cache", True))

    @use_cache.setter
    def use_cache(self, value: bool) -> None:
        self.text_config.use_cache = value

    @property
    def hidden_act(self) -> str:
        """The activation of the experts: the base MLP's own (SiLU for SwiGLU, tanh-GELU for Gemma's GeGLU)."""
        return expert_activation(self.text_config)

    @property
    def initializer_range(self) -> float:
        return getattr(self.text_config, "initializer_range", 0.02)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(out.get("text_config"), dict):
            # The top-level dtype and architectures are the model's; one source of truth.
            out["text_config"].pop("dtype", None)
            out["text_config"].pop("architectures", None)
        return out

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        if self._auto_class is not None:  # registered by `import hf_moe`: the checkpoint carries its code
            self.auto_map = {**(getattr(self, "auto_map", None) or {}), **AUTO_MAP}
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` holds a sparse MoE block (else the base's dense MLP)."""
        return (
            layer_idx not in self.mlp_only_layers
            and layer_idx >= self.first_k_dense_replace
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers that hold a sparse MoE block."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]


def _strict_field(err: Exception) -> str | None:
    # huggingface_hub's strict dataclasses name the field in the message: "Validation error for field 'x': ...".
    match = re.search(r"field '([^']+)'", str(err))
    return match.group(1) if match else None


def _strict_cause(err: Exception) -> str:
    # The last line of the strict-dataclass message is the cause ("TypeError: Field 'x' expected int, got str").
    return str(err).strip().splitlines()[-1].strip()


def _raise_config_errors_as_ours(config_class: type) -> type:
    """Wrap `__init__` so that the strict-dataclass field errors of transformers' configs (a wrong-typed field in a
    config.json, an out-of-range value) surface as `HfMoeConfigError`, the one error class of a bad config."""
    init = config_class.__init__

    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except StrictDataclassError as err:
            field = _strict_field(err) or "config"
            raise HfMoeConfigError(field, kwargs.get(field, "?"), _strict_cause(err)) from err

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init
    config_class.__init__ = __init__
    return config_class


HfMoeConfig = _raise_config_errors_as_ours(HfMoeConfig)


def expert_activation(text_config: PreTrainedConfig) -> str:
    """The gated MLP activation of a base config (Gemma names it `hidden_activation`)."""
    return (
        getattr(text_config, "hidden_activation", None) or getattr(text_config, "hidden_act", None) or "silu"
    )


__all__ = ["HfMoeConfig", "HfMoeConfigError", "expert_activation"]
