"""`hf-moe` command line: thin typed subcommands over the library. Library functions raise; only this module
turns errors into messages and exit codes (0 ok, 1 unexpected failure, 2 bad input).

Imports of the library sit inside the functions that run a command, marked "lazy: CLI start-up": the library
loads torch and transformers (3-7 s) and huggingface_hub's client (~0.3 s), and `--help` and usage errors must cost
about what starting Python costs (benchmarks/cli_latency.py; tests/test_cli.py checks that they import neither
torch nor transformers). At the top are only the standard library and the package's `__init__`.
"""

import argparse
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

from . import __version__, register

# A command is a pair: `_add_<name>(subparsers)` builds its parser and sets `func=_run_<name>`, and
# `_run_<name>(args)` calls the library and returns an exit code (None means 0). Adding a command means writing
# the pair and listing `_add_<name>` in SUBCOMMANDS.
AddCommand = Callable[[argparse._SubParsersAction], None]


# [model folders or Hub repo ids]


def _add_revision(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--revision",
        default=None,
        help="branch, tag or commit of Hub repo ids given as models "
        "(default: the repo's default branch); org/name@REV sets it for one model",
    )


def _model(args: argparse.Namespace, name: str, *, weights: bool = True) -> str:
    """A model argument as a local folder: existing paths as given, Hub repo ids downloaded (docs/merge.md)."""
    from .hub_ids import resolve_model  # lazy: CLI start-up (huggingface_hub)

    return str(resolve_model(name, revision=getattr(args, "revision", None), weights=weights))


# [conversion commands: upcycle, merge]


def _run_upcycle(args: argparse.Namespace) -> int:
    from .conversion.upcycle import upcycle  # lazy: CLI start-up

    args.src_dir = _model(args, args.src_dir)
    out = upcycle(
        args.src_dir,
        args.out_dir,
        num_experts=args.num_experts,
        top_k=args.top_k,
        router_type=args.router,
        granularity=args.granularity,
        num_shared_experts=args.shared_experts,
        drop_ratio=args.drop_ratio,
        noise_std=args.noise_std,
        router_init=args.router_init,
        prompts=args.prompts,
        moe_layers=args.moe_layers,
        dtype=args.dtype,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        require_exact=args.require_exact,
    )
    _write_card(out)
    print(out)
    return 0


def _write_card(out_dir: object) -> None:
    """Every CLI output folder gets its model card (hf_moe.hub writes them all); a conversion that succeeded is
    kept when the card cannot be written, and the message says how to write it."""
    from .hub import write_model_card  # lazy: CLI start-up

    out_dir = Path(str(out_dir))
    if json.loads((out_dir / "config.json").read_text()).get("model_type") != "hf_moe":
        return  # a native checkpoint: export writes its own card variant
    try:
        write_model_card(out_dir)
    except (ValueError, OSError) as err:
        print(
            f"warning: no model card written ({err}); write one with `hf-moe card {out_dir}`", file=sys.stderr
        )


# hf_moe.conversion.native.TARGETS, spelt out so that `--help` does not import torch (tests/test_cli.py checks
# that the two agree).
EXPORT_TARGETS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "deepseek_v3")
NATIVE_NAMES = "Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4.5 or DeepSeek-V3"


def _add_dtype(p: argparse.ArgumentParser, text: str) -> None:
    """--dtype of a conversion's output (the dtypes a checkpoint can hold); `text` is its help."""
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help=text)


def _add_output(p: argparse.ArgumentParser, out: str = "OUT_DIR") -> None:
    """The flags every conversion's output folder takes."""
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help=f"replace {out} once the new one is complete")


