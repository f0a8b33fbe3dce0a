"""The six grouped products of CPU training, hf_moe's compiled kernel against MKL, by rows per expert.

CPU training of the routed experts (`_RoutedExpertsFunction` in hf_moe/modeling/experts.py) runs six products per
layer over the rows sorted by expert: the forward's gate/up and down (`x @ W.T`), the backward's input-side
products (`g @ W`) and the two weight gradients (`g.T @ a` per expert). Each is timed as hf_moe runs it with
`HF_MOE_CPU_SMALL_GROUPS=fused` (the kernel's `grouped_nt` / `grouped_nn` / `grouped_tn`, hf_moe/modeling/
cpu_kernel.py) and as it runs otherwise (`F.grouped_mm`, MKL's GEMMs on the same rows), on the same tensors: fp32,
weights in DRAM (a buffer twice the last-level cache written before each call), median of interleaved rounds.

    python benchmarks/train_products.py               # writes its section of BENCHMARKS.md
    python benchmarks/train_products.py --rounds 9 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_moe.modeling.cpu_kernel import (
    grouped_times,
    grouped_times_transposed,
    grouped_weight_grad,
    load_fused_kernel,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import command_line, eviction_buffer, load_line, machine_line, write_section  # noqa: E402

# name -> (hidden, moe intermediate, experts, rows per expert)
SHAPES = {
    "smollm2-equal-active": (576, 768, 8, (1, 4, 16, 64, 256, 1024)),
    "moe_block small": (512, 1024, 8, (1, 4, 16, 64, 256, 1024)),
}
PRODUCTS = (
    "gate/up fwd",
    "down fwd",
    "down bwd (input)",
    "gate/up bwd (input)",
    "down weight grad",
    "gate/up weight grad",
)


def cases(hidden: int, inter: int, experts: int, rows: int) -> dict[str, tuple[Callable, Callable]]:
    """product -> (kernel call, MKL call) on one set of tensors."""
    gen = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen)  # (E, 2I, H), as the parameter
    down = torch.randn(experts, hidden, inter, generator=gen)  # (E, H, I)
    s = rows * experts
    x, h = torch.randn(s, hidden, generator=gen), torch.randn(s, inter, generator=gen)
    g, g_gate_up = torch.randn(s, hidden, generator=gen), torch.randn(s, 2 * inter, generator=gen)
    counts = [rows] * experts
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    return {
        "gate/up fwd": (
            lambda: grouped_times_transposed(x, gate_up, counts),
            lambda: F.grouped_mm(x, gate_up.transpose(1, 2), offs=offsets),
        ),
        "down fwd": (
            lambda: grouped_times_transposed(h, down, counts),
            lambda: F.grouped_mm(h, down.transpose(1, 2), offs=offsets),
        ),
        "down bwd (input)": (
            lambda: grouped_times(g, down, counts),
            lambda: F.grouped_mm(g, down, offs=offsets),
        ),
        "gate/up bwd (input)": (
            lambda: grouped_times(g_gate_up, gate_up, counts),
            lambda: F.grouped_mm(g_gate_up, gate_up, offs=offsets),
        ),
        "down weight grad": (
            lambda: grouped_weight_grad(g, h, counts),
            lambda: F.grouped_mm(g.t(), h, offs=offsets),
        ),
        "gate/up weight grad": (
            lambda: grouped_weight_grad(g_gate_up, x, counts),
            lambda: F.grouped_mm(g_gate_up.t(), x, offs=offsets),
        ),
    }


def timed(
    pairs: dict[str, tuple[Callable, Callable]], rounds: int, evict: torch.Tensor
) -> dict[str, list[float]]:
    """product -> [kernel, MKL] median seconds over interleaved rounds, caches evicted before every call."""
    calls = {(name, side): fn for name, pair in pairs.items() for side, fn in enumerate(pair)}
    times: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
    for fn in calls.values():  # warm-up
        fn()
    for _ in range(rounds):
        for key, fn in calls.items():
            evict.fill_(1.0)
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {name: [statistics.median(times[(name, side)]) for side in range(2)] for name in pairs}


def table(shape: str, rounds: int, evict: torch.Tensor) -> str:
    hidden, inter, experts, all_rows = SHAPES[shape]
    header = ["rows per expert", *PRODUCTS, "all six", "MKL / kernel"]
    lines = [
        f"**{shape}** (H={hidden}, I={inter}, E={experts}): ms, kernel / MKL",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for rows in all_rows:
        result = timed(cases(hidden, inter, experts, rows), rounds, evict)
        kernel, mkl = (sum(v[side] for v in result.values()) for side in range(2))
        cells = [f"{v[0] * 1e3:.2f} / {v[1] * 1e3:.2f}" for v in result.values()]
        lines.append(
            f"| {rows} | "
            + " | ".join(cells)
            + f" | {kernel * 1e3:.2f} / {mkl * 1e3:.2f} | {mkl / kernel:.2f}x |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    reason = load_fused_kernel()
    if reason is not None:
        parser.error(f"the compiled kernel is not available: {reason}")
    torch.set_num_threads(args.threads)
    load_before = load_line()
    evict = eviction_buffer()
    with torch.no_grad():
        tables = [table(shape, args.rounds, evict) for shape in args.shapes]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(
        [
            "### Grouped products for CPU training: the compiled kernel against MKL (fp32, CPU)",
            "",
            f"`{command_line('train_products.py', argv)}` on {stamp}; {machine_line(args.threads)}.",
            f"Weights in DRAM (a {evict.numel() * 4 >> 20} MB buffer written before each call); median of "
            f"{args.rounds} interleaved rounds. Load average {load_before} before, {load_line()} after. MKL = "
            "`F.grouped_mm` on the same rows, what CPU training runs without the kernel.",
            "",
            "\n\n".join(tables),
        ]
    )
    print(body)
    if not args.no_write:
        write_section(args.output, "train_products", body)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
