"""Speed of the hf_moe sparse MoE block against transformers' Qwen3-MoE block and a dense SwiGLU of equal active size.

All variants are timed in one run, interleaved round by round (the machine is shared, so absolute times drift;
the ratios within one run are the figures that mean something). The table goes to stdout and, unless
`--no-write`, into BENCHMARKS.md between this benchmark's begin/end markers (a rerun replaces its own section).

Shapes (`--shape`): `small` H=512, I=1024, E=8, top-2; `qwen3-30b-a3b` the MoE layer of Qwen3-30B-A3B, H=2048,
I=768, E=128, top-8 (many small experts; token counts scaled to the CPU). Variants, fp32 by default:
- `dense-active`: `HfMoeMLP` with intermediate top_k * I, the same parameters per token as the MoE block.
- `hf_moe`: `HfMoeSparseMoeBlock` (softmax_topk router) with the default experts implementation ("hf_moe").
- `hf_moe[name]` (with `--implementations name ...`): the same block and weights with that experts implementation.
- `hf_moe compiled` (with `--compile`): the same block under `torch.compile(fullgraph=True)`, compile time excluded.
- `qwen3 eager` / `qwen3 grouped_mm`: transformers' `Qwen3MoeSparseMoeBlock`, same router and expert weights,
  with `config._experts_implementation` set to "eager" / "grouped_mm" (the kernel that runs is checked with the
  profiler and printed).

Usage:
    python benchmarks/moe_block.py                      # 1, 64, 4096 tokens; fwd and fwd+bwd; writes BENCHMARKS.md
    python benchmarks/moe_block.py --shape qwen3-30b-a3b   # 1, 64, 512 tokens; its own section
    python benchmarks/moe_block.py --tokens 64 --no-write --repeats 21
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from hf_moe.modeling.configuration_hf_moe import HfMoeConfig
from hf_moe.modeling.experts import (
    DEFAULT_EXPERTS_IMPLEMENTATION,
    SMALL_GROUPS_ENV,
    TRAIN_KERNEL_MAX_ROWS_PER_EXPERT,
    fused_max_rows_per_expert,
    small_groups_kernel,
)
from hf_moe.modeling.modeling_hf_moe import HfMoeMLP, HfMoeSparseMoeBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import command_line, eviction_buffer, eviction_bytes, machine_line  # noqa: E402

# name -> (hidden, moe intermediate, experts, top-k, default token counts)
SHAPES = {
    "small": (512, 1024, 8, 2, [1, 64, 4096]),
    "qwen3-30b-a3b": (2048, 768, 128, 8, [1, 64, 512]),
}
HIDDEN, INTERMEDIATE, NUM_EXPERTS, TOP_K, _ = SHAPES["small"]
ANCHOR = "<!-- moe_block: written by benchmarks/moe_block.py -->"
BEGIN, END = "<!-- moe_block:begin -->", "<!-- moe_block:end -->"


def set_shape(name: str, section: str | None = None) -> None:
    """Select the layer shape (module-level constants read by the builders below) and the BENCHMARKS.md section
    (by default the shape's own; the small shape's is the original `moe_block` one)."""
    global HIDDEN, INTERMEDIATE, NUM_EXPERTS, TOP_K, ANCHOR, BEGIN, END
    HIDDEN, INTERMEDIATE, NUM_EXPERTS, TOP_K, _ = SHAPES[name]
    section = section or name
    if section != "small":
        ANCHOR = f"<!-- moe_block {section}: written by benchmarks/moe_block.py -->"
        BEGIN, END = f"<!-- moe_block {section}:begin -->", f"<!-- moe_block {section}:end -->"


GROUPED_KERNELS = ("aten::_grouped_mm", "aten::grouped_mm", "transformers::grouped_mm_fallback")


def build_variants(
    dtype: torch.dtype, seed: int, compile_block: bool = False, implementations: tuple[str, ...] = ()
) -> dict[str, nn.Module]:
    """The four modules, MoE variants sharing one set of router and expert weights."""
    torch.manual_seed(seed)
    ours_cfg = HfMoeConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=INTERMEDIATE,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        router_type="softmax_topk",
        norm_topk_prob=True,
        hidden_act="silu",
    )
    # What HfMoePreTrainedModel.get_correct_experts_implementation(None) picks for a model.
    ours_cfg._experts_implementation = DEFAULT_EXPERTS_IMPLEMENTATION
    ours = HfMoeSparseMoeBlock(ours_cfg)
    std = 0.02
    with torch.no_grad():
        # The router gets a larger spread than the experts so that routing is not near-uniform by accident.
        ours.gate.weight.normal_(0.0, 0.5)
        ours.experts.gate_up_proj.normal_(0.0, std)
        ours.experts.down_proj.normal_(0.0, std)

    variants: dict[str, nn.Module] = {}
    dense = HfMoeMLP(ours_cfg, TOP_K * INTERMEDIATE)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, std)
    variants["dense-active"] = dense
    variants["hf_moe"] = ours
    for impl in implementations:
        # The same weights through one named experts implementation each (own config, shared tensors).
        cfg = copy.deepcopy(ours_cfg)
        cfg._experts_implementation = impl
        block = HfMoeSparseMoeBlock(cfg)
        block.gate.weight = ours.gate.weight
        block.experts.gate_up_proj, block.experts.down_proj = (
            ours.experts.gate_up_proj,
            ours.experts.down_proj,
        )
        variants[f"hf_moe[{impl}]"] = block
    if compile_block:
        # The same block (same weights) under torch.compile; "hf_moe" takes the sync-free grouped path there.
        variants["hf_moe compiled"] = torch.compile(ours, fullgraph=True)
    for impl in ("eager", "grouped_mm"):
        cfg = Qwen3MoeConfig(
            hidden_size=HIDDEN,
            moe_intermediate_size=INTERMEDIATE,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=True,
            hidden_act="silu",
        )
        cfg._experts_implementation = impl  # read by @use_experts_implementation on every forward
        block = Qwen3MoeSparseMoeBlock(cfg)
        assert block.state_dict().keys() == ours.state_dict().keys()  # same names: gate.weight, experts.*
        # Share the tensors themselves (E=128 experts are 2.4 GB in fp32; the fresh ones were never touched, so
        # never resident): gradients are reset before each step.
        block.gate.weight = ours.gate.weight
        block.experts.gate_up_proj, block.experts.down_proj = (
            ours.experts.gate_up_proj,
            ours.experts.down_proj,
        )
        variants[f"qwen3 {impl}"] = block
    return {name: module.to(dtype).train() for name, module in variants.items()}


def check_variants(variants: dict[str, nn.Module], dtype: torch.dtype) -> list[str]:
    """Assert the MoE variants agree on one input and report which experts forward / kernel each one runs."""
    x = torch.randn(1, 64, HIDDEN, dtype=dtype)
    notes = []
    with torch.no_grad():
        reference = variants["hf_moe"](x)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, module in variants.items():
        if not name.startswith("qwen3"):
            continue
        impl = module.experts.config._experts_implementation
        fn = ALL_EXPERTS_FUNCTIONS.get_interface(impl, type(module.experts).forward)
        with torch.no_grad(), torch.profiler.profile() as prof:
            out = module(x)
        torch.testing.assert_close(out, reference, **tol)
        ops = {event.name for event in prof.events()}
        kernels = sorted(k for k in GROUPED_KERNELS if k in ops)
        if impl == "grouped_mm" and not kernels:
            raise RuntimeError(f"{name}: no grouped-mm kernel ran (ops: {sorted(ops)[:20]} ...)")
        if impl == "eager" and kernels:
            raise RuntimeError(f"{name}: the eager path ran {kernels}")
        fn_name = f"{fn.__module__}.{fn.__qualname__}"
        notes.append(
            f"`{name}` runs `{fn_name}`" + (f" ({', '.join(kernels)})" if kernels else " (per-expert loop)")
        )
    return notes


def make_step(
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


def time_case(
    variants: dict[str, nn.Module],
    tokens: int,
    backward: bool,
    dtype: torch.dtype,
    repeats: int,
    budget_s: float,
    evict: bool = True,
) -> dict[str, float]:
    """Median seconds per call of each variant, interleaved round by round (rotating the order). With `evict`, a
    buffer twice the last-level cache is written before each timed call: the MoE variants share one set of weights,
    so without it every variant but the one after dense-active would find them in the cache, as no layer of a real
    model does."""
    evict_buffer = eviction_buffer() if evict else None
    for module in variants.values():  # inference in eval mode (as `generate` runs it), training in train mode
        module.train(backward)
    x = torch.randn(1, tokens, HIDDEN, dtype=dtype, requires_grad=backward)
    grad_out = torch.randn(1, tokens, HIDDEN, dtype=dtype)
    steps = {name: make_step(m, x, grad_out, backward) for name, m in variants.items()}
    names = list(steps)
    estimate = 0.0
    for name in names:  # warm-up (allocator, oneDNN primitives, lazy imports), then a timing estimate
        steps[name]()
        start = time.perf_counter()
        # The budget counts the eviction too, or a big cache would stretch the run.
        if evict_buffer is not None:
            evict_buffer.fill_(1.0)
        steps[name]()
        estimate += time.perf_counter() - start
    rounds = max(5, min(repeats, int(budget_s / max(estimate, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if evict_buffer is not None:
                evict_buffer.fill_(1.0)
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def render(results: list[tuple[int, str, dict[str, float]]], names: list[str]) -> str:
    header = ["tokens", "pass"] + [
        f"{n} ms (x dense)" if n != "dense-active" else "dense-active ms" for n in names
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for tokens, mode, times in results:
        dense = times["dense-active"]
        cells = [str(tokens), mode]
        for n in names:
            cells.append(
                fmt_ms(times[n]) if n == "dense-active" else f"{fmt_ms(times[n])} ({times[n] / dense:.2f}x)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Targets for hf_moe, as time over dense-active in the same run: (tokens, pass) -> bound.
TARGETS = {(4096, "fwd+bwd"): 1.05, (64, "fwd+bwd"): 1.4, (1, "fwd"): 1.2}


def verdict(results: list[tuple[int, str, dict[str, float]]]) -> str:
    """One line per target (met or missed) and the cases where a transformers backend beat hf_moe."""
    parts = []
    for tokens, mode, times in results:
        ratio = times["hf_moe"] / times["dense-active"]
        bound = TARGETS.get((tokens, mode))
        if bound is not None:
            # Three decimals where two would round onto the bound and hide which side of it the ratio is.
            shown = f"{ratio:.3f}" if f"{ratio:.2f}" == f"{bound:.2f}" else f"{ratio:.2f}"
            parts.append(
                f"{tokens} tokens {mode} {shown}x vs <= {bound}x: {'met' if ratio <= bound else 'missed'}"
            )
    slower = []
    for tokens, mode, times in results:
        faster = [
            f"{n} at {times[n] / times['hf_moe']:.2f}x our time" for n in times if n.startswith("qwen3")
        ]
        if min(times[n] for n in times if n.startswith("qwen3")) < times["hf_moe"]:
            slower.append(f"{tokens} tokens {mode} ({', '.join(faster)})")
    line = "Targets: " + "; ".join(parts) + "."
    if not parts:
        line = "No targets are set for this shape."
    if slower:
        return line + " A transformers backend was faster than hf_moe in: " + "; ".join(slower) + "."
    return line + " hf_moe was at least as fast as every transformers backend in every case."


def write_section(path: Path, body: str) -> None:
    """Replace this benchmark's section after its anchor, atomically (temp file beside, then rename)."""
    text = path.read_text()
    if ANCHOR not in text:  # a new shape's section goes after the first one
        first = "<!-- moe_block:end -->"
        text = text.replace(first, f"{first}\n\n{ANCHOR}", 1) if first in text else text + f"\n{ANCHOR}\n"
    section = f"{BEGIN}\n{body.strip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.replace(ANCHOR, f"{ANCHOR}\n{section}", 1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default: the shape's)")
    parser.add_argument("--section", help="BENCHMARKS.md section to write (default: the shape's)")
    parser.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=101, help="most timed rounds per case")
    parser.add_argument(
        "--budget", type=float, default=15.0, help="seconds of timing per case (fewer rounds)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile", action="store_true", help="add the hf_moe block under torch.compile(fullgraph)"
    )
    parser.add_argument(
        "--implementations",
        nargs="*",
        default=[],
        help="add the hf_moe block with each of these experts implementations (e.g. eager hf_moe_cpu "
        "hf_moe_grouped grouped_mm)",
    )
    parser.add_argument(
        "--no-evict",
        action="store_true",
        help="do not write a buffer twice the last-level cache before each timed call (the variants' shared "
        "weights then stay cached)",
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    set_shape(args.shape, args.section)
    args.tokens = args.tokens or SHAPES[args.shape][4]

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    variants = build_variants(dtype, args.seed, args.compile, tuple(args.implementations))
    notes = check_variants(variants, dtype)
    names = list(variants)
    load_before = os.getloadavg()[0]
    results = []
    for tokens in args.tokens:
        for mode in args.passes:
            backward = mode == "fwd+bwd"
            times = time_case(variants, tokens, backward, dtype, args.repeats, args.budget, not args.no_evict)
            results.append((tokens, mode, times))
            print(
                f"{tokens:>5} {mode:<8}" + "".join(f" {n}={fmt_ms(t)}ms" for n, t in times.items()),
                flush=True,
            )

    table = render(results, names)
    load_after = os.getloadavg()[0]
    command = command_line("moe_block.py", argv)
    body = "\n".join(
        [
            f"### MoE block speed, {args.shape} shape ({args.dtype}, CPU)",
            "",
            f"`{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"{machine_line(args.threads)}.",
            f"H={HIDDEN}, I={INTERMEDIATE}, E={NUM_EXPERTS}, top-{TOP_K}, one sequence of `tokens` tokens. Median of "
            "interleaved rounds; `x dense` is the time over `dense-active` (SwiGLU with intermediate "
            f"{TOP_K * INTERMEDIATE}, the MoE block's active parameters) in the same run. fwd runs under "
            "`torch.no_grad()` in eval mode; fwd+bwd includes the gradients of the input and of every parameter. "
            + (
                "Caches as the variants left them (`--no-evict`)."
                if args.no_evict
                else f"Before each timed call a {eviction_bytes() >> 20} MB buffer (twice the last-level "
                "cache) is written, so every variant reads its weights from memory, as a layer of a real model does."
            ),
            "",
            table,
            "",
            verdict(results),
            "",
            "Backends: "
            + "; ".join(notes)
            + '. `hf_moe` ("hf_moe" = "hf_moe_cpu" on the CPU) without autograd, with '
            f"`{SMALL_GROUPS_ENV}={small_groups_kernel()}`: in fp32, one token and groups of up to "
            f"{fused_max_rows_per_expert()} rows per expert on average through the fused kernel (each routed expert's "
            "weights read once, both projections, weights and combine in one call) when the setting is `fused`, "
            "and larger groups through the compiled kernel's grouped products (below); "
            "otherwise groups under 256 rows per expert on average as one padded `bmm` per projection (padding "
            "capped at 2x the routed rows) or two grouped GEMMs on the routed rows, by CPU vendor, and larger groups "
            "as one matmul per expert; under autograd a hand-written backward (gate and up gradients in one buffer, "
            "one `index_add_`) whose grouped products run "
            + (
                "in fp32 through the compiled kernel's training products "
                + (
                    "at every group size"
                    if TRAIN_KERNEL_MAX_ROWS_PER_EXPERT is None
                    else f"up to {TRAIN_KERNEL_MAX_ROWS_PER_EXPERT} rows per expert on average"
                )
                + " with the setting `fused`, else on `F.grouped_mm` (MKL)."
            ),
            f"1-minute load average {load_before:.1f} before and {load_after:.1f} after the timings "
            f"({os.cpu_count()} cores, {args.threads} threads timed)"
            + (
                ": other jobs shared the CPU, which inflates every multi-threaded kernel, most of all in the "
                "variants that launch many small ones."
                if max(load_before, load_after) > args.threads + 0.5
                else ": nothing else ran."
            ),
            "No GPU was available for this run, so `grouped_mm` on CUDA (where hf_moe switches to it) is not timed.",
        ]
    )
    print()
    print(table)
    print("\n".join(notes))
    if not args.no_write:
        write_section(args.output, body)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
