"""Upcycling: turn a dense Llama/Mistral/Qwen2/Qwen3 checkpoint into an hf_moe Mixture-of-Experts checkpoint,
streamed layer by layer.

The dense folder is validated first (config, shards, tensor shapes against the target config); then the output is
written into a temporary folder beside OUT_DIR, one decoder layer at a time, and renamed into place when
complete. See docs/upcycling.md for the exactness conditions and the shared-expert scheme.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..hub_ids import resolve_model
from ..modeling import ROUTERS, HfMoeConfig
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
from .init import (
    RouterInitContext,
    add_relative_noise,
    drop_upcycle,
    expert_weights,
    get_router_init,
    seeded_generator,
    shared_expert_weights,
)
from .io import CheckpointReader, ShardWriter, atomic_output_dir, check_floating_weights, check_out_dir
from .sources import DenseSource, get_source, translate_config

logger = logging.getLogger(__name__)


def parse_moe_layers(moe_layers: str | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    """Layer indices that become MoE.

    Args:
        moe_layers: ``"all"``; ``"every-N"`` (layers N-1, 2N-1, ..., the ``decoder_sparse_step`` convention);
            ranges and lists such as ``"0-11"`` or ``"0,2,4-6"`` (inclusive); or a list of ints.
        num_layers: decoder layers of the model.

    Raises:
        ValueError: unparsable, out of range, or selecting no layer.
    """
    if isinstance(moe_layers, str):
        spec = moe_layers.strip().lower()
        if spec == "all":
            layers = list(range(num_layers))
        elif m := re.fullmatch(r"every-(\d+)", spec):
            step = int(m.group(1))
            if step < 1:
                raise ValueError(f"moe_layers={moe_layers!r}: the step must be >= 1")
            layers = [i for i in range(num_layers) if (i + 1) % step == 0]
        elif re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", spec.replace(" ", "")):
            layers = []
            for part in spec.replace(" ", "").split(","):
                lo, _, hi = part.partition("-")
                if hi and int(hi) < int(lo):
                    raise ValueError(f"moe_layers={moe_layers!r}: range {part} is reversed")
                layers.extend(range(int(lo), int(hi or lo) + 1))
        else:
            raise ValueError(
                f"cannot parse moe_layers={moe_layers!r}; use 'all', 'every-N', ranges like '0-11' or '0,2,4-6', or a "
                "list of layer indices"
            )
    else:
        layers = [int(i) for i in moe_layers]
    bad = sorted({i for i in layers if not 0 <= i < num_layers})
    if bad:
        raise ValueError(f"moe_layers selects layers {bad} but the model has layers 0..{num_layers - 1}")
    layers = sorted(set(layers))
    if not layers:
        raise ValueError(f"moe_layers={moe_layers!r} selects no layer of the {num_layers}-layer model")
    return layers


def _weights_sum_to_one(config: HfMoeConfig) -> str | None:
    """None if the router's top-k weights sum to one for every token (in eval), else why not (the router's policy)."""
    return ROUTERS[config.router_type].weights_sum_to_one(config)


def exactness_problems(
    config: HfMoeConfig,
    *,
    granularity: int,
    router_init: str,
    drop_ratio: float,
    noise_std: float,
    group_rows: bool = False,
) -> list[str]:
    """Reasons why the upcycled model would *not* reproduce the dense model's outputs at initialisation (an
    empty list means it does, up to floating-point rounding). `group_rows`: the router init gives all members of a
    virtual group one row (as "virtual-group" does, and "prompts" with one entry per group). See
    docs/upcycling.md."""
    problems = []
    if (why := _weights_sum_to_one(config)) is not None:
        problems.append(why)
    if granularity > 1:
        if config.num_experts_per_tok % granularity:
            problems.append(
                f"top_k={config.num_experts_per_tok} is not a multiple of granularity={granularity}, so a token "
                "cannot select whole virtual groups (all slices of one MLP copy)"
            )
        if router_init != "virtual-group" and not group_rows:
            problems.append(
                f"granularity={granularity} needs router_init='virtual-group' (got {router_init!r})"
            )
        if (
            config.router_type == "sigmoid_topk"
            and config.n_group > 1
            and (config.num_experts // config.n_group) % granularity
        ):
            problems.append(
                f"routing groups of {config.num_experts // config.n_group} experts split virtual groups of "
                f"{granularity}"
            )
    if config.num_shared_experts and config.num_shared_experts % granularity:
        problems.append(
            f"num_shared_experts={config.num_shared_experts} is not a multiple of granularity={granularity}, so "
            "the shared block does not hold whole copies of the dense MLP"
        )
    if drop_ratio > 0:
        problems.append(f"drop_ratio={drop_ratio} re-initialises expert units")
    if noise_std > 0:
        problems.append(f"noise_std={noise_std} perturbs the experts")
    return problems


def upcycle(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_experts: int,
    top_k: int,
    router_type: str = "softmax_topk",
    granularity: int = 1,
    num_shared_experts: int = 0,
    drop_ratio: float = 0.0,
    noise_std: float = 0.0,
    router_init: str | None = None,
    prompts: Any = None,
    moe_layers: str | list[int] = "all",
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
    progress: bool = True,
    require_exact: bool = False,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Upcycle a dense checkpoint folder into an hf_moe MoE checkpoint folder.

    Every selected layer's MLP becomes `num_experts` experts initialised from it (copies, or `granularity`
    slices), plus optional shared experts; embeddings, norms and attention are copied. With the defaults the
    upcycled model computes the same logits as the dense model (see :func:`exactness_problems` and
    docs/upcycling.md).

    Args:
        src_dir: dense Hugging Face folder (config.json + safetensors); model_type llama, mistral, qwen2 or qwen3.
        out_dir: destination; must not exist unless `overwrite`.
        num_experts: routed experts per MoE layer.
        top_k: experts per token.
        router_type: hf_moe router (topk_softmax, softmax_topk, sigmoid_topk, noisy_topk, switch, expert_choice).
        granularity: slices per dense MLP (fine-grained upcycling); expert width = intermediate_size / granularity.
        num_shared_experts: always-active experts made from the dense MLP (their output and the routed output
            are each scaled by 1/2, keeping the sum exact).
        drop_ratio: Drop-Upcycling fraction of re-initialised units per expert.
        noise_std: Gaussian noise on expert weights, relative to each matrix's std.
        router_init: key of ``init.ROUTER_INITS`` ("random", "virtual-group", "prompts"); default
            "virtual-group" when granularity > 1 else "random".
        prompts: input for router_init="prompts".
        moe_layers: "all", "every-N", "0-11", "0,2,5-7" or a list of indices; other layers stay dense.
        dtype: output dtype ("bfloat16", "float16", "float32"); None keeps the source dtype.
        seed: seed for router rows, drop and noise.
        max_shard_size: largest output shard ("2GB", "500MB", bytes).
        overwrite: replace an existing `out_dir` (only once the new one is complete).
        progress: show a tqdm bar over layers.
        require_exact: raise ValueError if the options make the model differ from the dense one at init.
        config_overrides: extra HfMoeConfig fields (e.g. ``{"norm_topk_prob": False, "n_group": 2}``).

    Returns:
        `out_dir` as a Path.

    Raises:
        FileNotFoundError / ValueError: bad input (see :class:`~hf_moe.conversion.io.CheckpointReader`), an
            unsupported architecture or option, inconsistent MoE options, or weights that do not match the config.
        FileExistsError: `out_dir` exists and `overwrite` is False.

    Example:
    ```python
    >>> import hf_moe
    >>> hf_moe.upcycle("SmolLM2-135M", "SmolLM2-8x135M", num_experts=8, top_k=2)
    ```
    """
    src_dir = resolve_model(src_dir)  # a local folder, or a Hub repo id downloaded to the cache
    out_dir = check_out_dir(out_dir, [src_dir], overwrite=overwrite)
    options = _Options(
        num_experts=num_experts,
        top_k=top_k,
        router_type=router_type,
        granularity=granularity,
        num_shared_experts=num_shared_experts,
        drop_ratio=drop_ratio,
        noise_std=noise_std,
        router_init=router_init,
        prompts=prompts,
        moe_layers=moe_layers,
        dtype=dtype,
        seed=seed,
        max_shard_size=max_shard_size,
        config_overrides=config_overrides or {},
    )
    with CheckpointReader(src_dir) as reader:
        plan = _plan(reader, options, require_exact=require_exact)
        with (
            BackgroundHasher(reader.files_read) as hasher,
            atomic_output_dir(out_dir, overwrite=overwrite, inputs=[src_dir, *reader.files_read]) as tmp,
        ):
            with ShardWriter(tmp, max_shard_size=max_shard_size) as writer:
                _stream(reader, plan, options, CheckpointSink(writer, plan.expected), progress=progress)
            finish_checkpoint(
                tmp,
                config=plan.config,
                source=reader,
                method="upcycle",
                options=options.record(plan),
                tokenizer_from=reader.root,
                record_tokenizer=True,
                checksums=hasher.results(),
                extra={
                    "function_preserving": not plan.problems,
                    "not_function_preserving_because": plan.problems,
                },
            )
    return out_dir


