"""mergekit-moe configs: read the YAML that ``mergekit-moe`` takes and run the equivalent :func:`merge_experts`.

Read against mergekit's ``docs/moe.md`` and ``mergekit/moe/config.py`` (mergekit 0.1.4, the main branch of
arcee-ai/mergekit). A config looks like::

    base_model: org/base                  # folder or Hub repo id (org/name or org/name@revision)
    gate_mode: hidden                     # hidden | cheap_embed | random
    dtype: bfloat16                       # float32 | float16 | bfloat16 (default: the base's)
    experts_per_token: 2                  # default 2
    experts:
      - source_model: org/code-finetune
        positive_prompts: ["def main():"]
        negative_prompts: ["Once upon a time"]   # optional
      - source_model: org/story-finetune
        positive_prompts: ["Once upon a time"]
    shared_experts:                       # optional; hf-moe makes them from the base model's MLP
      - source_model: org/base
    architecture: mixtral                 # optional: export the result (mixtral | qwen | qwen3)

How each key maps onto hf-moe (docs/merge.md has the table):

- ``gate_mode: hidden`` -> ``router_init="prompts"`` (:mod:`hf_moe.conversion.prompts`): router rows from the
  base model's hidden states on each expert's positive prompts minus its negative ones. hf-moe averages the
  MLP input of every non-special token; mergekit takes the last token's residual stream. Same idea, not the same
  numbers.
- ``gate_mode: cheap_embed`` -> ``router_init="cheap_embed"``
  (:func:`hf_moe.conversion.prompts.cheap_embed_router`): the unit vector of the prompts' summed token embeddings
  (positive minus negative), the same row in every layer, as mergekit computes it (special tokens left out).
- ``gate_mode: random`` -> ``router_init="random"``: N(0, initializer_range^2) rows (mergekit draws N(0, 1)).
- Shared experts are copies of the base MLP, always active and ungated, splitting the MLP output 1/2 : 1/2 with
  the routed experts (docs/merge.md). So a shared expert's ``source_model`` must be the base model, and gate
  prompts, ``residual_scale`` and ``noise_scale`` have no hf-moe equivalent: each is refused by name.

Every key or value hf-moe cannot honour exactly is refused before anything is read or written, with the key and
what to do instead.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..hub_ids import resolve_model
from .export import export
from .merge import merge_experts

logger = logging.getLogger(__name__)

MERGEKIT_VERSION = "0.1.4"  # the mergekit-moe format read here (docs/moe.md, mergekit/moe/config.py)
TOP_KEYS = (
    "base_model",
    "experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "shared_experts",
    "architecture",
)
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts")
GATE_MODES = {"hidden": "prompts", "cheap_embed": "cheap_embed", "random": "random"}
DTYPES = ("float32", "float16", "bfloat16")
# mergekit's output architectures -> hf-moe export targets (hf-moe merges into hf_moe, then exports).
ARCHITECTURES = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen3": "qwen3_moe"}
# Keys mergekit knows that hf-moe refuses, with what to do instead.
_REFUSED_EXPERT_KEYS = {
    "noise_scale": "hf-moe's merge copies each fine-tune's MLP exactly; remove noise_scale (to perturb experts, "
    "upcycle with `hf-moe upcycle --noise-std`)",
    "residual_scale": "hf-moe splits the MLP output 1/2 : 1/2 between routed and shared experts so that merging "
    "identical models keeps the base's outputs; remove residual_scale",
}
_REFUSED_GATE_MODES = {
    "uniform_random": "use gate_mode: random (hf-moe draws N(0, initializer_range^2) rows)",
    "hidden_avg": "use gate_mode: hidden (hf-moe averages the hidden states over each prompt's tokens)",
    "hidden_last": "use gate_mode: hidden (hf-moe averages over each prompt's tokens, not the last one)",
}


@dataclass
class MergekitPlan:
    """A validated mergekit-moe config as hf-moe options.

    Attributes:
        base: base model (folder or repo id, as written; resolved when merging).
        experts: one source model per routed expert, in order.
        router_init: "prompts", "cheap_embed" or "random".
        prompts: the prompts object for :func:`~hf_moe.conversion.prompts.load_prompts` (None for random).
        top_k: experts per token.
        num_shared_experts: shared experts (copies of the base MLP).
        dtype: output dtype name or None (the base's).
        export_to: hf-moe export target for mergekit's ``architecture``, or None (an hf_moe checkpoint).
        source: the YAML file, for messages and provenance.
    """

    base: str
    experts: list[str]
    router_init: str
    prompts: dict | None
    top_k: int = 2
    num_shared_experts: int = 0
    dtype: str | None = None
    export_to: str | None = None
    source: str = "<python object>"
    merge_kwargs: dict[str, Any] = field(default_factory=dict)


def _model_ref(value: Any, where: str) -> str:
    """A mergekit ModelReference: "path", "org/name@revision", or {"model": "path" | {"path", "revision"}}."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"model"})
        if unknown:
            raise ValueError(
                f"{where}: {unknown[0]!r} is not supported (LoRA or architecture overrides); merge the adapter "
                "into the model first (`peft`'s merge_and_unload + save_pretrained) and give the merged folder"
            )
        value = value.get("model")
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"path", "revision"})
            if unknown or "path" not in value:
                raise ValueError(
                    f"{where}: model must be a path or {{path, revision}}, got keys {sorted(value)}"
                )
            return str(value["path"]) + (f"@{value['revision']}" if value.get("revision") else "")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a model folder or Hub repo id, got {value!r}")
    if "+" in value:
        raise ValueError(
            f"{where}: {value!r} is a model+LoRA reference, which hf-moe does not merge; merge the adapter into the "
            "model first (`peft`'s merge_and_unload + save_pretrained) and give the merged folder"
        )
    return value


