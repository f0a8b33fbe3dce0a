"""Merge several fine-tunes of one dense base model into an hf_moe Mixture-of-Experts checkpoint
(Branch-Train-MiX, Sukhbaatar et al. 2024; mergekit-moe).

Fine-tune ``e``'s MLP (gate/up/down of every layer) becomes expert ``e`` of that layer; everything else
(embeddings, attention, norms, lm_head) comes from the base (``shared="base"``) or is the element-wise average
of the fine-tunes (``shared="average"``, BTX's choice). Optional shared experts are copies of the base MLP.
The router starts random or from prompts (:mod:`hf_moe.conversion.prompts`, run on the base model).

The conversion is streamed: all folders are validated up front (configs, shard headers, tensor names and
shapes), then the output is written one decoder layer at a time, reading one tensor of one model at a time,
into a temporary folder beside OUT_DIR that is renamed into place when complete. See docs/merge.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..hub_ids import resolve_model
from ..modeling import HfMoeConfig
from .core import (
    BackgroundHasher,
    CheckpointSink,
    DensePlan,
    build_moe_config,
    dense_mlp,
    expected_tensors,
    finish_checkpoint,
    parse_dtype,
    plan_dense,
    router_rows,
    unchanged_or_cast,
)
from .init import RouterInitContext, get_router_init, shared_expert_weights
from .io import (
    CheckpointReader,
    ShardWriter,
    StoredTensor,
    atomic_output_dir,
    check_floating_weights,
    check_out_dir,
)
from .sources import DenseSource, get_source, translate_config

logger = logging.getLogger(__name__)

SHARED_MODES = ("base", "average")
# Config fields that must agree between the base and every fine-tune: they fix the tensor shapes or the
# meaning of the weights. Other fields (rope, norm eps, context length, token ids) are taken from the base.
STRUCTURAL_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "hidden_activation",
    "tie_word_embeddings",
    "attention_bias",
)


def _check_compatible(
    base: CheckpointReader, base_kwargs: dict[str, Any], experts: list[CheckpointReader]
) -> None:
    """model_type and the structural config fields of every fine-tune must equal the base's."""
    for i, reader in enumerate(experts):
        who = f"fine-tune {i} ({reader.root})"
        if reader.model_type != base.model_type:
            raise ValueError(
                f"{who} has model_type={reader.model_type!r} but the base ({base.root}) has "
                f"{base.model_type!r}; all experts must be fine-tunes of the same base architecture"
            )
        kwargs = translate_config(reader.config)["text_config"].to_dict()
        for name in STRUCTURAL_FIELDS:
            if kwargs.get(name) != base_kwargs.get(name):
                raise ValueError(
                    f"{who} has {name}={kwargs.get(name)!r} but the base ({base.root}) has "
                    f"{base_kwargs.get(name)!r}; all experts must be fine-tunes of the same base model"
                )
        differing = [k for k in base_kwargs if k not in STRUCTURAL_FIELDS and kwargs.get(k) != base_kwargs[k]]
        if differing:
            logger.warning(
                "%s differs from the base in %s; the merged model uses the base's values",
                who,
                ", ".join(differing),
            )


def _op(source: Any, name: str) -> str | None:
    try:
        return source.match(name)[1]
    except ValueError:  # unknown to the key table: reported as an extra tensor by _check_same_tensors
        return None