@dataclass
class _Options:
    """The options of one upcycle run, checked when built (before the source is read)."""

    num_experts: int
    top_k: int
    router_type: str
    granularity: int
    num_shared_experts: int
    drop_ratio: float
    noise_std: float
    router_init: str | None
    prompts: Any
    moe_layers: str | list[int]
    dtype: str | torch.dtype | None
    seed: int
    max_shard_size: int | str
    config_overrides: dict[str, Any]

    def __post_init__(self) -> None:
        num_experts, granularity = self.num_experts, self.granularity
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts={num_experts!r} must be a positive integer")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k={self.top_k!r} must be between 1 and num_experts={num_experts}")
        if not isinstance(granularity, int) or granularity < 1 or num_experts % granularity:
            raise ValueError(
                f"granularity={granularity!r} must be a positive integer dividing num_experts={num_experts}"
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={self.num_shared_experts} must be >= 0")
        if not 0.0 <= self.drop_ratio <= 1.0:
            raise ValueError(f"drop_ratio={self.drop_ratio} must be in [0, 1]")
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std} must be >= 0")
        self.router_init = self.router_init or ("virtual-group" if granularity > 1 else "random")
        get_router_init(self.router_init)  # an unknown name fails here, before any reading
        parse_dtype(self.dtype)

    @property
    def cast_dtype(self) -> torch.dtype | None:
        """The requested output dtype (None: keep the source's)."""
        return parse_dtype(self.dtype)

    @property
    def perturbed(self) -> bool:
        """Drop-Upcycling or noise: every expert differs, so each is built in full."""
        return self.drop_ratio > 0 or self.noise_std > 0

    def record(self, plan: _Plan) -> dict[str, Any]:
        """The options as the provenance records them."""
        return dict(
            num_experts=self.num_experts,
            top_k=self.top_k,
            router_type=self.router_type,
            granularity=self.granularity,
            num_shared_experts=self.num_shared_experts,
            drop_ratio=self.drop_ratio,
            noise_std=self.noise_std,
            router_init=self.router_init,
            prompts=str(self.prompts) if self.prompts is not None else None,
            moe_layers=plan.moe_layers,
            dtype=str(plan.out_dtype).removeprefix("torch."),
            seed=self.seed,
            max_shard_size=self.max_shard_size,
            config_overrides=self.config_overrides,
        )