def _add_upcycle(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "upcycle",
        help="turn a dense gated-MLP checkpoint (Llama, Mistral, Qwen, Gemma, Phi-3, OLMo, Granite, SmolLM3, ...) "
        "into an hf_moe MoE checkpoint",
        description="Upcycle a dense checkpoint folder (config.json + safetensors) into an hf_moe checkpoint, "
        "streamed layer by layer; OUT_DIR appears only when complete. See docs/upcycling.md.",
    )
    p.add_argument(
        "src_dir", metavar="SRC_DIR", help="dense Hugging Face checkpoint folder or Hub repo id (org/name)"
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist unless --overwrite)")
    _add_revision(p)
    p.add_argument("--num-experts", type=int, required=True, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, required=True, help="experts per token")
    p.add_argument("--router", default="softmax_topk", help="router type (default softmax_topk)")
    p.add_argument("--granularity", type=int, default=1, help="slices per dense MLP (fine-grained upcycling)")
    p.add_argument("--shared-experts", type=int, default=0, help="always-active experts from the dense MLP")
    p.add_argument(
        "--drop-ratio", type=float, default=0.0, help="Drop-Upcycling: fraction of units re-initialised"
    )
    p.add_argument(
        "--noise-std", type=float, default=0.0, help="noise on expert weights, relative to their std"
    )
    p.add_argument(
        "--router-init",
        default=None,
        help="random | virtual-group | prompts (default: virtual-group when --granularity > 1, else random)",
    )
    p.add_argument("--prompts", default=None, help="prompts file for --router-init prompts")
    p.add_argument("--moe-layers", default="all", help="all | every-N | 0-11 | 0,2,4-6 (default all)")
    _add_dtype(p, "output dtype (default: keep the source dtype)")
    p.add_argument("--seed", type=int, default=0)
    _add_output(p)
    p.add_argument(
        "--require-exact",
        action="store_true",
        help="refuse options that change the dense model's outputs at initialisation",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_upcycle)


def _run_merge(args: argparse.Namespace) -> int:
    from .conversion.merge import merge_experts  # lazy: CLI start-up
    from .conversion.mergekit import merge_from_mergekit

    if args.mergekit_config:
        clashes = [
            flag
            for flag, value in (
                ("--base", args.base),
                ("--expert", args.expert),
                ("--top-k", args.top_k),
                ("--router-init", args.router_init),
                ("--prompts", args.prompts),
                ("--dtype", args.dtype),
                ("--shared-experts", args.shared_experts),
                ("--shared", args.shared),
            )
            if value
        ]
        if clashes:
            raise ValueError(
                f"{', '.join(clashes)}: the mergekit config sets these; drop them or edit the YAML "
                "(docs/merge.md maps each mergekit-moe key to its hf-moe option)"
            )
        out = merge_from_mergekit(
            args.mergekit_config,
            args.out_dir,
            router_type=args.router,
            overwrite=args.overwrite,
            seed=args.seed,
            max_shard_size=args.max_shard_size,
            progress=not args.no_progress,
            revision=args.revision,
        )
        _write_card(out)
        print(out)
        return 0
    if not args.base or not args.expert:
        raise ValueError("give --base and one --expert per fine-tune, or --mergekit-config moe.yml")
    args.base, args.expert = _model(args, args.base), [_model(args, e) for e in args.expert]
    out = merge_experts(
        base=args.base,
        experts=args.expert,
        out_dir=args.out_dir,
        top_k=args.top_k or 2,
        router_type=args.router,
        router_init=args.router_init or ("prompts" if args.prompts else "random"),
        prompts=args.prompts,
        shared=args.shared or "base",
        num_shared_experts=args.shared_experts or 0,
        dtype=args.dtype,
        overwrite=args.overwrite,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        progress=not args.no_progress,
    )
    _write_card(out)
    print(out)
    return 0


def _add_merge(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge fine-tunes of one base model into an hf_moe MoE checkpoint (one expert per fine-tune)",
        description="Branch-Train-MiX / mergekit-moe: each fine-tune's MLPs become one expert; attention, norms and "
        "embeddings come from the base (or their average over the fine-tunes). Streamed layer by layer; OUT_DIR "
        "appears only when complete. See docs/merge.md.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist unless --overwrite)")
    p.add_argument(
        "--base", metavar="BASE_DIR", help="dense base model folder or Hub repo id (tokenizer source)"
    )
    p.add_argument(
        "--expert",
        action="append",
        metavar="FT_DIR",
        help="fine-tune folder or Hub repo id; repeat once per expert, in expert order",
    )
    p.add_argument(
        "--mergekit-config",
        metavar="MOE_YML",
        help="a mergekit-moe YAML config instead of --base, "
        "--expert, --prompts, --top-k, --dtype and shared experts (docs/merge.md)",
    )
    _add_revision(p)
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default 2)")
    p.add_argument("--router", default="softmax_topk", help="router type (default softmax_topk)")
    p.add_argument(
        "--router-init",
        default=None,
        help="random | prompts | cheap_embed (default: prompts when --prompts is given, else random)",
    )
    p.add_argument("--prompts", default=None, help="YAML file with one positive_prompts entry per expert")
    p.add_argument(
        "--shared",
        default=None,
        choices=["base", "average"],
        help="non-MLP weights from the base or averaged over the fine-tunes (default base)",
    )
    p.add_argument(
        "--shared-experts", type=int, default=None, help="always-active experts copied from the base MLP"
    )
    _add_dtype(p, "output dtype (default: keep the base's)")
    p.add_argument("--seed", type=int, default=0, help="seed of random router rows")
    _add_output(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_merge)


