"""The conversion core: what upcycle, merge, export, import and compress share.

Every conversion is validate -> plan -> stream -> finish. This module holds the shared pieces of those steps; the
filesystem primitives (reading, shard writing, atomic folders, hashing, provenance records) stay in
:mod:`hf_moe.conversion.io`.

- validate: :func:`parse_dtype` (the one dtype parser), :func:`expected_tensors` (the one list of the tensors an
  hf_moe checkpoint of a config holds) and :func:`check_tensors`;
- plan: :func:`build_moe_config` (the MoE config on top of a dense decoder) and :func:`plan_dense` (every tensor
  of a dense checkpoint mapped to its target, shapes checked from the headers);
- stream: :class:`CheckpointSink` writes tensors and whole MoE layers (fused experts, router, router state,
  shared experts) through :class:`~hf_moe.conversion.io.ShardWriter` and checks the result is complete;
  :class:`BackgroundHasher` hashes the inputs meanwhile;
- finish: :func:`finish_checkpoint` writes config.json (and, for hf_moe, the remote code), the tokenizer files,
  the provenance record and the model card into the temporary folder that
  :func:`~hf_moe.conversion.io.atomic_output_dir` then publishes.

Example:
```python
>>> with CheckpointReader(src) as reader, atomic_output_dir(out) as tmp:
...     with ShardWriter(tmp) as writer:
...         sink = CheckpointSink(writer, expected_tensors(config))
...         ...  # sink.add(...), sink.write_moe_layer(...)
...         sink.check_complete("upcycle")
...     finish_checkpoint(tmp, config=config, source=reader, method="upcycle", options={})
```
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.dynamic_module_utils import get_relative_import_files

from ..hub import write_model_card
from ..modeling import HfMoeConfig, HfMoeForCausalLM
from .io import (
    PROVENANCE_NAME,
    CheckpointReader,
    ShardWriter,
    StoredTensor,
    copy_tokenizer_files,
    sha256_file,
    write_provenance,
)
from .sources import DenseSource

logger = logging.getLogger(__name__)

# ================================================================================================================
# Validate.
# ================================================================================================================

DTYPES: dict[str, torch.dtype] = {
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
FP32_SUFFIXES = (".e_score_correction_bias",)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`torch.dtype` for "bfloat16"/"bf16"/"float16"/"fp16"/"float32"/"fp32" (or a dtype); None stays None.

    Raises:
        ValueError: any other name or dtype.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in set(DTYPES.values()):
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16 (or fp32, bf16, fp16), or None to "
            "keep the source's"
        )
    return DTYPES[key]


def stored_dtype(name: str, src_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a converted checkpoint stores tensor `name` in: `dtype` for floating-point tensors (None keeps the
    source's), routing biases always float32."""
    if name.endswith(FP32_SUFFIXES):
        return torch.float32
    if dtype is not None and src_dtype.is_floating_point:
        return dtype
    return src_dtype