def _check_same_tensors(base: CheckpointReader, reader: CheckpointReader, who: str, skip: set[str]) -> None:
    names, base_names = set(reader.keys()) - skip, set(base.keys()) - skip
    if missing := sorted(base_names - names):
        raise ValueError(
            f"{who} lacks tensor {missing[0]!r} that the base ({base.root}) has"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if extra := sorted(names - base_names):
        raise ValueError(
            f"{who} has tensor {extra[0]!r} that the base ({base.root}) lacks"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for name in sorted(base_names):
        if reader.shape(name) != base.shape(name):
            raise ValueError(
                f"{who}: tensor {name!r} has shape {list(reader.shape(name))} but the base's is "
                f"{list(base.shape(name))}"
            )


def merge_experts(
    *,
    base: str | os.PathLike,
    experts: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    top_k: int = 2,
    router_type: str = "softmax_topk",
    router_init: str = "random",
    prompts: Any = None,
    shared: str = "base",
    num_shared_experts: int = 0,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    seed: int = 0,
    max_shard_size: int | str = "2GB",
    progress: bool = True,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Build an hf_moe MoE checkpoint whose experts are the MLPs of several fine-tunes of one base model.

    Expert ``e`` of every layer is fine-tune ``e``'s MLP, bit for bit (``gate_up_proj[e] = cat(gate, up)``,
    ``down_proj[e] = down``; with shared experts both the routed and the shared ``down_proj`` carry a factor
    1/2, as in upcycling, so that a merge of identical models stays function-preserving). Attention, norms,
    embeddings and lm_head come from the base or are averaged over the fine-tunes. Only one tensor of one
    model is in memory at a time, except with ``router_init="prompts"``, which loads the base model (float32)
    to run the prompts.

    Args:
        base: the dense base model folder (Llama/Mistral/Qwen2/Qwen3, safetensors); its tokenizer is copied.
        experts: fine-tune folders of that base, one per expert, in expert order.
        out_dir: destination; must not exist unless `overwrite`.
        top_k: experts per token.
        router_type: hf_moe router (topk_softmax, softmax_topk, sigmoid_topk, noisy_topk, switch,
            expert_choice).
        router_init: "random" (N(0, initializer_range^2) rows) or "prompts" (one prompt entry per fine-tune;
            see docs/merge.md), or any key of ``init.ROUTER_INITS``.
        prompts: YAML file or object for router_init="prompts".
        shared: "base" (non-MLP weights from the base) or "average" (element-wise mean over the fine-tunes).
        num_shared_experts: always-active experts made from the base MLP (0 = none).
        dtype: output dtype ("bfloat16", "float16", "float32"); None keeps the base's dtypes.
        overwrite: replace an existing `out_dir` (only once the new one is complete).
        seed: seed of the random router rows.
        max_shard_size: largest output shard ("2GB", "500MB", bytes).
        progress: show a tqdm bar over layers.
        config_overrides: extra HfMoeConfig fields (e.g. ``{"norm_topk_prob": False}``).

    Returns:
        `out_dir` as a Path.

    Raises:
        FileNotFoundError: a missing folder, config or shard (or prompts file).
        ValueError: bad options; a fine-tune whose model_type, config field, tensor name or shape differs from
            the base (the message names the model and the field or tensor); unreadable prompts.
        FileExistsError: `out_dir` exists and `overwrite` is False.
        ValueError: `out_dir` is, contains or lies inside the base or a fine-tune folder.

    Example:
    ```python
    >>> import hf_moe
    >>> hf_moe.merge_experts(base="llama-base", experts=["llama-code", "llama-math", "llama-wiki"],
    ...                      out_dir="llama-btx-3x", top_k=2, shared="average")
    ```
    """
    out_dir = Path(out_dir)
    _check_options(experts, top_k, shared, num_shared_experts, router_init, prompts)
    cast_dtype = parse_dtype(dtype)
    base, experts = (
        resolve_model(base),
        [resolve_model(e) for e in experts],
    )  # folders or Hub ids (org/name[@rev])
    inputs = [Path(base), *map(Path, experts)]
    check_out_dir(out_dir, inputs, overwrite=overwrite)  # before any work; atomic_output_dir checks again
    with ExitStack() as stack:
        base_reader = stack.enter_context(CheckpointReader(base))
        readers = [stack.enter_context(CheckpointReader(p)) for p in experts]
        plan = _plan(
            base_reader,
            readers,
            top_k=top_k,
            router_type=router_type,
            router_init=router_init,
            prompts=prompts,
            num_shared_experts=num_shared_experts,
            dtype=cast_dtype,
            seed=seed,
            config_overrides=config_overrides,
        )
        read = [p for r in (base_reader, *readers) for p in r.files_read]
        hasher = stack.enter_context(BackgroundHasher(read))
        options = dict(
            base=str(Path(base).resolve()),
            experts=[str(Path(p).resolve()) for p in experts],
            top_k=top_k,
            router_type=router_type,
            router_init=router_init,
            prompts=str(prompts) if prompts is not None else None,
            shared=shared,
            num_shared_experts=num_shared_experts,
            dtype=str(plan.out_dtype).removeprefix("torch."),
            seed=seed,
            max_shard_size=max_shard_size,
            config_overrides=config_overrides or {},
        )
        with atomic_output_dir(out_dir, overwrite=overwrite, inputs=[*inputs, *read]) as tmp:
            with ShardWriter(tmp, max_shard_size=max_shard_size) as writer:
                sink = CheckpointSink(writer, plan.expected)
                _stream(plan, base_reader, readers, sink, shared=shared, dtype=cast_dtype, progress=progress)
            checksums = hasher.results()
            finish_checkpoint(
                tmp,
                config=plan.config,
                source=base_reader,
                method="merge_experts",
                options=options,
                tokenizer_from=base_reader.root,
                record_tokenizer=True,
                checksums=checksums,
                extra={"experts": _expert_records(readers, checksums)},
            )
    return out_dir


def _check_options(
    experts: Any, top_k: Any, shared: str, num_shared_experts: Any, router_init: str, prompts: Any
) -> None:
    if isinstance(experts, str | os.PathLike) or not experts:
        raise ValueError("experts must be a non-empty list of fine-tune folders (one per expert)")
    num_experts = len(experts)
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} must be between 1 and the number of experts ({num_experts})")
    if shared not in SHARED_MODES:
        raise ValueError(f"shared={shared!r} is not supported; use one of {', '.join(SHARED_MODES)}")
    if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
        raise ValueError(f"num_shared_experts={num_shared_experts!r} must be a non-negative integer")
    get_router_init(router_init)  # an unknown name fails before any reading
    if prompts is not None and router_init in ("random", "virtual-group"):  # inits that read no prompts
        raise ValueError(
            f"prompts were given but router_init={router_init!r} would ignore them; pass "
            "router_init='prompts' (CLI: --router-init prompts) or drop the prompts"
        )


@dataclass
class _Plan:
    """What the base, the fine-tunes and the options imply, fixed before any output is written."""

    config: HfMoeConfig
    source: DenseSource
    dense: DensePlan
    expected: dict[str, tuple[int, ...]]
    out_dtype: torch.dtype
    num_shared_experts: int
    router_init: str
    router_for_layer: Callable[[int], torch.Tensor]


def _plan(
    base: CheckpointReader,
    readers: list[CheckpointReader],
    *,
    top_k: int,
    router_type: str,
    router_init: str,
    prompts: Any,
    num_shared_experts: int,
    dtype: torch.dtype | None,
    seed: int,
    config_overrides: dict[str, Any] | None,
) -> _Plan:
    """Validate every folder against the base (config, tensor names, shapes, dtypes) and map the base's tensors."""
    source = get_source(base.model_type)
    base_kwargs = translate_config(base.config)
    base_text = base_kwargs["text_config"]
    _check_compatible(base, base_text.to_dict(), readers)
    config = build_moe_config(
        base_kwargs,
        num_experts=len(readers),
        top_k=top_k,
        moe_width=base_text.intermediate_size,
        router_type=router_type,
        num_shared_experts=num_shared_experts,
        mlp_only_layers=[],
        overrides=config_overrides,
    )
    expected = expected_tensors(config)
    try:
        dense = plan_dense(base, source, config, expected)
    except ValueError as err:  # the plan's messages name tensors, not the folder: say it is the base
        raise ValueError(f"base {base.root}: {err}") from err
    for i, reader in enumerate(readers):
        skip = {n for r in (base, reader) for n in r.keys() if _op(source, n) == "skip"}
        _check_same_tensors(base, reader, f"fine-tune {i} ({reader.root})", skip)
    for reader in (base, *readers):
        check_floating_weights(reader)
    out_dtype = dtype or base.dtype(dense.layers[0][source.mlp_ops[0]])
    config.dtype = out_dtype
    # Prompts are validated (file, YAML, count) here, before any output exists.
    router_context = RouterInitContext(
        num_experts=len(readers),
        hidden_size=config.hidden_size,
        std=config.initializer_range,
        seed=seed,
        moe_layers=list(range(config.num_hidden_layers)),
        src_dir=base.root,
        reader=base,
        prompts=prompts,
    )
    router_for_layer = get_router_init(router_init)(router_context)
    return _Plan(
        config, source, dense, expected, out_dtype, num_shared_experts, router_init, router_for_layer
    )


def _stream(
    plan: _Plan,
    base: CheckpointReader,
    readers: list[CheckpointReader],
    sink: CheckpointSink,
    *,
    shared: str,
    dtype: torch.dtype | None,
    progress: bool,
) -> None:
    """Write every tensor, one decoder layer at a time, reading one tensor of one model at a time."""

    def combined(name: str) -> torch.Tensor | StoredTensor:
        return _shared_tensor(name, base, readers, shared=shared, dtype=dtype)

    config, num_shared = plan.config, plan.num_shared_experts
    routed_scale = 0.5 if num_shared else 1.0  # routed and shared halves sum to one MLP
    for src, dst in plan.dense.head:
        sink.add(dst, combined(src))
    for i in tqdm(range(config.num_hidden_layers), desc="merging layers", unit="layer", disable=not progress):
        layer_plan = plan.dense.layers[i]
        for src, dst in layer_plan["copy"]:
            sink.add(dst, combined(src))
        gate_up_parts, down_parts = [], []
        for reader in readers:  # one fine-tune's MLP at a time; the writer streams each part
            gate, up, down = dense_mlp(reader, layer_plan, plan.source)
            gate_up_parts.append(torch.cat([gate, up], dim=0).to(plan.out_dtype))  # (2I, H)
            down_parts.append(
                (down * routed_scale if routed_scale != 1.0 else down).to(plan.out_dtype)
            )  # (H, I)
        router = router_rows(plan.router_for_layer, i, router_init=plan.router_init, config=config)  # (E, H)
        shared_weights = None
        if num_shared:
            gate, up, down = dense_mlp(base, layer_plan, plan.source)
            shared_weights = shared_expert_weights(
                gate,
                up,
                down,
                width=config.shared_expert_intermediate_size,
                granularity=1,
                down_scale=0.5 / num_shared,
            )
        sink.write_moe_layer(
            i,
            gate_up=gate_up_parts,
            down=down_parts,
            router=router,
            shared=shared_weights,
            dtype=plan.out_dtype,
        )
        del gate_up_parts, down_parts
    for src, dst in plan.dense.tail:
        sink.add(dst, combined(src))
    sink.check_complete("merge")


def _shared_tensor(
    name: str,
    base: CheckpointReader,
    readers: list[CheckpointReader],
    *,
    shared: str,
    dtype: torch.dtype | None,
) -> torch.Tensor | StoredTensor:
    """A non-MLP tensor: the base's (its stored bytes when unchanged), or the fine-tunes' element-wise mean
    (accumulated in float32)."""
    if shared == "base":
        return unchanged_or_cast(base, name, name, dtype)
    total = readers[0].get_tensor(name).float()
    for reader in readers[1:]:
        total.add_(reader.get_tensor(name).float())
    return (total / len(readers)).to(dtype or base.dtype(name))


def _expert_records(readers: list[CheckpointReader], checksums: dict[str, str]) -> list[dict[str, Any]]:
    """The provenance entry of each fine-tune: its folder, model type and files' sha256."""
    return [
        {
            "path": str(r.root.resolve()),
            "model_type": r.model_type,
            "files_sha256": {str(p.relative_to(r.root)): checksums[str(p)] for p in r.files_read},
        }
        for r in readers
    ]


__all__ = ["SHARED_MODES", "STRUCTURAL_FIELDS", "merge_experts"]
