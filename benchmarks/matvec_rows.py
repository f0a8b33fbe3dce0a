"""Why one decoding token costs the Qwen3-30B-A3B-shaped MoE layer more than its dense-active SwiGLU: row length.

One token through the layer (H=2048, I=768, E=128, top-8) reads the same 151 MB of weights as a dense SwiGLU of
intermediate 8 x 768, but as 16 matrix-vector products instead of 2: per expert a gate/up product on a (2I, H) slice
(rows of H floats) and a down product on an (H, I) slice (rows of I floats). This script times `torch.mv` on the
same bytes laid out four ways, weights in DRAM (a buffer twice the last-level cache is written before each call,
and the expert tensors are E=128 experts large), median of interleaved rounds:

- the 8 experts' down products (8 x (H, I), rows of 768 floats) against the dense down product ((H, 8I), rows of
  6144) and one tall (8H, I) product (rows of 768, one call);
- the 8 experts' gate/up products (8 x (2I, H), rows of 2048) against the dense one ((16I, H), rows of 2048).

When the tall product is as slow per byte as the 8 experts, the cost is the row length, not the number of calls.

    python benchmarks/matvec_rows.py               # writes its section of BENCHMARKS.md
    python benchmarks/matvec_rows.py --threads 1 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import command_line, eviction_buffer, load_line, machine_line, write_section  # noqa: E402

HIDDEN, INTER, NUM_EXPERTS, TOP_K = 2048, 768, 128, 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = load_line()
    down = torch.randn(NUM_EXPERTS, HIDDEN, INTER)  # (E, H, I)
    gate_up = torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN)  # (E, 2I, H)
    dense_down = torch.randn(HIDDEN, TOP_K * INTER)  # (H, 8I)
    dense_gate_up = torch.randn(2 * TOP_K * INTER, HIDDEN)  # (16I, H)
    tall = torch.randn(TOP_K * HIDDEN, INTER)  # (8H, I)
    experts = torch.randperm(NUM_EXPERTS)[:TOP_K].tolist()
    h, h_dense, x = torch.randn(INTER), torch.randn(TOP_K * INTER), torch.randn(HIDDEN)
    evict = eviction_buffer()  # written before each call
    cases = {
        "down: 8 experts x (H, I)": (lambda: [torch.mv(down[e], h) for e in experts], INTER),
        "down: dense (H, 8I)": (lambda: torch.mv(dense_down, h_dense), TOP_K * INTER),
        "down: one tall (8H, I)": (lambda: torch.mv(tall, h), INTER),
        "gate/up: 8 experts x (2I, H)": (lambda: [torch.mv(gate_up[e], x) for e in experts], HIDDEN),
        "gate/up: dense (16I, H)": (lambda: torch.mv(dense_gate_up, x), HIDDEN),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (fn, _) in cases.items():
            evict.fill_(1.0)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    megabytes = {
        "down": TOP_K * HIDDEN * INTER * 4 / 1e6,
        "gate/up": TOP_K * 2 * INTER * HIDDEN * 4 / 1e6,
    }
    lines = [
        "| product | row length (floats) | MB read | ms (median) | GB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (_, row) in cases.items():
        ms = statistics.median(times[name]) * 1e3
        mb = megabytes[name.split(":")[0]]
        lines.append(f"| {name} | {row} | {mb:.1f} | {ms:.3f} | {mb / ms:.1f} |")
    table = "\n".join(lines)
    command = command_line("matvec_rows.py", argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(
        [
            "### One decoding token at the Qwen3-30B-A3B shape: matrix-vector products by row length (fp32, CPU)",
            "",
            f"`{command}` on {stamp}; {machine_line(args.threads)}.",
            f"Weights in DRAM (a {evict.numel() * 4 >> 20} MB buffer written before each call); median of "
            f"{args.rounds} interleaved rounds. Load average {load_before} before, {load_line()} after.",
            "",
            table,
        ]
    )
    print(body)
    if not args.no_write:
        write_section(args.output, "matvec_rows", body)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