def _prompts(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise ValueError(f"{where} must be a list of non-empty strings")
    return list(value)


def _expert(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(
            f"{where} must be a mapping with source_model (and prompts), got {type(entry).__name__}"
        )
    for key in entry:
        if key in _REFUSED_EXPERT_KEYS:
            raise ValueError(f"{where}.{key} is not supported: {_REFUSED_EXPERT_KEYS[key]}")
        if key not in EXPERT_KEYS:
            raise ValueError(f"{where}.{key} is not a mergekit-moe expert key; use {', '.join(EXPERT_KEYS)}")
    if "source_model" not in entry:
        raise ValueError(f"{where}.source_model is missing; name the fine-tune (folder or org/name)")
    return {
        "source_model": _model_ref(entry["source_model"], f"{where}.source_model"),
        "positive_prompts": _prompts(entry.get("positive_prompts"), f"{where}.positive_prompts"),
        "negative_prompts": _prompts(entry.get("negative_prompts"), f"{where}.negative_prompts"),
    }


def load_mergekit_config(config: str | os.PathLike | dict) -> MergekitPlan:
    """Validate a mergekit-moe config (a YAML file or its parsed mapping) and translate it to hf-moe options.

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ValueError: invalid YAML, a missing required key, or any key or value hf-moe does not support; the
            message names the key (e.g. ``experts[2].residual_scale``) and what to do instead.
    """

    source = "<python object>"
    if isinstance(config, str | os.PathLike):
        path = Path(config)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"mergekit config {path} does not exist")
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"mergekit config {path} is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"mergekit config ({source}) must be a mapping with base_model and experts")

    def where(key: str) -> str:
        return f"mergekit config ({source}): {key}"

    for key in config:
        if key not in TOP_KEYS:
            raise ValueError(
                f"{where(str(key))} is not a mergekit-moe key hf-moe knows; use {', '.join(TOP_KEYS)}"
            )
    if "base_model" not in config:
        raise ValueError(
            f"{where('base_model')} is missing; name the model whose attention and norms to keep"
        )
    base = _model_ref(config["base_model"], where("base_model"))
    entries = config.get("experts")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where('experts')} must be a non-empty list of {{source_model, positive_prompts}}")
    experts = [_expert(e, where(f"experts[{i}]")) for i, e in enumerate(entries)]

    gate_mode = config.get("gate_mode", "hidden")  # mergekit's default
    if gate_mode in _REFUSED_GATE_MODES:
        raise ValueError(
            f"{where('gate_mode')}={gate_mode!r} is not supported: {_REFUSED_GATE_MODES[gate_mode]}"
        )
    if gate_mode not in GATE_MODES:
        raise ValueError(
            f"{where('gate_mode')}={gate_mode!r} is not a gate mode; use {', '.join(GATE_MODES)}"
        )
    router_init = GATE_MODES[gate_mode]

    top_k = config.get("experts_per_token", 2)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(experts):
        raise ValueError(
            f"{where('experts_per_token')}={top_k!r} must be an integer from 1 to the number of experts "
            f"({len(experts)})"
        )
    dtype = config.get("dtype")
    if dtype is not None:
        dtype = str(dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(
                f"{where('dtype')}={config['dtype']!r} is not supported; use {', '.join(DTYPES)}"
            )

    prompts = None
    if router_init == "random":
        for i, e in enumerate(experts):
            if e["positive_prompts"] or e["negative_prompts"]:
                raise ValueError(
                    f"{where(f'experts[{i}]')} has prompts but gate_mode: random does not use them; remove the "
                    "prompts or use gate_mode: hidden / cheap_embed"
                )
    else:
        for i, e in enumerate(experts):
            if not e["positive_prompts"]:
                raise ValueError(
                    f"{where(f'experts[{i}].positive_prompts')} is missing; gate_mode: {gate_mode} needs prompts "
                    "for every expert (or use gate_mode: random)"
                )
        keyed = [(tuple(e["positive_prompts"]), tuple(e["negative_prompts"] or ())) for e in experts]
        if len(experts) > 1 and len(set(keyed)) == 1:
            raise ValueError(
                f"{where('experts')}: every expert has the same prompts, so the router cannot tell them apart; give "
                "each expert prompts of what it should handle"
            )
        prompts = {
            "experts": [
                {
                    "name": e["source_model"],
                    "positive_prompts": e["positive_prompts"],
                    **({"negative_prompts": e["negative_prompts"]} if e["negative_prompts"] else {}),
                }
                for e in experts
            ]
        }

    shared = config.get("shared_experts") or []
    if not isinstance(shared, list):
        raise ValueError(f"{where('shared_experts')} must be a list of {{source_model}}")
    shared_models = []
    for i, entry in enumerate(shared):
        e = _expert(entry, where(f"shared_experts[{i}]"))
        if e["positive_prompts"] or e["negative_prompts"]:
            raise ValueError(
                f"{where(f'shared_experts[{i}]')}: prompts are not supported; hf-moe's shared experts are always "
                "active with no gate (like mergekit's deepseek output, which does not allow them either); remove "
                "the prompts"
            )
        shared_models.append(e["source_model"])

    export_to = None
    if "architecture" in config:
        arch = config["architecture"]
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"{where('architecture')}={arch!r} is not supported; use one of {', '.join(ARCHITECTURES)}, or drop "
                "it to get an hf_moe checkpoint (hf-moe export lists the native targets)"
            )
        export_to = ARCHITECTURES[arch]

    return MergekitPlan(
        base=base,
        experts=[e["source_model"] for e in experts],
        router_init=router_init,
        prompts=prompts,
        top_k=top_k,
        num_shared_experts=len(shared_models),
        dtype=dtype,
        export_to=export_to,
        source=source,
        merge_kwargs={"shared_models": shared_models},
    )