@dataclass
class _Plan:
    """What the source and the options imply, fixed before any output is written."""

    config: HfMoeConfig
    source: DenseSource
    dense: DensePlan
    expected: dict[str, tuple[int, ...]]
    moe_layers: list[int]
    out_dtype: torch.dtype
    router_for_layer: Callable[[int], torch.Tensor]
    problems: list[str]  # why the model will not reproduce the dense one (empty: it will)


def _plan(reader: CheckpointReader, options: _Options, *, require_exact: bool) -> _Plan:
    """Validate the dense checkpoint against the options and map every tensor, reading headers only."""
    check_floating_weights(reader)
    source = get_source(reader.model_type)
    dense_kwargs = translate_config(reader.config)
    text = dense_kwargs["text_config"]
    inter, granularity = text.intermediate_size, options.granularity
    if inter % granularity:
        raise ValueError(f"granularity={granularity} must divide the dense intermediate_size={inter}")
    num_layers = text.num_hidden_layers
    moe_idx = parse_moe_layers(options.moe_layers, num_layers)
    mlp_names = [n for n in reader.keys() if source.match(n)[1] in source.mlp_ops]
    if not mlp_names:
        raise ValueError(
            f"{reader.root}: the {source.model_type} checkpoint has no MLP tensors (expected "
            f"model.layers.N.mlp.{'gate_up_proj' if source.mlp == 'fused' else 'gate_proj'}.weight and its "
            "siblings); there is nothing to turn into experts"
        )
    out_dtype = options.cast_dtype or reader.dtype(mlp_names[0])
    config = build_moe_config(
        dense_kwargs,
        num_experts=options.num_experts,
        top_k=options.top_k,
        moe_width=inter // granularity,
        router_type=options.router_type,
        num_shared_experts=options.num_shared_experts,
        mlp_only_layers=[i for i in range(num_layers) if i not in moe_idx],
        dtype=out_dtype,
        overrides=options.config_overrides,
    )
    problems = _problems(config, options, require_exact=require_exact)
    expected = expected_tensors(config)
    dense = plan_dense(reader, source, config, expected)
    router_context = RouterInitContext(
        num_experts=options.num_experts,
        hidden_size=config.hidden_size,
        granularity=granularity,
        std=config.initializer_range,
        seed=options.seed,
        moe_layers=moe_idx,
        src_dir=reader.root,
        reader=reader,
        prompts=options.prompts,
    )
    router_for_layer = get_router_init(str(options.router_init))(router_context)
    return _Plan(config, source, dense, expected, moe_idx, out_dtype, router_for_layer, problems)


