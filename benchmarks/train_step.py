"""Training-step time of the real SmolLM2-135M upcycled to hf_moe, against the dense model and transformers' Mixtral.

The models of benchmarks/generate.py (fp32; `equal-active` 8 half-width experts top-2, `copy` 4 copies top-2; hf_moe
and Mixtral holding the same weights). One step = forward + backward + `torch.optim.AdamW.step` on a batch of
`--batch` x `--seq-len` tokens of real Shakespeare text (causal-LM loss on the batch itself; no router losses, as
both models' configs default). Only one model trains at a time (an MoE model's weights, gradients and AdamW state
take ~6 GB here): each round loads every model in turn, runs `--warmup` untimed steps (the AdamW state is created
there) and `--steps` timed ones, and frees it; rounds rotate the order, and the median over all timed steps counts.
The first steps after a load grow the heap, and a VM pays a page fault per first-touched page (the MoE models, with
2.8x the parameters, pay most: ~250k minor faults in their second step against ~0 from the fourth on), so three
warm-up steps are the default and the table reports the minor page faults of the timed steps.

Usage:
    python benchmarks/train_step.py                    # both upcycles; writes BENCHMARKS.md
    python benchmarks/train_step.py --kinds equal-active --batch 1 --seq-len 32 --rounds 1 --steps 1 --no-write
    python benchmarks/train_step.py --kinds equal-active --phases   # forward / backward / AdamW apart
"""

from __future__ import annotations

import argparse
import datetime
import gc
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_moe.modeling.experts import SMALL_GROUPS_ENV, small_groups_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import (  # noqa: E402
    UPCYCLES,
    command_line,
    load,
    load_line,
    machine_line,
    model_dirs,
    text_batch,
    write_section,
)

DENSE_TARGET = 1.05  # hf_moe step time over dense, equal-active upcycle
MIXTRAL_TARGET = 1.2  # Mixtral step time over hf_moe, both upcycles
# The same AdamW for every model: torch's fused CPU kernel by default (Trainer's `optim="adamw_torch_fused"`),
# 4.5x faster than the per-tensor loop on 319M expert parameters here; "adamw" is torch's default implementation.
OPTIMIZERS: dict[str, dict[str, bool]] = {"adamw_fused": {"fused": True}, "adamw": {}}


def step_times(
    path: Path,
    ids: torch.Tensor,
    warmup: int,
    steps: int,
    phases: list[tuple[float, float, float]] | None = None,
    *,
    optimizer_name: str = "adamw_fused",
    faults: list[int] | None = None,
) -> list[float]:
    """Whole-step seconds of the timed steps; with `phases`, also append (forward, backward, AdamW) seconds; with
    `faults`, the minor page faults of each timed step."""
    model = load(path).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **OPTIMIZERS[optimizer_name])
    times = []
    for i in range(warmup + steps):
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            if faults is not None:
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
            if phases is not None:
                phases.append((forward - start, backward - forward, time.perf_counter() - backward))
    del model, optimizer
    gc.collect()
    return times


def phases_main(args) -> int:
    """Forward, backward and AdamW timed apart (median over the timed steps), with the parameter counts."""
    ids = text_batch(args.batch, args.seq_len, split="train")
    for kind in args.kinds:
        for name, path in model_dirs(kind).items():
            phases: list[tuple[float, float, float]] = []
            step_times(path, ids, args.warmup, args.steps, phases, optimizer_name=args.optimizer)
            fwd, bwd, opt = (statistics.median(p[j] for p in phases) for j in range(3))
            print(f"{kind} {name}: forward {fwd:.2f} s, backward {bwd:.2f} s, AdamW {opt:.2f} s", flush=True)
    return 0


def run_kind(kind: str, ids: torch.Tensor, args) -> dict:
    dirs = model_dirs(kind)
    names = ["dense", "mixtral", "hf_moe"]
    times: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name] += step_times(
                dirs[name], ids, args.warmup, args.steps, optimizer_name=args.optimizer, faults=faults[name]
            )
        print(
            f"{kind} round {r + 1}: "
            + ", ".join(f"{n} {statistics.median(v):.2f}s" for n, v in times.items()),
            flush=True,
        )
    return {
        "kind": kind,
        **{n: statistics.median(v) for n, v in times.items()},
        **{f"{n}_faults": max(v) for n, v in faults.items()},
    }


def render(rows: list[dict]) -> str:
    header = [
        "upcycle",
        "dense s",
        "Mixtral s",
        "hf_moe s",
        "hf_moe / dense (time)",
        "Mixtral / hf_moe (speed-up)",
        "most page faults in a timed step (dense / Mixtral / hf_moe)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["kind"],
                    f"{r['dense']:.2f}",
                    f"{r['mixtral']:.2f}",
                    f"{r['hf_moe']:.2f}",
                    f"{r['hf_moe'] / r['dense']:.2f}x",
                    f"{r['mixtral'] / r['hf_moe']:.2f}x",
                    " / ".join(f"{r[n + '_faults']:,}" for n in ("dense", "mixtral", "hf_moe")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["kind"] == "equal-active":
            ratio = r["hf_moe"] / r["dense"]
            parts.append(
                f"equal-active {ratio:.2f}x the dense step (<= {DENSE_TARGET}x: "
                f"{'met' if ratio <= DENSE_TARGET else 'missed'})"
            )
        speedup = r["mixtral"] / r["hf_moe"]
        parts.append(
            f"{r['kind']} {speedup:.2f}x as fast as Mixtral (>= {MIXTRAL_TARGET}x: "
            f"{'met' if speedup >= MIXTRAL_TARGET else 'missed'})"
        )
    return "Targets: " + "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", choices=list(UPCYCLES), default=list(UPCYCLES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw_fused")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument(
        "--phases", action="store_true", help="instead of the table: forward, backward and AdamW timed apart"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.phases:
        return phases_main(args)
    ids = text_batch(args.batch, args.seq_len, split="train")
    load_before = load_line()
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = [run_kind(kind, ids, args) for kind in args.kinds]
    table = render(rows)
    command = command_line("train_step.py", argv)
    body = "\n".join(
        [
            "### Training step on the real SmolLM2-135M upcycles (fp32, CPU)",
            "",
            f"`{command}` on {started:%Y-%m-%d %H:%M} UTC; {machine_line(args.threads)}.",
            f"One step = forward + backward + AdamW (`{args.optimizer}`) on {args.batch}x{args.seq_len} tokens of "
            "Shakespeare; median of "
            f"{args.rounds} rounds x {args.steps} timed steps (after {args.warmup} warm-up steps per load), models in "
            "rotating order, one in memory at a time. Models as in the decode table (hf_moe with its default experts "
            "implementation, which trains through its hand-written backward with the grouped products "
            + ("of the compiled kernel" if small_groups_kernel() == "fused" else "of MKL (`F.grouped_mm`)")
            + f", `{SMALL_GROUPS_ENV}={small_groups_kernel()}`; Mixtral with transformers' default).",
            f"Machine load average before: {load_before}; after: {load_line()} (2 cores shared with other jobs).",
            "",
            table,
            "",
            verdict(rows),
        ]
    )
    print()
    print(table)
    print(verdict(rows))
    if not args.no_write:
        write_section(args.output, "train_step", body)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