def merge_from_mergekit(
    config: str | os.PathLike | dict,
    out_dir: str | os.PathLike,
    *,
    router_type: str = "softmax_topk",
    overwrite: bool = False,
    seed: int = 0,
    max_shard_size: int | str = "2GB",
    progress: bool = True,
    revision: str | None = None,
) -> Path:
    """Run a mergekit-moe config with :func:`~hf_moe.conversion.merge.merge_experts`.

    Args:
        config: the mergekit-moe YAML file (or its parsed mapping); see the module docstring.
        out_dir: destination; must not exist unless `overwrite`. An hf_moe checkpoint, or the native
            architecture named by the config's ``architecture``.
        router_type: hf_moe router (mergekit's outputs route softmax then top-k: the default).
        overwrite: replace an existing `out_dir` once the new one is complete.
        seed: seed of random router rows.
        max_shard_size: largest output shard.
        progress: tqdm bars.
        revision: revision for Hub repo ids that do not name one with ``@rev``.

    Returns:
        `out_dir` as a Path.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_mergekit_config` and :func:`merge_experts`.
    """

    plan = load_mergekit_config(config)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:  # before any download or merge
        raise FileExistsError(
            f"output folder {out_dir} already exists; choose another path or pass overwrite=True"
        )
    base = resolve_model(plan.base, revision=revision)
    experts = [resolve_model(e, revision=revision) for e in plan.experts]
    for i, name in enumerate(plan.merge_kwargs["shared_models"]):
        if resolve_model(name, revision=revision).resolve() != base.resolve():
            raise ValueError(
                f"mergekit config ({plan.source}): shared_experts[{i}].source_model={name!r} is not the base model "
                f"({plan.base!r}); hf-moe makes shared experts from the base model's MLP, so use the base here (or "
                "make that model the base_model)"
            )
    options = dict(
        base=base,
        experts=experts,
        top_k=plan.top_k,
        router_type=router_type,
        router_init=plan.router_init,
        prompts=plan.prompts,
        num_shared_experts=plan.num_shared_experts,
        dtype=plan.dtype,
        seed=seed,
        max_shard_size=max_shard_size,
        progress=progress,
    )
    if plan.export_to is None:
        return merge_experts(out_dir=out_dir, overwrite=overwrite, **options)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.mergekit-") as scratch:
        merged = merge_experts(out_dir=Path(scratch) / "hf_moe", **options)
        return export(merged, out_dir, to=plan.export_to, overwrite=overwrite, max_shard_size=max_shard_size)


__all__ = [
    "ARCHITECTURES",
    "GATE_MODES",
    "MERGEKIT_VERSION",
    "MergekitPlan",
    "load_mergekit_config",
    "merge_from_mergekit",
]