# [export / serve commands]


def _run_export(args: argparse.Namespace) -> int:
    from .conversion.export import export  # lazy: CLI start-up

    print(
        export(
            _model(args, args.model_dir),
            args.out_dir,
            to=args.to,
            merge_adapter=args.merge_adapter,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
        )
    )
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help=f"write an hf_moe checkpoint as a native {NATIVE_NAMES} checkpoint",
        description="Export an hf_moe checkpoint to a native MoE architecture that transformers and vLLM load "
        "without hf-moe. Configs the target cannot represent exactly are refused with the blocking fields and the "
        "targets that would fit. See docs/export.md.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="hf_moe checkpoint folder or Hub repo id")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist unless --overwrite)")
    _add_revision(p)
    p.add_argument(
        "--to",
        required=True,
        choices=EXPORT_TARGETS,
        help="target architecture",
    )
    p.add_argument(
        "--merge-adapter",
        metavar="ADAPTER_DIR",
        default=None,
        help="PEFT LoRA adapter to merge first (loads the model in memory)",
    )
    _add_dtype(p, "output dtype (default: keep each tensor's dtype)")
    _add_output(p)
    p.set_defaults(func=_run_export)


def _run_import(args: argparse.Namespace) -> int:
    from .conversion.export import import_native  # lazy: CLI start-up

    print(
        import_native(
            _model(args, args.src_dir),
            args.out_dir,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
        )
    )
    return 0


def _add_import(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import",
        help=f"convert a native {NATIVE_NAMES} checkpoint into hf_moe",
        description="Import a native MoE checkpoint into the hf_moe architecture (experts fused layer by layer; "
        "attention, norms and the rest stay the family's own, DeepSeek-V3's latent attention included). "
        "See docs/export.md.",
    )
    p.add_argument(
        "src_dir",
        metavar="SRC_DIR",
        help="native checkpoint folder (config.json + safetensors) or Hub repo id",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist unless --overwrite)")
    _add_revision(p)
    _add_dtype(p, "output dtype (default: keep each tensor's dtype)")
    _add_output(p)
    p.set_defaults(func=_run_import)


def _run_serve(args: argparse.Namespace) -> int:
    from .serving.serve import describe_plan, plan_serve, run_serve  # lazy: CLI start-up

    plan = plan_serve(
        _model(args, args.model_dir),
        host=args.host,
        port=args.port,
        route=args.route,
        kv_cache_bytes=args.kv_cache_bytes,
        python=args.python,
        cache_dir=args.cache_dir,
        extra_args=shlex.split(args.vllm_args),
        dtype=args.dtype,
    )
    if args.dry_run:
        if plan.needs_export:
            print(f"# would export {plan.source_dir} to {plan.target} in {plan.model_dir}")
        print(plan.shell())
        for line in describe_plan(plan):
            print(f"# {line}")
        print(f"# OpenAI API at {plan.url}")
        return 0
    return run_serve(plan)


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an hf_moe checkpoint with vLLM's OpenAI-compatible server",
        description="Serve MODEL_DIR with vLLM (python -m vllm.entrypoints.openai.api_server). By default a config "
        "that fits a native architecture is exported once (cached) and served natively; anything else goes through "
        "the hf-moe vLLM plugin. Expert-choice routing and switch routing with a capacity factor are refused. "
        "The server runs in the checkpoint's dtype unless --dtype says otherwise, in its own process group: "
        "SIGINT/SIGTERM stop all of it. See docs/serving.md.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="hf_moe checkpoint folder or Hub repo id")
    _add_revision(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    route = p.add_mutually_exclusive_group()
    route.add_argument(
        "--native",
        dest="route",
        action="store_const",
        const="native",
        help="require the native route (export to Mixtral / Qwen2-MoE / Qwen3-MoE / GLM-4.5-MoE)",
    )
    route.add_argument(
        "--plugin",
        dest="route",
        action="store_const",
        const="plugin",
        help="serve HfMoeForCausalLM through the hf-moe vLLM plugin",
    )
    p.set_defaults(route="auto")
    p.add_argument(
        "--kv-cache-bytes", type=int, default=1 << 30, help="KV cache size for vLLM (default 1 GiB)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16", "auto"],
        help="precision to serve in (default: the checkpoint's dtype, as transformers loads it; 'auto' lets "
        "vLLM choose, which serves float32 checkpoints in 16 bits)",
    )
    p.add_argument("--python", default=None, help="interpreter with vLLM installed (default: this one)")
    p.add_argument(
        "--cache-dir", default=None, help="where native exports are cached (default ~/.cache/hf_moe/serve)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the command (and any export) without running it"
    )
    p.add_argument(
        "--vllm-args",
        default="",
        help="further arguments for vLLM's api_server, as one quoted string "
        "(e.g. --vllm-args '--max-model-len 4096')",
    )
    p.set_defaults(func=_run_serve)


