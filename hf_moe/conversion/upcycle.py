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
import shutil
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..hub_ids import resolve_model
from ..modeling import ROUTERS, HfMoeConfig, HfMoeForCausalLM
from .init import (
    RouterInitContext,
    add_relative_noise,
    drop_upcycle,
    expert_weights,
    get_router_init,
    seeded_generator,
    shared_expert_weights,
)
from .io import (
    CheckpointReader,
    ShardWriter,
    atomic_output_dir,
    check_floating_weights,
    check_out_dir,
    copy_tokenizer_files,
    sha256_file,
    write_provenance,
)
from .sources import DenseSource, get_source, translate_config

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"
REMOTE_CODE_FILES = ("configuration_hf_moe.py", "modeling_hf_moe.py", "experts.py")


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


def _expected_shapes(config: HfMoeConfig) -> dict[str, tuple[torch.Size, torch.dtype]]:
    # The target parameter names and shapes come from the model class itself (on the meta device: no memory).
    with torch.device("meta"):
        model = HfMoeForCausalLM(config)
    state = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _plan(
    reader: CheckpointReader,
    source: DenseSource,
    config: HfMoeConfig,
    expected: dict[str, tuple[torch.Size, torch.dtype]],
) -> tuple[list[tuple[str, str]], dict[int, dict[str, Any]], list[tuple[str, str]]]:
    """Map every source tensor to its target and check shapes against the target config, reading headers only.

    Returns:
        (copies before the layers, per-layer {"copy": [(src, dst)], "mlp.gate"/"mlp.up"/"mlp.down": src},
        copies after the layers).
    """
    head: list[tuple[str, str]] = []
    tail: list[tuple[str, str]] = []
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
        if tuple(expected[target][0]) != shape:
            raise ValueError(
                f"tensor {name!r} has shape {list(shape)} but config.json implies {list(expected[target][0])}; the "
                "weights do not match the config"
            )
        if layer is not None:
            layers[layer]["copy"].append((name, target))
        elif target.startswith("model.embed_tokens"):
            head.append((name, target))
        else:
            tail.append((name, target))
    # Everything the target model needs must come from somewhere.
    produced = {dst for _, dst in head + tail} | {dst for lay in layers.values() for _, dst in lay["copy"]}
    for i in range(config.num_hidden_layers):
        missing_mlp = [op for op in source.mlp_ops if op not in layers[i]]
        if missing_mlp:
            expected_names = [
                f"model.layers.{i}.mlp.{op.removeprefix('mlp.')}_proj.weight" for op in source.mlp_ops
            ]
            raise ValueError(
                f"the checkpoint lacks the MLP weights of layer {i}: expected {expected_names} ({source.model_type} "
                f"names its MLP {source.mlp!r}); is this a complete {source.model_type} checkpoint?"
            )
    missing = sorted(
        k
        for k in expected
        if k not in produced and ".mlp." not in k  # MLP/MoE tensors are made from the MLP
    )
    if missing:
        raise ValueError(f"the checkpoint lacks tensors the target model needs: {missing[:8]}")
    return head, dict(layers), tail


