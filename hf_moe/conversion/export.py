"""Export hf_moe checkpoints to the native MoE architectures that transformers and vLLM serve without a plugin
(Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4.5-MoE), and import such checkpoints into hf_moe.

What each target can represent, the config translation and the tensor-name tables live in
:mod:`hf_moe.conversion.native`. Both directions stream: tensors are read one at a time (import: one decoder layer
at a time, to fuse its experts) and written shard by shard into a temporary folder that is renamed into place
only when complete. The one exception is ``export(merge_adapter=...)``, which loads the model and the PEFT adapter
in memory (float32) to merge them.

Example:
```python
>>> import hf_moe
>>> hf_moe.export("my-moe/", "my-moe-qwen3/", to="qwen3_moe")      # served natively by vLLM / transformers
>>> hf_moe.import_native("my-moe-qwen3/", "my-moe-again/")          # back to hf_moe
```
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..hub import write_export_card
from ..hub_ids import resolve_model
from ..modeling.configuration_hf_moe import HfMoeConfig
from .io import (
    PROVENANCE_NAME,
    CheckpointReader,
    ShardWriter,
    atomic_output_dir,
    check_floating_weights,
    check_out_dir,
    copy_tokenizer_files,
    write_provenance,
)
from .native import (
    SPECS,
    TARGETS,
    check_target,
    compatible_targets,
    export_tensor,
    extra_layer_tensors,
    hf_moe_config_kwargs,
    import_layer,
    layer_of,
    native_config_dict,
    representability_problems,
)

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
# Kept in float32 whatever the requested dtype (GLM-4.5 / DeepSeek-V3 keep the routing bias in fp32).
_FP32_SUFFIXES = (".e_score_correction_bias",)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`torch.dtype` for "bfloat16"/"bf16"/"float16"/"fp16"/"float32"/"fp32" (or a dtype); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in set(_DTYPES.values()):
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16 (or fp32, bf16, fp16)"
        )
    return _DTYPES[key]


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if name.endswith(_FP32_SUFFIXES):
        return tensor.float()
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(dtype)
    return tensor


def _expected_tensors(config: HfMoeConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an hf_moe checkpoint of `config` holds (built on the meta device: no memory)."""
    from ..modeling.modeling_hf_moe import HfMoeForCausalLM

    with torch.device("meta"):
        model = HfMoeForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _check_tensors(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(found) & set(expected) if tuple(found[n]) != tuple(expected[n]))
    if missing or unexpected or wrong:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if names:
                parts.append(f"{label}: {names[:6]}{' ...' if len(names) > 6 else ''} ({len(names)})")
        raise ValueError(
            f"{where}: the tensors do not match config.json ({'; '.join(parts)}); re-save the checkpoint"
        )


def _source_provenance(model_dir: Path) -> dict | None:
    path = model_dir / PROVENANCE_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s is not valid JSON; the export's provenance will not include its history", path)
        return None


def _provenance_extra(model_dir: Path) -> dict[str, Any]:
    """History of the source (each earlier step's record), plus its license/base_model so cards keep them."""
    previous = _source_provenance(model_dir)
    if previous is None:
        return {}
    history = list(previous.get("history", []))
    history.append({k: v for k, v in previous.items() if k != "history"})
    extra: dict[str, Any] = {"history": history}
    for key in ("license", "base_model"):
        if previous.get(key):
            extra[key] = previous[key]
    return extra


def refusal_message(config: HfMoeConfig, target: str, problems: list[str], where: str | os.PathLike) -> str:
    """The error text for a config that `target` cannot represent: every blocking field and the targets that fit."""
    fits = compatible_targets(config)
    hint = (
        f"targets that can represent this config: {', '.join(fits)}"
        if fits
        else "no native target can represent this config; serve it as hf_moe (transformers with `import hf_moe`, "
        "or vLLM through the hf_moe plugin)"
    )
    return (
        f"cannot export {where} to {SPECS[target].title} (to={target!r}): "
        + "; ".join(problems)
        + f". {hint}."
    )