# [peft commands: lora-targets]


def _compress_layer_names(names: list[str]) -> list[str]:
    """["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"] -> ["model.layers.{1-2}.mlp.experts"]."""
    groups: dict[str, list[int]] = {}
    for name in names:
        match = re.search(r"\.layers\.(\d+)\.", name)
        key = name if match is None else name[: match.start(1)] + "{}" + name[match.end(1) :]
        groups.setdefault(key, []).append(-1 if match is None else int(match.group(1)))
    out = []
    for key, layers in groups.items():
        layers = sorted(set(layers))
        if layers == [-1]:
            out.append(key)
            continue
        ranges, start, prev = [], layers[0], layers[0]
        for layer in [*layers[1:], None]:
            if layer is not None and layer == prev + 1:
                prev = layer
                continue
            ranges.append(str(start) if start == prev else f"{start}-{prev}")
            if layer is not None:
                start = prev = layer
        out.append(key.replace("{}", "{" + ",".join(ranges) + "}" if len(layers) > 1 else str(layers[0])))
    return out


def _run_lora_targets(args: argparse.Namespace) -> int:
    import torch  # lazy: CLI start-up
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # optional: peft
        from .peft import describe_targets
    except ImportError as err:
        raise ValueError(f"{err} (lora-targets uses PEFT's own target rules)") from err

    model_dir = Path(_model(args, args.model_dir, weights=False))  # shapes only: no weights downloaded
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}/config.json not found: MODEL_DIR must be a model folder with a config.json"
        )
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # shapes only: no weights are read or allocated
        model = AutoModelForCausalLM.from_config(config)
    rows = describe_targets(model, r=args.r, experts_impl=args.experts_impl)
    if args.json:
        print(
            json.dumps(
                {
                    "model": type(model).__name__,
                    "r": args.r,
                    "experts_impl": args.experts_impl,
                    "targets": rows,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"{model_dir}: {type(model).__name__} ({config.model_type}); LoRA r={args.r}, experts_impl={args.experts_impl}"
    )
    print(f"{'target':<16}{'adapted':>8}{'LoRA params':>14}  names")
    total = 0
    for row in rows:
        if not row["available"]:
            print(f"{row['target']:<16}{'-':>8}{'-':>14}  (not in this model)")
            continue
        total += row["trainable"]
        names = _compress_layer_names(row["names"])
        print(f"{row['target']:<16}{len(row['names']):>8}{row['trainable']:>14,}  {names[0]}")
        for name in names[1:]:
            print(f"{'':<38}  {name}")
    print(f"{'all':<16}{'':>8}{total:>14,}")
    return 0


def _add_lora_targets(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lora-targets",
        help="print what each LoRA preset target would adapt in a model",
        description="For each LoRA target preset of hf_moe.lora_config (experts, shared_experts, router, attention, "
        "dense_mlp), list the modules of MODEL_DIR it adapts and the LoRA parameters it adds at rank --r. Only "
        "config.json is read: the model is built on the meta device, no weights are loaded. Needs PEFT "
        "(pip install 'hf-moe[peft]'). See docs/peft.md.",
    )
    p.add_argument(
        "model_dir",
        help="model folder or Hub repo id (hf_moe, Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, ...)",
    )
    _add_revision(p)
    p.add_argument("--r", type=int, default=16, help="LoRA rank for the parameter counts (default 16)")
    p.add_argument(
        "--experts-impl",
        choices=["fast", "target_parameters"],
        default="fast",
        help="how routed experts are adapted (default fast)",
    )
    p.add_argument("--json", action="store_true", help="print JSON with every adapted name")
    p.set_defaults(func=_run_lora_targets)


def _run_lora(args: argparse.Namespace) -> int:
    try:  # optional: peft (the bridge lives in hf_moe.peft)
        from .peft import convert_moe_adapter, verify_moe_adapter
    except ImportError as err:
        raise ValueError(f"{err} (hf-moe lora needs PEFT)") from err

    if args.lora_command == "convert":
        result = convert_moe_adapter(
            args.adapter, args.out, to=args.to, naming=args.naming, overwrite=args.overwrite
        )
        print(
            f"{result['out']}: {result['experts_modules']} experts modules, {result['from']} -> {result['to']}"
        )
        return 0
    result = verify_moe_adapter(
        _model(args, args.model), args.adapter, num_tokens=args.tokens, rtol=args.rtol, atol=args.atol
    )
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def _add_lora(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lora",
        help="convert MoE LoRA adapters between layouts, and verify an adapter against its merged export",
        description="Routed-experts LoRA in three layouts: fused (hf_moe's fused-experts LoRA layer), "
        "target-parameters (PEFT's ParamWrapper on fused experts) and per-expert (one LoRA per expert projection, "
        "the layout vLLM's MoE-LoRA loader reads). docs/peft.md says which vLLM versions load which.",
    )
    sub = p.add_subparsers(dest="lora_command", required=True, metavar="SUBCOMMAND")
    convert = sub.add_parser("convert", help="rewrite an adapter's experts in another layout (exact)")
    convert.add_argument("adapter", metavar="IN", help="PEFT adapter folder")
    convert.add_argument("out", metavar="OUT", help="new adapter folder (must not exist unless --overwrite)")
    convert.add_argument("--to", required=True, choices=["fused", "target-parameters", "per-expert"])
    convert.add_argument(
        "--naming",
        choices=["qwen", "mixtral"],
        default="qwen",
        help="per-expert module names: qwen = mlp.experts.{i}.gate_proj/up_proj/down_proj, "
        "mixtral = block_sparse_moe.experts.{i}.w1/w3/w2 (default qwen)",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace OUT once the new one is complete")
    verify = sub.add_parser(
        "verify", help="check that MODEL + ADAPTER and its merged export give equal logits"
    )
    verify.add_argument("model", metavar="MODEL", help="base model folder or Hub repo id")
    verify.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter folder (any of the three layouts)")
    _add_revision(verify)
    verify.add_argument("--tokens", type=int, default=32, help="random tokens compared (default 32)")
    verify.add_argument(
        "--rtol", type=float, default=1e-4, help="relative tolerance on the logits (default 1e-4)"
    )
    verify.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    p.set_defaults(func=_run_lora)


# [hub commands: card, push, zoo, inspect]


def _parse_eval(pairs: list[str] | None) -> dict | None:
    if not pairs:
        return None
    results: dict = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--eval {pair!r}: use NAME=VALUE, e.g. --eval wikitext_ppl=12.3")
        try:
            results[name] = float(value)
        except ValueError:
            results[name] = value
    return results


def _run_card(args: argparse.Namespace) -> int:
    from .hub import write_model_card  # lazy: CLI start-up
    from .hub_ids import hub_origin

    model_dir = Path(_model(args, args.model_dir))
    origin = hub_origin(model_dir)
    if origin is None and args.output:
        raise ValueError("--output is for Hub repo ids; a local folder gets its README.md in place")
    if origin is not None and not args.output:
        raise ValueError(
            f"{args.model_dir} is a Hub repo: its snapshot in the Hub cache is not written to; pass "
            "--output README.md (where to write the card)"
        )
    options = dict(
        eval_results=_parse_eval(args.eval),
        model_name=args.name,
        license=args.license,
        base_model=args.base_model,
        overwrite=args.overwrite,
    )
    if origin is None:
        print(write_model_card(model_dir, repo_id=args.repo_id, **options))
        return 0
    # A scratch folder of links to the snapshot's files, so the card is rendered without touching the cache.
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; choose another --output or pass --overwrite")
    with tempfile.TemporaryDirectory() as scratch:
        for file in model_dir.iterdir():
            os.symlink(file.resolve(), Path(scratch) / file.name)
        card = write_model_card(
            scratch,
            repo_id=args.repo_id or origin["repo_id"],
            **{**options, "model_name": args.name or origin["repo_id"].split("/")[1]},
        )
        shutil.copyfile(card, output)
    print(output)
    return 0


def _add_card(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "card",
        help="write README.md (model card) into a checkpoint folder",
        description="Render the model card README.md of a checkpoint from what is on disk: config, parameter "
        "counts (total and active per token, checked against the safetensors), provenance "
        "(hf_moe_provenance.json), the --eval figures and usage snippets. A README.md that hf-moe card did not "
        "write is kept unless --overwrite. See docs/hub_zoo.md.",
    )
    p.add_argument("model_dir", help="hf_moe checkpoint folder, or Hub repo id (then --output is required)")
    _add_revision(p)
    p.add_argument("--output", metavar="FILE", help="for a Hub repo id: where to write the card")
    p.add_argument("--eval", action="append", metavar="NAME=VALUE", help="an evaluation figure (repeatable)")
    p.add_argument("--name", help="card title (default: the folder name)")
    p.add_argument("--repo-id", help="Hub repo id used in the usage snippets")
    p.add_argument("--license", help="Hub license id (default: from hf_moe_provenance.json, else 'other')")
    p.add_argument("--base-model", help="Hub id of the source model (default: from the provenance)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a README.md that hf-moe card did not write"
    )
    p.set_defaults(func=_run_card)


def _run_push(args: argparse.Namespace) -> int:
    # lazy: CLI start-up (huggingface_hub.errors alone loads httpx, ~80 ms)
    from huggingface_hub.errors import HfHubHTTPError

    from .hub import push_to_hub

    token = args.token or os.environ.get("HF_TOKEN") or None
    try:
        url = push_to_hub(
            args.model_dir, args.repo_id, private=args.private, revision=args.revision, token=token
        )
    except HfHubHTTPError as err:
        # The server's message, never the request headers (which hold the token).
        status = err.response.status_code if err.response is not None else "?"
        message = str(err).splitlines()[0]
        if token:
            message = message.replace(token, "***")
        print(f"hf-moe push: error: the Hub refused the request (HTTP {status}): {message}", file=sys.stderr)
        return 1
    except Exception as err:
        # Network failures surface as httpx errors (huggingface_hub's HTTP client); report them in one line.
        if not type(err).__module__.startswith("httpx"):
            raise
        message = str(err).replace(token, "***") if token else str(err)
        print(
            f"hf-moe push: error: could not reach the Hub ({type(err).__name__}: {message})", file=sys.stderr
        )
        return 1
    print(url)
    return 0


def _add_push(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload a checkpoint folder (safetensors + card) to the Hugging Face Hub",
        description="Create the Hub repo REPO_ID if needed and upload MODEL_DIR to it: safetensors, json, md, py "
        "and tokenizer files only. The folder needs a README.md (write it with hf-moe card). The token comes from "
        "$HF_TOKEN or `hf auth login` and is never printed. See docs/hub_zoo.md.",
    )
    p.add_argument("model_dir", help="checkpoint folder with README.md and *.safetensors")
    p.add_argument("repo_id", help="owner/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created if missing); default main")
    p.add_argument(
        "--token",
        help="Hub token (default: $HF_TOKEN or `hf auth login`); prefer the environment: argv is visible",
    )
    p.set_defaults(func=_run_push)


def _run_zoo(args: argparse.Namespace) -> int:
    from . import zoo  # lazy: CLI start-up
    from .hub import human

    if args.zoo_command == "render-cards":
        for path in zoo.render_cards(args.cards_dir):
            print(path)
        return 0
    if args.zoo_command == "list":
        print(f"{'name':<24} {'recipe':<13} {'total':>8} {'active':>8}  description")
        for preset in zoo.list_presets():
            print(
                f"{preset.name:<24} {preset.recipe.method:<13} {human(preset.expected_total):>8} "
                f"{human(preset.expected_active):>8}  {textwrap.shorten(preset.description, 70)}"
            )
        print(
            "from_scratch presets have random weights and ship no tokenizer; upcycle presets keep their base's."
        )
        return 0
    preset = zoo.get_preset(args.name)
    if args.zoo_command == "show":
        counts = preset.parameter_counts()
        print(f"{preset.name}: {preset.description}")
        print(
            f"recipe: {preset.recipe.method}"
            + (f" from {preset.recipe.base_model}" if preset.recipe.base_model else "")
        )
        print(f"license: {preset.recipe.license}")
        print(f"parameters: {counts.total:,} total, {counts.active:,} active per token")
        print("config:")
        print(preset.config().to_json_string(use_diff=True).strip())
        if preset.recipe.method == "upcycle":
            print(f"build: hf-moe zoo create {preset.name} OUT_DIR --source DENSE_DIR")
            print(f"   or: {zoo.upcycle_command(preset)}")
        else:
            print(f"build: hf-moe zoo create {preset.name} OUT_DIR")
            print(
                f"tokenizer: none shipped; bring one with vocab_size {preset.config().get_text_config().vocab_size}"
            )
        print(f"card: {zoo.card_path(preset.name)}")
        return 0
    out = zoo.create(args.name, args.out_dir, source=args.source, seed=args.seed, overwrite=args.overwrite)
    if preset.recipe.method == "from_scratch":
        vocab_size = preset.config().get_text_config().vocab_size
        print(
            f"hf-moe zoo: {out} has random weights and no tokenizer: save one with vocab_size {vocab_size} into it "
            "before generating text",
            file=sys.stderr,
        )
    print(out)
    return 0


def _add_zoo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "zoo",
        help="named MoE presets: list, show, create",
        description="Named MoE presets. from_scratch presets are architectures in the style of a published MoE "
        "family, built with random weights; they ship no tokenizer (bring one with the preset's vocab_size). "
        "upcycle presets turn a dense base model into an MoE and need a local copy of that base (--source). "
        "See docs/hub_zoo.md.",
    )
    zoo_sub = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    zoo_sub.add_parser("list", help="list the presets")
    show = zoo_sub.add_parser("show", help="config, recipe and parameter counts of a preset")
    show.add_argument("name")
    create = zoo_sub.add_parser("create", help="build a preset into a folder (checkpoint + card)")
    create.add_argument("name")
    create.add_argument("out_dir")
    create.add_argument("--source", help="dense base folder (upcycling presets)")
    create.add_argument("--seed", type=int, default=0, help="random seed (from-scratch presets)")
    create.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    render = zoo_sub.add_parser(
        "render-cards",
        help="rewrite model_cards/<name>.md for every preset (after changing a preset or the template)",
    )
    render.add_argument("--cards-dir", default=None, help="write the cards here instead of model_cards/")
    p.set_defaults(func=_run_zoo)


def _run_inspect(args: argparse.Namespace) -> int:
    from .compression import compression_table  # lazy: CLI start-up
    from .plotting import inspect_routing, plot_expert_load

    text_path = Path(args.text)
    if not text_path.is_file():
        raise FileNotFoundError(f"--text {text_path} not found")
    if args.plot:
        # Checked before the (possibly minutes-long) forward pass rather than after it.
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install 'hf-moe[plot]'")
    model_dir = _model(args, args.model_dir)
    stats = inspect_routing(
        model_dir,
        text_path.read_text(encoding="utf-8", errors="replace"),
        tokenizer_dir=args.tokenizer and _model(args, args.tokenizer, weights=False),
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        progress=not args.no_progress,
    )
    print(stats.format_table())
    history = compression_table(model_dir)  # which experts `hf-moe compress` removed or merged, per layer
    if history:
        print(history)
    if args.json:
        Path(args.json).write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
        print(f"statistics: {args.json}")
    if args.plot:
        print(f"heatmap: {plot_expert_load(stats, args.plot)}")
    return 0


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="per-layer expert load, dropped tokens and routing entropy over a text",
        description="Route the first --max-tokens tokens of a text through an hf_moe checkpoint (loaded on the "
        "CPU) and print, per MoE layer, each expert's share of the tokens, the tokens no expert took and the "
        "routing entropy. --plot writes a layer x expert heatmap, --json the figures. See docs/router-statistics.md.",
    )
    p.add_argument("model_dir", help="hf_moe checkpoint folder or Hub repo id")
    _add_revision(p)
    p.add_argument("--text", required=True, help="UTF-8 text file to route")
    p.add_argument("--plot", help="write a layer x expert load heatmap PNG here")
    p.add_argument("--json", help="write the statistics as JSON here")
    p.add_argument(
        "--max-tokens", type=int, default=2048, help="tokens from the start of the text (default 2048)"
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row of the batch (default 512)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: MODEL_DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_inspect)


def _run_compress(args: argparse.Namespace) -> int:
    from .compression import compress  # lazy: CLI start-up

    out = compress(
        _model(args, args.model_dir),
        args.out_dir,
        keep=args.keep,
        method=args.method,
        calib=args.calib,
        calib_tokens=args.calib_tokens,
        recover_router=args.recover_router,
        merge=args.merge,
        seed=args.seed,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )
    _write_card(out)
    print(out)
    return 0


def _add_compress(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compress",
        help="prune or merge the experts of an MoE checkpoint (REAP / frequency / random, calibration text)",
        description="Prune (or with --merge, merge) the routed experts of an hf_moe or native MoE checkpoint, "
        "keeping the same number in every layer; OUT_DIR keeps the input's format. The provenance records the "
        "experts kept, removed and merged per layer.",
    )
    p.add_argument(
        "model_dir", metavar="MODEL", help="hf_moe or native MoE checkpoint folder, or Hub repo id"
    )
    p.add_argument("out_dir", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    _add_revision(p)
    p.add_argument(
        "--keep", type=float, default=0.75, help="fraction of experts kept per layer (default 0.75)"
    )
    p.add_argument(
        "--method",
        default="reap",
        choices=["reap", "frequency", "random"],
        help="expert saliency (default reap: router-weighted expert output norm)",
    )
    p.add_argument("--calib", metavar="FILE", default=None, help="calibration text file (UTF-8)")
    p.add_argument("--calib-tokens", type=int, default=65536, help="calibration tokens used (default 65536)")
    p.add_argument(
        "--recover-router",
        type=int,
        default=0,
        metavar="N",
        help="steps of router-only distillation against the original model (default 0)",
    )
    p.add_argument(
        "--merge", action="store_true", help="merge experts by output similarity instead of pruning"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --method random")
    _add_output(p, "OUT")
    p.set_defaults(func=_run_compress)


SUBCOMMANDS: list[AddCommand] = [
    _add_lora_targets,
    _add_lora,
    _add_export,
    _add_import,
    _add_serve,
    _add_upcycle,
    _add_merge,
    _add_card,
    _add_push,
    _add_zoo,
    _add_inspect,
    _add_compress,
]


# What the CLI calls a library error: a problem with the user's input or environment that the message alone lets
# them fix. It is printed as one line on stderr with exit code 2. Anything else is a bug in hf-moe or in a
# dependency, and keeps its traceback (exit code 1).
#   - ValueError and subclasses: invalid options, configs and checkpoint contents (json.JSONDecodeError and
#     UnicodeDecodeError are ValueErrors, and so is the config's own validation error);
#   - OSError and subclasses: missing, existing or unreadable paths (FileNotFoundError, FileExistsError,
#     NotADirectoryError, PermissionError), a full disk, transformers' "not a valid JSON file" for config.json;
#   - errors of dependencies named below, matched by name so that checking one imports nothing: corrupt or
#     truncated .safetensors files, a config.json field of the wrong type (transformers' configs are
#     huggingface_hub strict dataclasses), a malformed YAML prompts file.
# ImportError, RuntimeError, KeyError and the rest stay internal errors: a command whose optional dependency is
# missing says so itself, as a ValueError naming the extra to install.
LIBRARY_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError)
LIBRARY_ERRORS_BY_NAME: dict[str, str] = {  # qualified class name -> label put before the message
    "safetensors._safetensors_rust.SafetensorError": "invalid safetensors file: ",
    "huggingface_hub.errors.StrictDataclassError": "invalid config: ",
    "yaml.error.YAMLError": "invalid YAML: ",
}


def _library_label(err: BaseException) -> str | None:
    for cls in type(err).__mro__:
        label = LIBRARY_ERRORS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if label is not None:
            return label
    return None


def is_library_error(err: BaseException) -> bool:
    """Whether `err` is reported as a one-line message with exit code 2 (see LIBRARY_ERRORS above)."""
    return isinstance(err, LIBRARY_ERRORS) or _library_label(err) is not None


# Library messages name keyword arguments (`overwrite=True`); a CLI user needs the flag. A message that already
# gives both ("overwrite=True (--overwrite)") shows the flag alone.
CLI_SPELLINGS: dict[str, str] = {"overwrite=True": "--overwrite"}


def error_message(err: BaseException) -> str:
    """`err` as one line for stderr, with options spelled as the CLI's flags."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    for keyword, flag in CLI_SPELLINGS.items():
        text = text.replace(f"{keyword} ({flag})", flag).replace(keyword, flag)
    return (_library_label(err) or "") + " ".join(text.split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-moe", description="Mixture-of-Experts for the Hugging Face ecosystem."
    )
    parser.add_argument("--version", action="version", version=f"hf-moe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Only now, with valid arguments, load the library (torch, transformers): `--help` and usage errors are instant.
    register()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print(f"hf-moe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_library_error(err):
            raise  # a bug: Python prints the traceback and exits 1
        print(f"hf-moe {args.command}: error: {error_message(err)}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