def cast_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in the dtype the output stores `name` in (:func:`stored_dtype`)."""
    return tensor.to(stored_dtype(name, tensor.dtype, dtype))


def unchanged_or_cast(
    reader: CheckpointReader, src: str, dst: str, dtype: torch.dtype | None
) -> torch.Tensor | StoredTensor:
    """Source tensor `src` as the output stores it under `dst`. Where that leaves the bytes as they are, the
    stored bytes (:meth:`CheckpointReader.stored`: the writer copies them file to file and nothing is read); else
    the cast tensor."""
    if stored_dtype(dst, reader.dtype(src), dtype) == reader.dtype(src):
        return reader.stored(src)
    return cast_tensor(dst, reader.get_tensor(src), dtype)


def expected_tensors(config: HfMoeConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an hf_moe checkpoint of `config` holds (a tied lm_head is not stored).

    The names and shapes come from the model class itself, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = HfMoeForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_tensors(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    """Raise ValueError naming the missing, unexpected and mis-shaped tensors of a checkpoint at `where`."""
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


def source_history(model_dir: Path) -> dict[str, Any]:
    """Provenance entries a conversion of `model_dir` inherits: the history of the source (each earlier step's
    record) plus its license / base_model, so that cards keep them. Empty when the source has no record."""
    path = model_dir / PROVENANCE_NAME
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("%s is not valid JSON; the provenance will not include its history", path)
        return {}
    history = list(previous.get("history", []))
    history.append({k: v for k, v in previous.items() if k != "history"})
    extra: dict[str, Any] = {"history": history}
    for key in ("license", "base_model"):
        if previous.get(key):
            extra[key] = previous[key]
    return extra


# ================================================================================================================
# Plan.
# ================================================================================================================


def build_moe_config(
    dense_kwargs: dict[str, Any],
    *,
    num_experts: int,
    top_k: int,
    moe_width: int,
    router_type: str,
    num_shared_experts: int,
    mlp_only_layers: list[int],
    dtype: torch.dtype | None = None,
    overrides: dict[str, Any] | None = None,
) -> HfMoeConfig:
    """The HfMoeConfig of an MoE model on top of a dense decoder (`translate_config`'s keyword arguments).

    Shared experts are `num_shared_experts` copies of the routed width; `overrides` win over everything."""
    if router_type == "expert_choice":
        dense_kwargs["text_config"].use_cache = False  # expert choice is not causal (see HfMoeConfig)
    config = HfMoeConfig(
        **{
            **dense_kwargs,
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            "moe_intermediate_size": moe_width,
            "router_type": router_type,
            "num_shared_experts": num_shared_experts,
            "shared_expert_intermediate_size": num_shared_experts * moe_width,
            "mlp_only_layers": mlp_only_layers,
            **(overrides or {}),
        }
    )
    config.architectures = ["HfMoeForCausalLM"]
    if dtype is not None:
        config.dtype = dtype
    return config


@dataclass
class DensePlan:
    """Where every tensor of a dense checkpoint goes.

    Attributes:
        head: (source, target) copies before the decoder layers (embeddings).
        layers: per layer, ``{"copy": [(source, target)], "mlp.gate"/"mlp.up"/"mlp.gate_up"/"mlp.down": source}``.
        tail: (source, target) copies after the layers (final norm, lm_head).
    """

    head: list[tuple[str, str]] = field(default_factory=list)
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    tail: list[tuple[str, str]] = field(default_factory=list)


def plan_dense(
    reader: CheckpointReader, source: DenseSource, config: HfMoeConfig, expected: dict[str, tuple[int, ...]]
) -> DensePlan:
    """Map every tensor of a dense checkpoint to its target and check shapes against `config`, reading headers only.

    Raises:
        ValueError: a tensor outside the model, a shape that does not match the config, or a missing tensor.
    """
    plan = DensePlan()
    layers: dict[int, dict[str, Any]] = defaultdict(lambda: {"copy": []})
    text = config.get_text_config()
    inter, hidden = text.intermediate_size, text.hidden_size
    mlp_shapes = {
        "mlp.gate": (inter, hidden),
        "mlp.up": (inter, hidden),
        "mlp.gate_up": (2 * inter, hidden),
        "mlp.down": (hidden, inter),
    }
    for name in reader.keys():
        target, op, layer = source.match(name)
        if layer is not None and not 0 <= layer < config.num_hidden_layers:
            raise ValueError(
                f"tensor {name!r} belongs to layer {layer}, but config.json has num_hidden_layers="
                f"{config.num_hidden_layers}"
            )
        if op == "skip" or (op == "lm_head" and config.tie_word_embeddings):
            continue
        shape = reader.shape(name)
        if op in mlp_shapes:
            if shape != mlp_shapes[op]:
                raise ValueError(
                    f"tensor {name!r} has shape {list(shape)} but config.json (hidden_size={hidden}, "
                    f"intermediate_size={inter}) implies {list(mlp_shapes[op])}; the weights do not match the config"
                )
            if layer is None:
                raise ValueError(f"tensor {name!r} looks like an MLP weight but names no decoder layer")
            layers[layer][op] = name
            continue
        if target not in expected:
            raise ValueError(
                f"tensor {name!r} maps to {target!r}, which the hf_moe model built from config.json does not have "
                "(e.g. a bias the config does not enable); the weights do not match the config"
            )
        if tuple(expected[target]) != shape:
            raise ValueError(
                f"tensor {name!r} has shape {list(shape)} but config.json implies {list(expected[target])}; the "
                "weights do not match the config"
            )
        if layer is not None:
            layers[layer]["copy"].append((name, target))
        elif target.startswith("model.embed_tokens"):
            plan.head.append((name, target))
        else:
            plan.tail.append((name, target))
    for i in range(config.num_hidden_layers):
        if any(op not in layers[i] for op in source.mlp_ops):
            expected_names = [
                f"model.layers.{i}.mlp.{op.removeprefix('mlp.')}_proj.weight" for op in source.mlp_ops
            ]
            raise ValueError(
                f"the checkpoint lacks the MLP weights of layer {i}: expected {expected_names} ({source.model_type} "
                f"names its MLP {source.mlp!r}); is this a complete {source.model_type} checkpoint?"
            )
    plan.layers = dict(layers)
    # Everything the target model needs must come from somewhere (MLP/MoE tensors are made from the MLP).
    produced = {dst for _, dst in plan.head + plan.tail} | {
        dst for lay in plan.layers.values() for _, dst in lay["copy"]
    }
    missing = sorted(k for k in expected if k not in produced and ".mlp." not in k)
    if missing:
        raise ValueError(f"the checkpoint lacks tensors the target model needs: {missing[:8]}")
    return plan


def dense_mlp(
    reader: CheckpointReader, layer_plan: dict[str, Any], source: DenseSource
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's dense MLP as (gate (I, H), up (I, H), down (H, I)), whichever way the family names it."""
    if source.mlp == "fused":
        gate, up = reader.get_tensor(layer_plan["mlp.gate_up"]).chunk(2, dim=0)  # gate rows, then up rows
    else:
        gate, up = reader.get_tensor(layer_plan["mlp.gate"]), reader.get_tensor(layer_plan["mlp.up"])
    return gate, up, reader.get_tensor(layer_plan["mlp.down"])


def router_rows(
    router_for_layer: Callable[[int], torch.Tensor], layer: int, *, router_init: str, config: HfMoeConfig
) -> torch.Tensor:
    """The (E, H) router rows a router init gives `layer`, checked for shape."""
    router = router_for_layer(layer)
    if tuple(router.shape) != (config.num_experts, config.hidden_size):
        raise ValueError(
            f"router_init={router_init!r} returned shape {list(router.shape)} for layer {layer}; expected "
            f"{[config.num_experts, config.hidden_size]}"
        )
    return router


# ================================================================================================================
# Stream.
# ================================================================================================================


class CheckpointSink:
    """Writes an hf_moe checkpoint's tensors through a ShardWriter, remembering which it wrote.

    Args:
        writer: the open shard writer.
        expected: name -> shape the finished checkpoint must hold (:func:`expected_tensors`).
    """

    def __init__(self, writer: ShardWriter, expected: dict[str, tuple[int, ...]]):
        self.writer = writer
        self.expected = expected
        self.written: dict[str, tuple[int, ...]] = {}  # name -> shape

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        self.writer.add(name, tensor)
        self.written[name] = tuple(tensor.shape)

    def add_stacked(self, name: str, parts: Sequence[torch.Tensor]) -> None:
        """``torch.stack(parts)`` under `name`, streamed part by part (repeated parts cost no memory)."""
        self.writer.add_stacked(name, list(parts))
        self.written[name] = (len(parts), *parts[0].shape)

    def write_moe_layer(
        self,
        layer: int,
        *,
        gate_up: Sequence[torch.Tensor],
        down: Sequence[torch.Tensor],
        router: torch.Tensor,
        shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        dtype: torch.dtype,
    ) -> None:
        """One MoE layer in `dtype`: fused experts from per-expert parts (gate_up (2I, H), down (H, I) each),
        the router weight (E, H), shared experts (gate, up, down) if any, and the other router tensors of the
        config (DeepSeek-V3 correction bias, noisy-top-k noise projection) at zero, the correction bias in fp32."""
        prefix = f"model.layers.{layer}.mlp."
        self.add_stacked(f"{prefix}experts.gate_up_proj", [p.to(dtype) for p in gate_up])  # (E, 2I, H)
        self.add_stacked(f"{prefix}experts.down_proj", [p.to(dtype) for p in down])  # (E, H, I)
        self.add(f"{prefix}gate.weight", router.to(dtype))
        if shared is not None:
            for name, tensor in zip(("gate_proj", "up_proj", "down_proj"), shared, strict=True):
                self.add(f"{prefix}shared_experts.{name}.weight", tensor.to(dtype))
        for name, shape in self.expected.items():
            if name.startswith(f"{prefix}gate.") and name not in self.written:
                keep_fp32 = name.endswith(FP32_SUFFIXES)
                self.add(name, torch.zeros(shape, dtype=torch.float32 if keep_fp32 else dtype))

    def check_complete(self, method: str) -> None:
        """Fail before publishing if the tensors written are not those expected (a bug in a key table)."""
        missing = sorted(set(self.expected) - set(self.written))
        extra = sorted(set(self.written) - set(self.expected))
        if missing or extra:
            raise ValueError(
                f"{method} produced a checkpoint that does not match the config: missing {missing[:8]}, "
                f"unexpected {extra[:8]}"
            )


class BackgroundHasher:
    """sha256 of the input files, computed in a thread while the conversion streams (hashlib releases the GIL),
    instead of a serial pass over the inputs at the end. A context manager: leaving it cancels what is left."""

    def __init__(self, files: Iterable[Path]):
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._jobs: dict[str, Future[str]] = {str(p): self._pool.submit(sha256_file, p) for p in files}

    def results(self) -> dict[str, str]:
        """``{str(path): sha256}``, waiting for the hashes still running."""
        return {path: job.result() for path, job in self._jobs.items()}

    def __enter__(self) -> BackgroundHasher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ================================================================================================================
# Finish.
# ================================================================================================================

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"


def remote_code_files() -> list[Path]:
    """The modeling files a checkpoint ships as Hub remote code (what `trust_remote_code=True` loads without
    hf_moe installed): modeling_hf_moe.py and every sibling it imports, found as `save_pretrained` finds them."""
    model_file = MODELING_DIR / "modeling_hf_moe.py"
    return sorted({model_file, *map(Path, get_relative_import_files(str(model_file)))})


def save_hf_moe_config(config: HfMoeConfig, out: Path, *, generation_config: bool = False) -> None:
    """config.json (with `auto_map`, which HfMoeConfig writes once hf_moe is imported) and the remote code; with
    `generation_config`, also the generation defaults the model class derives from the config."""
    config.save_pretrained(out)
    for path in remote_code_files():
        shutil.copyfile(path, out / path.name)
    if generation_config:
        GenerationConfig.from_model_config(config).save_pretrained(out)


def write_config_json(out: Path, config: dict[str, Any]) -> None:
    """config.json of a checkpoint whose config is a plain dict (native formats), keys sorted."""
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_hf_moe_card(out: Path, model_name: str) -> None:
    """The model card of an hf_moe checkpoint (hf_moe.hub); a card that cannot be written is only a warning."""
    try:
        write_model_card(out, model_name=model_name)
    except (ImportError, FileNotFoundError, ValueError) as err:
        logger.warning("model card not written (%s)", err)


def finish_checkpoint(
    out: Path,
    *,
    config: HfMoeConfig | dict[str, Any] | None,
    source: CheckpointReader,
    method: str,
    options: dict[str, Any],
    tokenizer_from: Path | None = None,
    source_files: list[Path] | None = None,
    record_tokenizer: bool = False,
    checksums: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    generation_config: bool = False,
    card: Callable[[Path], object] | None = None,
) -> None:
    """Complete a converted checkpoint in its temporary folder, after the weights: config, remote code, tokenizer,
    provenance, card. :func:`~hf_moe.conversion.io.atomic_output_dir` publishes the folder afterwards.

    Args:
        out: the temporary output folder.
        config: an HfMoeConfig (saved with `auto_map` and the remote code), a native config dict (written as
            config.json), or None (already written).
        source: the reader of the source checkpoint (recorded in the provenance).
        method: the provenance method ("upcycle", "merge_experts", "export", "import", "compress").
        options: the conversion options, as recorded.
        tokenizer_from: folder whose tokenizer files are copied (None: none).
        source_files: files whose sha256 is recorded (default: those the reader read).
        record_tokenizer: also record the copied tokenizer files' sha256.
        checksums: sha256 already computed (:class:`BackgroundHasher`).
        extra: more top-level provenance entries.
        generation_config: write the generation defaults derived from an HfMoeConfig.
        card: writes the model card into `out`, last (it reads the provenance).
    """
    if isinstance(config, HfMoeConfig):
        save_hf_moe_config(config, out, generation_config=generation_config)
    elif config is not None:
        write_config_json(out, config)
    copied = copy_tokenizer_files(tokenizer_from, out) if tokenizer_from is not None else []
    files = list(source.files_read) if source_files is None else list(source_files)
    write_provenance(
        out,
        source=source,
        method=method,
        options=options,
        source_files=[*files, *copied] if record_tokenizer else files,
        checksums=checksums,
        extra=extra,
    )
    if card is not None:
        card(out)


__all__ = [
    "DTYPES",
    "MODELING_DIR",
    "BackgroundHasher",
    "CheckpointSink",
    "DensePlan",
    "build_moe_config",
    "cast_tensor",
    "check_tensors",
    "dense_mlp",
    "expected_tensors",
    "finish_checkpoint",
    "parse_dtype",
    "plan_dense",
    "remote_code_files",
    "router_rows",
    "save_hf_moe_config",
    "source_history",
    "unchanged_or_cast",
    "write_config_json",
    "write_hf_moe_card",
]