# ================================================================================================================
# Export.
# ================================================================================================================


def _merged_state_dict(model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Load the hf_moe model in float32, apply the PEFT adapter and merge it; the merged state dict."""
    from peft import LoraConfig, PeftModel

    from ..modeling.modeling_hf_moe import HfMoeForCausalLM
    from ..peft import (
        load_adapter,  # PeftModel.from_pretrained that also knows the preset's fast experts layer
    )

    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json); pass the folder that "
            "PeftModel.save_pretrained wrote"
        )
    model = HfMoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if LoraConfig.from_pretrained(str(adapter_dir)).target_parameters:
        # PEFT's own ParamWrapper adapters; registering the preset's fast experts layer on them makes PEFT refuse
        # the experts as "targeted twice", so they load through plain PEFT.
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    else:
        peft_model = load_adapter(model, str(adapter_dir))
    merged = peft_model.merge_and_unload()
    state = {name: tensor.detach() for name, tensor in merged.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def export(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    to: str,
    merge_adapter: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write an hf_moe checkpoint as a native Mixtral / Qwen2-MoE / Qwen3-MoE / GLM-4.5-MoE checkpoint.

    The output has the per-expert tensor names of the architecture's Hub checkpoints and a config.json built by
    the transformers config class, so `AutoModelForCausalLM.from_pretrained` and vLLM load it without hf_moe.
    Tensors are streamed one at a time; the folder appears only when complete. A config the target cannot
    represent exactly is refused before anything is written (see docs/export.md for the table).

    Args:
        model_dir: an hf_moe checkpoint folder (safetensors).
        out_dir: the folder to create.
        to: "mixtral", "qwen2_moe", "qwen3_moe" or "glm4_moe".
        merge_adapter: a PEFT LoRA adapter folder trained on this model, merged into the weights first. This path
            loads the model and adapter in memory (float32) instead of streaming.
        dtype: cast floating tensors to "bfloat16", "float16" or "float32" (routing biases stay float32);
            None keeps each tensor's dtype.
        overwrite: replace an existing `out_dir` (only once the new one is complete).
        max_shard_size: largest safetensors shard, e.g. "2GB".

    Returns:
        The output folder.

    Raises:
        FileNotFoundError: `model_dir`, its config/weights, or the adapter folder is missing.
        FileExistsError: `out_dir` exists and `overwrite` is False.
        ValueError: not an hf_moe checkpoint, tensors not matching its config, or a config the target cannot
            represent (the message lists the blocking fields and the targets that would fit); `out_dir` is,
            contains or lies inside an input.
    """
    spec = check_target(to)
    out_dtype = parse_dtype(dtype)
    model_dir, out_dir = resolve_model(model_dir), Path(out_dir)  # a folder or a Hub repo id (org/name[@rev])
    inputs = [model_dir] + ([Path(merge_adapter)] if merge_adapter is not None else [])
    check_out_dir(out_dir, inputs, overwrite=overwrite)  # before any work; atomic_output_dir checks again
    reader = CheckpointReader(model_dir)
    if reader.model_type != HfMoeConfig.model_type:
        raise ValueError(
            f"{model_dir} has model_type={reader.model_type!r}, not 'hf_moe'; export takes hf_moe checkpoints "
            "(to convert a native checkpoint into hf_moe use import_native / `hf-moe import`)"
        )
    config = HfMoeConfig.from_pretrained(model_dir)
    problems = representability_problems(config, to)
    if problems:
        raise ValueError(refusal_message(config, to, problems, model_dir))
    # A tied lm_head saved anyway is the embedding again: not written (the target ties it too).
    source_names = [n for n in reader.keys() if not (config.tie_word_embeddings and n == "lm_head.weight")]
    _check_tensors({n: reader.shape(n) for n in source_names}, _expected_tensors(config), str(model_dir))
    check_floating_weights(reader, source_names)
    if config.router_type == "noisy_topk":
        logger.info("noisy_topk: the training-only noise projection (gate.noise_weight) is not exported")

    source_files: list[Path] = list(reader.files_read)
    if merge_adapter is not None:
        adapter_dir = Path(merge_adapter)
        state = _merged_state_dict(model_dir, adapter_dir)
        source_files += [p for p in sorted(adapter_dir.iterdir()) if p.is_file()]
        names = list(state)
    else:
        names = source_names

    def get(name: str) -> torch.Tensor:
        if merge_adapter is not None:  # back to the tensor's dtype on disk unless a dtype was asked for
            return _cast(name, state[name], out_dtype or reader.dtype(name))
        return _cast(name, reader.get_tensor(name), out_dtype)

    with reader, atomic_output_dir(out_dir, overwrite=overwrite, inputs=[*inputs, *source_files]) as tmp:
        with ShardWriter(tmp, max_shard_size=max_shard_size) as writer:
            for name in tqdm(names, desc=f"export to {to}", unit="tensor", disable=len(names) < 200):
                for native_name, tensor in export_tensor(name, get(name), spec=spec, config=config):
                    writer.add(native_name, tensor)
            extra_dtype = out_dtype or reader.dtype("model.embed_tokens.weight")
            for layer in range(config.num_hidden_layers):
                for native_name, tensor in extra_layer_tensors(
                    layer, spec=spec, config=config, dtype=extra_dtype
                ):
                    writer.add(native_name, tensor)
        native_config = native_config_dict(config, to, dtype=out_dtype)
        (tmp / "config.json").write_text(json.dumps(native_config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(model_dir, tmp)
        options = {
            "to": to,
            "dtype": str(out_dtype) if out_dtype else None,
            "max_shard_size": max_shard_size,
            "merge_adapter": str(Path(merge_adapter).resolve()) if merge_adapter is not None else None,
        }
        extra = _provenance_extra(model_dir)
        extra["architecture"] = spec.architecture
        write_provenance(
            tmp, source=reader, method="export", options=options, source_files=source_files, extra=extra
        )
        # The card lives in one place (hf_moe.hub); its export variant describes the native architecture.
        write_export_card(
            tmp,
            config,
            architecture=spec.architecture,
            model_name=f"{model_dir.resolve().name} ({spec.title})",
        )
    logger.info("exported %s to %s (%s)", model_dir, out_dir, spec.architecture)
    return out_dir


# ================================================================================================================
# Import.
# ================================================================================================================


def _save_hf_moe_config(config: HfMoeConfig, out: Path) -> None:
    """config.json with `auto_map`, plus the modeling code, as `HfMoeForCausalLM.save_pretrained` writes them."""
    from transformers.dynamic_module_utils import custom_object_save

    from ..modeling.modeling_hf_moe import HfMoeForCausalLM

    with torch.device("meta"):
        model = HfMoeForCausalLM(config)
    custom_object_save(
        model, out, config=model.config
    )  # copies modeling + configuration files, sets auto_map
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def _layer_groups(
    reader: CheckpointReader, num_layers: int, tied: bool
) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """(non-layer names, layer -> names, skipped names). Layers past num_hidden_layers (GLM-4.5's
    multi-token-prediction layer), stale rotary buffers and a tied lm_head saved anyway are skipped."""
    top: list[str] = []
    layers: dict[int, list[str]] = {}
    skipped: list[str] = []
    for name in reader.keys():
        layer = layer_of(name)
        if (
            name.endswith("rotary_emb.inv_freq")
            or (layer is not None and layer >= num_layers)
            or (tied and name == "lm_head.weight")
        ):
            skipped.append(name)
        elif layer is None:
            top.append(name)
        else:
            layers.setdefault(layer, []).append(name)
    return top, layers, skipped


def import_native(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Convert a native Mixtral / Qwen2-MoE / Qwen3-MoE / GLM-4.5-MoE checkpoint into an hf_moe checkpoint.

    Per-expert tensors are fused into `gate_up_proj (E, 2I, H)` / `down_proj (E, H, I)` one decoder layer at a
    time. DeepSeek-V3 is refused: its multi-head latent attention has no hf_moe equivalent. GLM-4.5's
    multi-token-prediction layer (layers past `num_hidden_layers`) is not imported.

    Args:
        src_dir: the native checkpoint folder (safetensors, per-expert or transformers-5 fused names both work).
        out_dir: the folder to create.
        overwrite: replace an existing `out_dir` (only once the new one is complete).
        dtype: cast floating tensors ("bfloat16", "float16", "float32"); None keeps them.
        max_shard_size: largest safetensors shard, e.g. "2GB".

    Returns:
        The output folder.

    Raises:
        FileNotFoundError: missing folder, config or weights.
        FileExistsError: `out_dir` exists and `overwrite` is False.
        ValueError: `out_dir` is, contains or lies inside `src_dir`; an unsupported architecture (DeepSeek-V3: MLA)
            or option; tensors not matching the config (a mis-shaped expert is named by layer and expert).
    """
    out_dtype = parse_dtype(dtype)
    src_dir, out_dir = resolve_model(src_dir), Path(out_dir)  # a folder or a Hub repo id (org/name[@rev])
    check_out_dir(out_dir, [src_dir], overwrite=overwrite)  # before any work; atomic_output_dir checks again
    reader = CheckpointReader(src_dir)
    if reader.model_type == HfMoeConfig.model_type:
        raise ValueError(f"{src_dir} is already an hf_moe checkpoint; nothing to import")
    config = HfMoeConfig(**hf_moe_config_kwargs(reader.config))
    spec = SPECS[reader.model_type]
    expected = _expected_tensors(config)
    top, layers, skipped = _layer_groups(reader, config.num_hidden_layers, config.tie_word_embeddings)
    check_floating_weights(reader, [*top, *(n for names in layers.values() for n in names)])
    if skipped:
        logger.info(
            "not imported (%d tensors): %s%s", len(skipped), skipped[:4], " ..." if len(skipped) > 4 else ""
        )

    with reader, atomic_output_dir(out_dir, overwrite=overwrite, inputs=[src_dir, *reader.files_read]) as tmp:
        written: dict[str, tuple[int, ...]] = {}
        with ShardWriter(tmp, max_shard_size=max_shard_size) as writer:

            def add(name: str, tensor: torch.Tensor) -> None:
                tensor = _cast(name, tensor, out_dtype)
                writer.add(name, tensor)
                written[name] = tuple(tensor.shape)

            for name in top:
                add(name, reader.get_tensor(name))
            for layer in tqdm(
                sorted(layers), desc=f"import {reader.model_type}", unit="layer", disable=len(layers) < 8
            ):
                tensors = {name: reader.get_tensor(name) for name in layers[layer]}
                try:
                    converted = import_layer(tensors, layer=layer, spec=spec, num_experts=config.num_experts)
                except ValueError as err:  # a missing or mis-shaped expert: say which checkpoint
                    raise ValueError(f"{src_dir}: {err}") from err
                for name in sorted(converted):
                    add(name, converted[name])
            _check_tensors(written, expected, f"{src_dir} imported as hf_moe")
        _save_hf_moe_config(config, tmp)
        copy_tokenizer_files(src_dir, tmp)
        write_provenance(
            tmp,
            source=reader,
            method="import",
            options={
                "from": reader.model_type,
                "dtype": str(out_dtype) if out_dtype else None,
                "max_shard_size": max_shard_size,
                "skipped_tensors": skipped,
            },
            extra=_provenance_extra(src_dir),
        )
        try:
            from ..hub import write_model_card

            write_model_card(tmp, model_name=out_dir.name)
        except (ImportError, FileNotFoundError) as err:
            logger.warning("model card not written (%s)", err)
    logger.info("imported %s (%s) to %s", src_dir, reader.model_type, out_dir)
    return out_dir


__all__ = ["export", "import_native", "parse_dtype", "refusal_message", "TARGETS"]