def _problems(config: HfMoeConfig, options: _Options, *, require_exact: bool) -> list[str]:
    """exactness_problems for these options; raised with `require_exact`, else logged."""
    granularity, prompts = options.granularity, options.prompts
    # Prompt-based rows keep virtual groups when the prompts list one entry per group (prompts.py).
    group_rows = (
        options.router_init == "prompts"
        and prompts is not None
        and granularity > 1
        and (
            len(import_module(".prompts", __package__).load_prompts(prompts).experts) * granularity
            == options.num_experts
        )
    )
    problems = exactness_problems(
        config,
        granularity=granularity,
        router_init=str(options.router_init),
        drop_ratio=options.drop_ratio,
        noise_std=options.noise_std,
        group_rows=group_rows,
    )
    if problems and require_exact:
        raise ValueError(
            "require_exact=True but the upcycled model would differ from the dense one: "
            + "; ".join(problems)
        )
    if problems:
        logger.warning("upcycled model will not reproduce the dense model at init: %s", "; ".join(problems))
    return problems


def _stream(
    reader: CheckpointReader, plan: _Plan, options: _Options, sink: CheckpointSink, *, progress: bool
) -> None:
    """Write every tensor, one decoder layer at a time: copies, dense MLPs of the dense layers, MoE layers."""
    dtype = options.cast_dtype

    def copy(src: str, dst: str) -> None:
        sink.add(dst, unchanged_or_cast(reader, src, dst, dtype))

    for src, dst in plan.dense.head:
        copy(src, dst)
    num_layers = plan.config.num_hidden_layers
    for i in tqdm(range(num_layers), desc="upcycling layers", unit="layer", disable=not progress):
        layer_plan = plan.dense.layers[i]
        for src, dst in layer_plan["copy"]:
            copy(src, dst)
        if i not in plan.moe_layers:  # the base's own dense MLP, under its own names
            for op in plan.source.mlp_ops:
                copy(layer_plan[op], layer_plan[op])
            continue
        gate, up, down = dense_mlp(reader, layer_plan, plan.source)  # (I, H), (I, H), (H, I)
        gate_up_parts, down_parts = _experts(gate, up, down, options, layer=i, dtype=plan.out_dtype)
        shared = None
        if options.num_shared_experts:
            shared = shared_expert_weights(
                gate,
                up,
                down,
                width=plan.config.shared_expert_intermediate_size,
                granularity=options.granularity,
                down_scale=0.5 / (options.num_shared_experts / options.granularity),
            )
        router = router_rows(
            plan.router_for_layer, i, router_init=str(options.router_init), config=plan.config
        )  # (E, H)
        sink.write_moe_layer(
            i, gate_up=gate_up_parts, down=down_parts, router=router, shared=shared, dtype=plan.out_dtype
        )
    for src, dst in plan.dense.tail:
        copy(src, dst)
    sink.check_complete("upcycle")


def _experts(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    options: _Options,
    *,
    layer: int,
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-expert (gate_up (2I/g, H), down (H, I/g)) weights of one layer, in `dtype`."""
    num_experts, granularity = options.num_experts, options.granularity
    # Routed and shared outputs each carry half of the dense output when both exist (docs/upcycling.md).
    routed_scale = granularity * (0.5 if options.num_shared_experts else 1.0)
    if not options.perturbed:
        # Experts are repeats of `granularity` distinct slices: build only those and let the writer repeat their
        # bytes (no (E, ...) tensor in memory).
        gate_up_s, down_s = expert_weights(
            gate, up, down, num_experts=granularity, granularity=granularity, down_scale=routed_scale
        )  # (g, 2I/g, H), (g, H, I/g)
        gate_up_s, down_s = gate_up_s.to(dtype), down_s.to(dtype)
        slice_of = [e % granularity for e in range(num_experts)]
        return [gate_up_s[j] for j in slice_of], [down_s[j] for j in slice_of]
    gate_up_w, down_w = expert_weights(
        gate, up, down, num_experts=num_experts, granularity=granularity, down_scale=routed_scale
    )  # (E, 2I/g, H), (E, H, I/g)
    if options.drop_ratio > 0:
        gate_up_w, down_w, _ = drop_upcycle(
            gate_up_w,
            down_w,
            drop_ratio=options.drop_ratio,
            generator=seeded_generator(options.seed, "drop", layer),
        )
    if options.noise_std > 0:
        gate_up_w, down_w = add_relative_noise(
            gate_up_w,
            down_w,
            noise_std=options.noise_std,
            generator=seeded_generator(options.seed, "noise", layer),
        )
    return list(gate_up_w.to(dtype)), list(down_w.to(dtype))