def dense_mlp(
    reader: CheckpointReader, plan: dict[str, Any], source: DenseSource
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's dense MLP as (gate (I, H), up (I, H), down (H, I)), whichever way the family names it."""
    if source.mlp == "fused":
        gate, up = reader.get_tensor(plan["mlp.gate_up"]).chunk(2, dim=0)  # gate rows, then up rows
    else:
        gate, up = reader.get_tensor(plan["mlp.gate"]), reader.get_tensor(plan["mlp.up"])
    return gate, up, reader.get_tensor(plan["mlp.down"])


def _save_config(config: HfMoeConfig, out: Path) -> None:
    # HfMoeConfig.save_pretrained writes the full auto_map (config, base model, causal LM) once hf_moe is imported.
    config.save_pretrained(out)


def _put_shared_experts(put, prefix: str, weights: tuple[torch.Tensor, ...], out_dtype: torch.dtype) -> None:
    for name, tensor in zip(("gate_proj", "up_proj", "down_proj"), weights):
        put(f"{prefix}shared_experts.{name}.weight", tensor.to(out_dtype))


def _put_router_state(put, prefix: str, expected: dict, written: set[str], out_dtype: torch.dtype) -> None:
    """Router tensors other than the weight (DeepSeek-V3 correction bias, noisy-top-k noise projection) start at 0;
    the correction bias stays float32, as the model keeps it."""
    for name, (shape, _) in expected.items():
        if name.startswith(f"{prefix}gate.") and name not in written:
            keep_fp32 = name.endswith("e_score_correction_bias")
            put(name, torch.zeros(shape, dtype=torch.float32 if keep_fp32 else out_dtype))


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
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r} must be a positive integer")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} must be between 1 and num_experts={num_experts}")
    if not isinstance(granularity, int) or granularity < 1 or num_experts % granularity:
        raise ValueError(
            f"granularity={granularity!r} must be a positive integer dividing num_experts={num_experts}"
        )
    if num_shared_experts < 0:
        raise ValueError(f"num_shared_experts={num_shared_experts} must be >= 0")
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio={drop_ratio} must be in [0, 1]")
    if noise_std < 0:
        raise ValueError(f"noise_std={noise_std} must be >= 0")
    router_init = router_init or ("virtual-group" if granularity > 1 else "random")
    make_router_init = get_router_init(router_init)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(
                f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)} or None (keep)"
            )
        dtype = DTYPES[dtype]
    with CheckpointReader(src_dir) as reader:
        check_floating_weights(reader)
        source = get_source(reader.model_type)
        dense_kwargs = translate_config(reader.config)
        text = dense_kwargs["text_config"]
        if router_type == "expert_choice":
            text.use_cache = False  # expert choice is not causal (see HfMoeConfig)
        inter = text.intermediate_size
        if inter % granularity:
            raise ValueError(f"granularity={granularity} must divide the dense intermediate_size={inter}")
        num_layers = text.num_hidden_layers
        moe_idx = parse_moe_layers(moe_layers, num_layers)
        mlp_names = [n for n in reader.keys() if source.match(n)[1] in source.mlp_ops]
        if not mlp_names:
            raise ValueError(
                f"{reader.root}: the {source.model_type} checkpoint has no MLP tensors (expected "
                f"model.layers.N.mlp.{'gate_up_proj' if source.mlp == 'fused' else 'gate_proj'}.weight and its "
                "siblings); there is nothing to turn into experts"
            )
        mlp_dtype = reader.dtype(mlp_names[0])
        out_dtype = dtype or mlp_dtype
        moe_width = inter // granularity
        config = HfMoeConfig(
            **{
                **dense_kwargs,
                "num_experts": num_experts,
                "num_experts_per_tok": top_k,
                "moe_intermediate_size": moe_width,
                "router_type": router_type,
                "num_shared_experts": num_shared_experts,
                "shared_expert_intermediate_size": num_shared_experts * moe_width,
                "mlp_only_layers": [i for i in range(num_layers) if i not in moe_idx],
                **(config_overrides or {}),
            }
        )
        config.architectures = ["HfMoeForCausalLM"]
        config.dtype = out_dtype
        # Prompt-based rows keep virtual groups when the prompts list one entry per group (prompts.py).
        group_rows = (
            router_init == "prompts"
            and prompts is not None
            and granularity > 1
            and (
                len(import_module(".prompts", __package__).load_prompts(prompts).experts) * granularity
                == num_experts
            )
        )
        problems = exactness_problems(
            config,
            granularity=granularity,
            router_init=router_init,
            drop_ratio=drop_ratio,
            noise_std=noise_std,
            group_rows=group_rows,
        )
        if problems and require_exact:
            raise ValueError(
                "require_exact=True but the upcycled model would differ from the dense one: "
                + "; ".join(problems)
            )
        if problems:
            logger.warning(
                "upcycled model will not reproduce the dense model at init: %s", "; ".join(problems)
            )
        expected = _expected_shapes(config)
        head, layer_plan, tail = _plan(reader, source, config, expected)
        # The source checksums for the provenance file are computed in a thread while the layers are converted
        # (hashlib releases the GIL), instead of a serial pass over the input at the end.
        hasher = ThreadPoolExecutor(max_workers=1)
        checksum_jobs = {str(p): hasher.submit(sha256_file, p) for p in reader.files_read}
        router_context = RouterInitContext(
            num_experts=num_experts,
            hidden_size=config.hidden_size,
            granularity=granularity,
            std=config.initializer_range,
            seed=seed,
            moe_layers=moe_idx,
            src_dir=Path(src_dir),
            reader=reader,
            prompts=prompts,
        )
        router_for_layer = make_router_init(router_context)
        # Routed and shared outputs each carry half of the dense output when both exist (docs/upcycling.md).
        routed_scale = granularity * (0.5 if num_shared_experts else 1.0)
        shared_copies = num_shared_experts / granularity

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        options = dict(
            num_experts=num_experts,
            top_k=top_k,
            router_type=router_type,
            granularity=granularity,
            num_shared_experts=num_shared_experts,
            drop_ratio=drop_ratio,
            noise_std=noise_std,
            router_init=router_init,
            prompts=str(prompts) if prompts is not None else None,
            moe_layers=moe_idx,
            dtype=str(out_dtype).removeprefix("torch."),
            seed=seed,
            max_shard_size=max_shard_size,
            config_overrides=config_overrides or {},
        )
        try:
            with atomic_output_dir(out_dir, overwrite=overwrite, inputs=[src_dir, *reader.files_read]) as tmp:
                written: set[str] = set()
                with ShardWriter(tmp, max_shard_size=max_shard_size) as writer:

                    def put(name: str, tensor: torch.Tensor) -> None:
                        writer.add(name, tensor)
                        written.add(name)

                    def put_stacked(name: str, parts: list[torch.Tensor]) -> None:
                        writer.add_stacked(name, parts)
                        written.add(name)

                    for src, dst in head:
                        put(dst, cast(reader.get_tensor(src)))
                    for i in tqdm(
                        range(num_layers), desc="upcycling layers", unit="layer", disable=not progress
                    ):
                        plan = layer_plan[i]
                        for src, dst in plan["copy"]:
                            put(dst, cast(reader.get_tensor(src)))
                        prefix = f"model.layers.{i}.mlp."
                        if i not in moe_idx:  # the base's own dense MLP, under its own names
                            for op in source.mlp_ops:
                                put(plan[op], cast(reader.get_tensor(plan[op])))
                            continue
                        gate, up, down = dense_mlp(reader, plan, source)  # (I, H), (I, H), (H, I)
                        if drop_ratio > 0 or noise_std > 0:
                            gate_up_w, down_w = expert_weights(
                                gate,
                                up,
                                down,
                                num_experts=num_experts,
                                granularity=granularity,
                                down_scale=routed_scale,
                            )  # (E, 2I/g, H), (E, H, I/g)
                            if drop_ratio > 0:
                                gate_up_w, down_w, _ = drop_upcycle(
                                    gate_up_w,
                                    down_w,
                                    drop_ratio=drop_ratio,
                                    generator=seeded_generator(seed, "drop", i),
                                )
                            if noise_std > 0:
                                gate_up_w, down_w = add_relative_noise(
                                    gate_up_w,
                                    down_w,
                                    noise_std=noise_std,
                                    generator=seeded_generator(seed, "noise", i),
                                )
                            put(f"{prefix}experts.gate_up_proj", gate_up_w.to(out_dtype))
                            put(f"{prefix}experts.down_proj", down_w.to(out_dtype))
                        else:
                            # Experts are repeats of `granularity` distinct slices: build only those and let the writer
                            # repeat their bytes (no (E, ...) tensor in memory).
                            gate_up_s, down_s = expert_weights(
                                gate,
                                up,
                                down,
                                num_experts=granularity,
                                granularity=granularity,
                                down_scale=routed_scale,
                            )  # (g, 2I/g, H), (g, H, I/g)
                            gate_up_s, down_s = gate_up_s.to(out_dtype), down_s.to(out_dtype)
                            slice_of = [e % granularity for e in range(num_experts)]
                            put_stacked(f"{prefix}experts.gate_up_proj", [gate_up_s[j] for j in slice_of])
                            put_stacked(f"{prefix}experts.down_proj", [down_s[j] for j in slice_of])
                        router = router_for_layer(i)  # (E, H)
                        if tuple(router.shape) != (num_experts, config.hidden_size):
                            raise ValueError(
                                f"router_init={router_init!r} returned shape {list(router.shape)} for layer {i}; "
                                f"expected {[num_experts, config.hidden_size]}"
                            )
                        put(f"{prefix}gate.weight", router.to(out_dtype))
                        if num_shared_experts:
                            sg, su, sd = shared_expert_weights(
                                gate,
                                up,
                                down,
                                width=config.shared_expert_intermediate_size,
                                granularity=granularity,
                                down_scale=0.5 / shared_copies,
                            )
                            _put_shared_experts(put, prefix, (sg, su, sd), out_dtype)
                        _put_router_state(put, prefix, expected, written, out_dtype)
                    for src, dst in tail:
                        put(dst, cast(reader.get_tensor(src)))
                    missing = sorted(set(expected) - written)
                    extra = sorted(written - set(expected))
                    if missing or extra:  # a bug in a key table, not user error; fail before publishing
                        raise ValueError(
                            f"upcycle produced a checkpoint that does not match the config: missing "
                            f"{missing[:8]}, unexpected {extra[:8]}"
                        )
                _save_config(config, tmp)
                for name in REMOTE_CODE_FILES:
                    shutil.copyfile(MODELING_DIR / name, tmp / name)
                tokenizer_files = copy_tokenizer_files(reader.root, tmp)
                write_provenance(
                    tmp,
                    source=reader,
                    method="upcycle",
                    options=options,
                    source_files=[*reader.files_read, *tokenizer_files],
                    checksums={path: job.result() for path, job in checksum_jobs.items()},
                    extra={"function_preserving": not problems, "not_function_preserving_because": problems},
                )
        finally:
            hasher.shutdown(wait=False, cancel_futures=True)
    return out_dir
