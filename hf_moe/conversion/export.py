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

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..hub import write_export_card
from ..hub_ids import resolve_model
from ..modeling.configuration_hf_moe import HfMoeConfig
from ..modeling.modeling_hf_moe import HfMoeForCausalLM
from .core import (
    CheckpointSink,
    cast_tensor,
    check_tensors,
    expected_tensors,
    finish_checkpoint,
    parse_dtype,
    source_history,
    unchanged_or_cast,
    write_hf_moe_card,
)
from .io import CheckpointReader, ShardWriter, atomic_output_dir, check_floating_weights, check_out_dir
from .native import (
    SPECS,
    TARGETS,
    NativeSpec,
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
    # optional: peft (only an export with an adapter needs it)
    from peft import LoraConfig, PeftModel

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
    with CheckpointReader(model_dir) as reader:
        config, names = _validate_export(reader, to)
        source = _ExportSource.plan(reader, names, config, merge_adapter, out_dtype)
        with atomic_output_dir(out_dir, overwrite=overwrite, inputs=[*inputs, *source.files]) as tmp:
            with ShardWriter(tmp, max_shard_size=max_shard_size) as writer:
                _stream_export(source, writer, spec=spec, config=config, desc=f"export to {to}")
            options = {
                "to": to,
                "dtype": str(out_dtype) if out_dtype else None,
                "max_shard_size": max_shard_size,
                "merge_adapter": str(Path(merge_adapter).resolve()) if merge_adapter is not None else None,
            }
            # The card lives in one place (hf_moe.hub); its export variant describes the native architecture.
            title = f"{model_dir.resolve().name} ({spec.title})"
            finish_checkpoint(
                tmp,
                config=native_config_dict(config, to, dtype=out_dtype),
                source=reader,
                method="export",
                options=options,
                tokenizer_from=model_dir,
                source_files=source.files,
                extra={**source_history(model_dir), "architecture": spec.architecture},
                card=lambda out: write_export_card(
                    out, config, architecture=spec.architecture, model_name=title
                ),
            )
    logger.info("exported %s to %s (%s)", model_dir, out_dir, spec.architecture)
    return out_dir


def _validate_export(reader: CheckpointReader, to: str) -> tuple[HfMoeConfig, list[str]]:
    """The checkpoint's config and the names of the tensors to export, once the target can represent it and the
    tensors match the config."""
    model_dir = reader.root
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
    names = [n for n in reader.keys() if not (config.tie_word_embeddings and n == "lm_head.weight")]
    check_tensors({n: reader.shape(n) for n in names}, expected_tensors(config), str(model_dir))
    check_floating_weights(reader, names)
    if config.router_type == "noisy_topk":
        logger.info("noisy_topk: the training-only noise projection (gate.noise_weight) is not exported")
    return config, names


@dataclass
class _ExportSource:
    """Where the exported tensors come from: the checkpoint, one at a time, or the state dict of the model merged
    with a PEFT adapter (held in memory)."""

    reader: CheckpointReader
    names: list[str]
    state: dict[str, torch.Tensor] | None
    files: list[Path]  # the input files, recorded in the provenance
    dtype: torch.dtype | None

    @classmethod
    def plan(
        cls,
        reader: CheckpointReader,
        names: list[str],
        config: HfMoeConfig,
        merge_adapter: str | os.PathLike | None,
        dtype: torch.dtype | None,
    ) -> _ExportSource:
        if merge_adapter is None:
            return cls(reader, names, None, list(reader.files_read), dtype)
        adapter_dir = Path(merge_adapter)
        state = _merged_state_dict(reader.root, adapter_dir)
        files = [*reader.files_read, *(p for p in sorted(adapter_dir.iterdir()) if p.is_file())]
        return cls(reader, list(state), state, files, dtype)

    def get(self, name: str) -> torch.Tensor:
        if self.state is not None:  # back to the tensor's dtype on disk unless a dtype was asked for
            return cast_tensor(name, self.state[name], self.dtype or self.reader.dtype(name))
        return cast_tensor(name, self.reader.get_tensor(name), self.dtype)


def _stream_export(
    source: _ExportSource, writer: ShardWriter, *, spec: NativeSpec, config: HfMoeConfig, desc: str
) -> None:
    """Every tensor under its native names, then the tensors the target needs that hf_moe does not store."""
    names = source.names
    for name in tqdm(names, desc=desc, unit="tensor", disable=len(names) < 200):
        for native_name, tensor in export_tensor(name, source.get(name), spec=spec, config=config):
            writer.add(native_name, tensor)
    extra_dtype = source.dtype or source.reader.dtype("model.embed_tokens.weight")
    for layer in range(config.num_hidden_layers):
        for native_name, tensor in extra_layer_tensors(layer, spec=spec, config=config, dtype=extra_dtype):
            writer.add(native_name, tensor)


# ================================================================================================================
# Import.
# ================================================================================================================


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
    with CheckpointReader(src_dir) as reader:
        config, top, layers, skipped = _plan_import(reader)
        with atomic_output_dir(out_dir, overwrite=overwrite, inputs=[src_dir, *reader.files_read]) as tmp:
            with ShardWriter(tmp, max_shard_size=max_shard_size) as writer:
                sink = CheckpointSink(writer, expected_tensors(config))
                for name in top:
                    sink.add(name, unchanged_or_cast(reader, name, name, out_dtype))
                desc, few = f"import {reader.model_type}", len(layers) < 8
                for layer in tqdm(sorted(layers), desc=desc, unit="layer", disable=few):
                    for name, tensor in _import_layer(reader, layers[layer], layer, config).items():
                        sink.add(name, cast_tensor(name, tensor, out_dtype))
                check_tensors(sink.written, sink.expected, f"{src_dir} imported as hf_moe")
            options = {
                "from": reader.model_type,
                "dtype": str(out_dtype) if out_dtype else None,
                "max_shard_size": max_shard_size,
                "skipped_tensors": skipped,
            }
            finish_checkpoint(
                tmp,
                config=config,
                source=reader,
                method="import",
                options=options,
                tokenizer_from=src_dir,
                generation_config=True,
                extra=source_history(src_dir),
                card=lambda out: write_hf_moe_card(out, out_dir.name),
            )
    logger.info("imported %s (%s) to %s", src_dir, reader.model_type, out_dir)
    return out_dir


def _plan_import(reader: CheckpointReader) -> tuple[HfMoeConfig, list[str], dict[int, list[str]], list[str]]:
    """(config, non-layer names, layer -> names, skipped names) of a native checkpoint, its weights checked."""
    if reader.model_type == HfMoeConfig.model_type:
        raise ValueError(f"{reader.root} is already an hf_moe checkpoint; nothing to import")
    config = HfMoeConfig(**hf_moe_config_kwargs(reader.config))
    top, layers, skipped = _layer_groups(reader, config.num_hidden_layers, config.tie_word_embeddings)
    check_floating_weights(reader, [*top, *(n for names in layers.values() for n in names)])
    if skipped:
        logger.info(
            "not imported (%d tensors): %s%s", len(skipped), skipped[:4], " ..." if len(skipped) > 4 else ""
        )
    return config, top, layers, skipped


def _import_layer(
    reader: CheckpointReader, names: list[str], layer: int, config: HfMoeConfig
) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors under hf_moe names, its experts fused, in name order."""
    tensors = {name: reader.get_tensor(name) for name in names}
    spec = SPECS[str(reader.model_type)]
    try:
        converted = import_layer(tensors, layer=layer, spec=spec, num_experts=config.num_experts)
    except ValueError as err:  # a missing or mis-shaped expert: say which checkpoint
        raise ValueError(f"{reader.root}: {err}") from err
    return {name: converted[name] for name in sorted(converted)}


__all__ = ["export", "import_native", "parse_dtype", "refusal_message", "TARGETS"]
