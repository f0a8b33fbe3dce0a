"""LoRA on the routed experts: forward+backward time of the fast grouped path vs PEFT's `target_parameters` path vs
full fine-tuning of the same hf_moe model, measured in one run (interleaved rounds, median per mode).

    python benchmarks/lora_experts.py                 # print the table
    python benchmarks/lora_experts.py --write         # also write it into BENCHMARKS.md after its anchor

Default model: hidden 512, moe_intermediate 1024, 8 experts top-2, 4 layers, vocab 4096; batch 4 x 256 tokens;
LoRA r=16 on the experts only (gate_up_proj and down_proj).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from peft import get_peft_model

from hf_moe import HfMoeConfig, HfMoeForCausalLM
from hf_moe.peft import lora_config

ANCHOR = "<!-- lora_experts: written by benchmarks/lora_experts.py -->"
END = "<!-- /lora_experts -->"


def build_model(args: argparse.Namespace) -> HfMoeForCausalLM:
    torch.manual_seed(0)
    config = HfMoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.inter,
        moe_intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=2 * args.seq,
    )
    return HfMoeForCausalLM(config).train()


def make_mode(mode: str, args: argparse.Namespace) -> torch.nn.Module:
    model = build_model(args)
    if mode == "full":
        return model
    impl = "fast" if mode == "lora_fast" else "target_parameters"
    return get_peft_model(
        model, lora_config(model, targets=["experts"], r=args.r, alpha=2 * args.r, experts_impl=impl)
    )


def step(model: torch.nn.Module, batch: torch.Tensor) -> tuple[float, float]:
    """One forward+backward; returns (process CPU seconds, wall seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    model.zero_grad(set_to_none=True)
    return cpu, wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: process CPU time then measures the work, unaffected by other processes)",
    )
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    modes = ["full", "lora_fast", "lora_target_parameters"]
    models = {mode: make_mode(mode, args) for mode in modes}
    trainable = {
        mode: sum(p.numel() for p in m.parameters() if p.requires_grad) for mode, m in models.items()
    }
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(3, args.vocab, (args.batch, args.seq), generator=generator)
    cpu_times: dict[str, list[float]] = {mode: [] for mode in modes}
    wall_times: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_idx in range(args.warmup + args.rounds):
        for mode in modes:  # interleaved, so machine noise hits every mode alike
            cpu, wall = step(models[mode], batch)
            if round_idx >= args.warmup:
                cpu_times[mode].append(cpu)
                wall_times[mode].append(wall)
    # The ratio uses process CPU time: on a shared machine wall time mostly measures the other processes.
    median = {mode: statistics.median(ts) for mode, ts in cpu_times.items()}
    best = {mode: min(ts) for mode, ts in cpu_times.items()}
    wall = {mode: statistics.median(ts) for mode, ts in wall_times.items()}

    command = "python benchmarks/lora_experts.py" + (" --write" if args.write else "")
    lines = [
        "### LoRA on the routed experts: fast path vs PEFT `target_parameters` vs full fine-tuning",
        "",
        f"LoRA r={args.r} on the routed experts, forward+backward of one batch ({args.batch}x{args.seq} tokens), "
        f"hf_moe model hidden {args.hidden}, moe_intermediate {args.inter}, {args.experts} experts top-{args.top_k}, "
        f"{args.layers} layers, vocab {args.vocab}, float32; median of {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-up. torch {torch.__version__}, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} thread(s); times are process CPU seconds (the machine is shared, so wall time "
        f"is shown but not compared). Command: `{command}`.",
        "",
        "| mode | trainable params | fwd+bwd CPU s (median) | vs full fine-tuning | CPU s (min) | vs full (min) "
        "| wall s (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "full": "full fine-tuning",
        "lora_fast": 'LoRA, fast grouped path (`experts_impl="fast"`)',
        "lora_target_parameters": "LoRA, PEFT `target_parameters`",
    }
    for mode in modes:
        lines.append(
            f"| {names[mode]} | {trainable[mode]:,} | {median[mode]:.3f} | {median[mode] / median['full']:.2f}x "
            f"| {best[mode]:.3f} | {best[mode] / best['full']:.2f}x | {wall[mode]:.3f} |"
        )
    lines.append("")
    lines.append(
        f"Fast path vs PEFT `target_parameters`: {median['lora_target_parameters'] / median['lora_fast']:.2f}x faster "
        f"(median), {best['lora_target_parameters'] / best['lora_fast']:.2f}x (min)."
    )
    table = "\n".join(lines)
    print(table)
    if args.write:
        path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
        text = path.read_text()
        if ANCHOR not in text:
            raise SystemExit(f"{path} has no anchor {ANCHOR!r}")
        head, _, tail = text.partition(ANCHOR)
        if END in tail:
            tail = tail.partition(END)[2]
        path.write_text(f"{head}{ANCHOR}\n{table}\n{END}{tail}")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
