"""Experts with few rows each (decoding): why hf_moe runs them through its own fused kernel, and what it buys.

Decoding gives each routed expert one to a few rows, so an MoE layer is bound by the bytes of expert weights it
reads. Two tables, weights in DRAM (a buffer twice the last-level cache is written before each call), median of
interleaved rounds, fp32, `torch.no_grad()`:

1. **Read rate** of the same expert weights, by rows per expert: a plain `sum()` over the tensors (what the memory
   delivers to torch's own vectorised loop), MKL through `F.linear` (what `nn.Linear`, the dense model and the
   "padded"/"grouped" kernels' matmuls get), and the fused kernel (`hf_moe/modeling/cpu_kernel.py`), which reads
   each routed expert's weights once and does both projections, the activation, the weights and the combine.
2. **The experts as hf_moe runs them** (`hf_moe_cpu`, routing from a real softmax over random logits), with each
   value of `HF_MOE_CPU_SMALL_GROUPS` (fused, padded, grouped), by tokens, at the SmolLM2-135M equal-active
   shape (H=576, I=768, E=8, top-2) and the Qwen3-30B-A3B shape (H=2048, I=768, E=128, top-8).

    python benchmarks/few_rows.py               # writes its section of BENCHMARKS.md
    python benchmarks/few_rows.py --rounds 11 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from hf_moe.modeling.cpu_kernel import fused_experts, load_fused_kernel
from hf_moe.modeling.experts import (
    SMALL_GROUPS_ENV,
    SMALL_GROUPS_KERNELS,
    _ExpertsView,
    cpu_experts_forward,
    fused_max_rows_per_expert,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import command_line, eviction_buffer, load_line, machine_line, write_section  # noqa: E402

# name -> (hidden, moe intermediate, experts, top-k, token counts for table 2)
SHAPES = {
    "smollm2-equal-active": (576, 768, 8, 2, (1, 4, 16, 32, 64, 128, 256, 384)),
    "qwen3-30b-a3b": (2048, 768, 128, 8, (1, 4, 16, 64, 256, 512)),
}
ROWS = (1, 2, 4, 8)  # rows per expert in table 1
TABLE1_EXPERTS = 8  # experts read in table 1 (SmolLM2 shape: all of them)


def timed(cases: dict, rounds: int, evict: torch.Tensor) -> dict[str, float]:
    """Median seconds per case over interleaved rounds, caches evicted before every call."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for fn in cases.values():  # warm-up (oneDNN/MKL primitives, first kernel call)
            fn()
        for _ in range(rounds):
            for name, fn in cases.items():
                evict.fill_(1.0)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def read_rate_table(rounds: int, evict: torch.Tensor) -> str:
    hidden, inter, num_experts, _, _ = SHAPES["smollm2-equal-active"]
    gate_up = torch.randn(num_experts, 2 * inter, hidden) * 0.05  # (E, 2I, H)
    down = torch.randn(num_experts, hidden, inter) * 0.05  # (E, H, I)
    megabytes = (gate_up.numel() + down.numel()) * 4 / 1e6
    lines = [
        f"Table 1: reading the {num_experts} experts of the SmolLM2 shape ({megabytes:.1f} MB) with n rows each; GB/s "
        "of weight bytes (higher is better).",
        "",
        "| rows per expert | `sum()` of the weights | MKL (`F.linear` per expert and projection) | fused kernel |",
        "|---:|---:|---:|---:|",
    ]
    for rows in ROWS:
        x = torch.randn(num_experts * rows, hidden)  # (S, H) grouped by expert
        token = torch.arange(num_experts * rows)
        weights = torch.rand(num_experts * rows)
        counts = [rows] * num_experts
        act = F.silu

        def mkl():
            for e in range(num_experts):
                gate, up = F.linear(x[e * rows : (e + 1) * rows], gate_up[e]).chunk(2, dim=-1)
                F.linear(act(gate) * up, down[e])

        cases = {
            "sum": lambda: (gate_up.sum(), down.sum()),
            "mkl": mkl,
            "fused": lambda: fused_experts(x, token, counts, weights, gate_up, down, "silu"),
        }
        t = timed(cases, rounds, evict)
        rates = {name: megabytes / 1e3 / seconds for name, seconds in t.items()}
        lines.append(f"| {rows} | {rates['sum']:.1f} | {rates['mkl']:.1f} | {rates['fused']:.1f} |")
    return "\n".join(lines)


def kernels_table(rounds: int, evict: torch.Tensor) -> str:
    lines = [
        "Table 2: the routed experts through `hf_moe_cpu`, ms per call by `HF_MOE_CPU_SMALL_GROUPS` (lower is "
        f"better; `fused` runs the fused kernel up to {fused_max_rows_per_expert()} rows per expert on average and "
        "the vendor's kernel above).",
        "",
        "| shape | tokens | rows per expert | "
        + " | ".join(f"`{k}` ms" for k in SMALL_GROUPS_KERNELS)
        + " | fastest |",
        "|---|---:|---:|" + "---:|" * len(SMALL_GROUPS_KERNELS) + "---|",
    ]
    previous = os.environ.get(SMALL_GROUPS_ENV)
    try:
        for shape, (hidden, inter, num_experts, top_k, token_counts) in SHAPES.items():
            gate_up = torch.randn(num_experts, 2 * inter, hidden) * 0.05
            down = torch.randn(num_experts, hidden, inter) * 0.05
            view = _ExpertsView(num_experts, hidden, inter, gate_up, down, ACT2FN["silu"], "silu")
            for tokens in token_counts:
                x = torch.randn(tokens, hidden)
                weights, index = torch.topk(torch.randn(tokens, num_experts).softmax(-1), top_k)  # (T, K)

                def run(kernel: str, x=x, index=index, weights=weights, view=view):
                    os.environ[SMALL_GROUPS_ENV] = kernel
                    cpu_experts_forward(view, x, index, weights)  # type: ignore[arg-type]

                t = timed({k: (lambda k=k: run(k)) for k in SMALL_GROUPS_KERNELS}, rounds, evict)
                best = min(t, key=t.__getitem__)
                cells = " | ".join(f"{t[k] * 1e3:.2f}" for k in SMALL_GROUPS_KERNELS)
                lines.append(
                    f"| {shape} | {tokens} | {tokens * top_k / num_experts:.1f} | {cells} | `{best}` |"
                )
    finally:
        if previous is None:
            os.environ.pop(SMALL_GROUPS_ENV, None)
        else:
            os.environ[SMALL_GROUPS_ENV] = previous
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    reason = load_fused_kernel()
    if reason is not None:
        parser.error(f"the fused kernel is not available: {reason}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = load_line()
    evict = eviction_buffer()
    tables = [read_rate_table(args.rounds, evict), kernels_table(args.rounds, evict)]
    command = command_line("few_rows.py", argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(
        [
            "### Few rows per expert (decoding): the fused CPU kernel against MKL (fp32, CPU)",
            "",
            f"`{command}` on {stamp}; {machine_line(args.threads)}.",
            f"Weights in DRAM (a {evict.numel() * 4 >> 20} MB buffer written before each call); median of "
            f"{args.rounds} interleaved rounds. Load average {load_before} before, {load_line()} after.",
            "",
            tables[0],
            "",
            tables[1],
        ]
    )
    print(body)
    if not args.no_write:
        write_section(args.output, "few_rows", body)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
