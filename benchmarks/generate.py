"""Decode speed of the real SmolLM2-135M upcycled to hf_moe, against the dense model and transformers' Mixtral.

Models (benchmarks/real_models.py, fp32): the dense SmolLM2-135M-Instruct; its `equal-active` upcycle (8 experts of
half width, top-2: the dense model's active parameters) and its `copy` upcycle (4 full copies, top-2); each upcycle
as an hf_moe checkpoint (default experts implementation, "hf_moe") and as transformers' `MixtralForCausalLM` holding
the same weights (`hf_moe.export(..., to="mixtral")`, transformers' default experts implementation).

Every case runs `generate` greedily on `batch` prompts of real Shakespeare text (`--prompt-len` tokens, no padding):
once with one new token (prefill) and once with `--new-tokens` new tokens (EOS ignored); decode tokens/s =
batch * (new_tokens - 1) / (time of the long call - time of the short one), so the prefill is not counted. Rounds
visit the models in rotating order; the median over rounds counts. The machine is shared: read the ratios.

With `--dtype bfloat16` every model loads in bfloat16 (the dtype transformers loads a bf16 checkpoint in) and the
table goes to its own section; the issue's targets are set for fp32 and are shown against the same bounds.

With `--compile`, hf_moe and dense also run `generate(cache_implementation="static")` with the decoding step under
`torch.compile(fullgraph=True)` (transformers' CompileConfig; compile time excluded: one warm-up call first).

Usage:
    python benchmarks/generate.py                       # both upcycles, batch 1 and 16; writes BENCHMARKS.md
    python benchmarks/generate.py --kinds equal-active --batch 1 --new-tokens 8 --rounds 1 --no-write
    python benchmarks/generate.py --dtype bfloat16      # the same in bfloat16, its own section
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

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

# Targets on hf_moe decode tokens/s (issue "Speed"): over dense (equal-active only) and over Mixtral (both kinds).
DENSE_TARGETS = {1: 0.9, 16: 0.85}
MIXTRAL_TARGET = 1.2
DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16"}


def timed_generate(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[float, torch.Tensor]:
    common = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    start = time.perf_counter()
    out = model.generate(ids, **common, **kwargs)
    return time.perf_counter() - start, out


def decode_rate(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[float, torch.Tensor]:
    """Decode tokens/s with the prefill subtracted, and the generated ids."""
    t_short, _ = timed_generate(model, ids, 1, **kwargs)
    t_long, out = timed_generate(model, ids, new_tokens, **kwargs)
    return ids.shape[0] * (new_tokens - 1) / max(t_long - t_short, 1e-9), out


def compiled(model):
    """`generate` compiles the decoding step itself when given a static cache and a compile config (prefill stays
    eager); `_compile_all_devices` lets it do so on the CPU."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True
    model.generation_config.compile_config = config
    return model


def run_kind(kind: str, args) -> list[dict]:
    dirs = model_dirs(kind)
    dtype = getattr(torch, args.dtype)
    models = {name: load(dirs[name], dtype) for name in ("dense", "mixtral", "hf_moe")}
    static = {}
    if args.compile:
        static = {
            "hf_moe compiled": compiled(load(dirs["hf_moe"], dtype)),
            "dense compiled": compiled(load(dirs["dense"], dtype)),
        }
    rows = []
    for batch in args.batch:
        ids = text_batch(batch, args.prompt_len)
        cases = {
            **{n: (m, {}) for n, m in models.items()},
            **{n: (m, {"cache_implementation": "static"}) for n, m in static.items()},
        }
        rates: dict[str, list[float]] = {name: [] for name in cases}
        outputs = {}
        with torch.no_grad():
            for model, kwargs in cases.values():  # warm-up (and compilation)
                if kwargs:  # a static cache is sized per call: compile for both lengths decode_rate uses
                    decode_rate(model, ids, args.new_tokens, **kwargs)
                else:
                    timed_generate(model, ids, 2, **kwargs)
            names = list(cases)
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    model, kwargs = cases[name]
                    rate, outputs[name] = decode_rate(model, ids, args.new_tokens, **kwargs)
                    rates[name].append(rate)
                print(
                    f"{kind} batch {batch} round {r + 1}: "
                    + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()),
                    flush=True,
                )
        row = {"kind": kind, "batch": batch, **{n: statistics.median(v) for n, v in rates.items()}}
        # Same weights, same greedy decoding: hf_moe and Mixtral should agree token for token.
        row["same_as_mixtral"] = float((outputs["hf_moe"] == outputs["mixtral"]).float().mean())
        rows.append(row)
    del models, static
    gc.collect()
    return rows


def profile_decode(kind: str, batch: int, prompt_len: int, steps: int = 4) -> str:
    """torch.profiler over `steps` decoding forwards (after a prefill) of dense, Mixtral and hf_moe: per op, calls and
    self CPU time per step per decoder layer; a markdown table of the ops that differ."""
    from transformers import DynamicCache

    dirs = model_dirs(kind)
    ids = text_batch(batch, prompt_len)
    stats = {}
    for name in ("dense", "mixtral", "hf_moe"):
        model = load(dirs[name])
        layers = model.config.get_text_config().num_hidden_layers
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            next_ids = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            model(next_ids, past_key_values=cache, use_cache=True)  # warm-up
            with torch.profiler.profile() as prof:
                for _ in range(steps):
                    next_ids = (
                        model(next_ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                    )
        per = steps * layers
        stats[name] = {e.key: (e.count / per, e.self_cpu_time_total / per) for e in prof.key_averages()}
        stats[name]["total"] = (
            sum(c for c, _ in stats[name].values()),
            sum(t for _, t in stats[name].values()),
        )
        del model
        gc.collect()
    keys = sorted(
        set().union(*stats.values()) - {"total"},
        key=lambda k: (
            -max(
                abs(stats["hf_moe"].get(k, (0, 0))[1] - stats["dense"].get(k, (0, 0))[1]),
                abs(stats["hf_moe"].get(k, (0, 0))[0] - stats["dense"].get(k, (0, 0))[0]),
            )
        ),
    )
    header = "| op | dense calls | dense us | Mixtral calls | Mixtral us | hf_moe calls | hf_moe us |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for key in ["total"] + keys[:20]:
        cells = [f"`{key}`" if key != "total" else "**all ops**"]
        for name in ("dense", "mixtral", "hf_moe"):
            calls, us = stats[name].get(key, (0.0, 0.0))
            cells += [f"{calls:.2f}", f"{us:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(rows: list[dict], compile_cols: bool) -> str:
    header = [
        "upcycle",
        "batch",
        "dense tok/s",
        "Mixtral tok/s",
        "hf_moe tok/s",
        "hf_moe / dense",
        "hf_moe / Mixtral",
    ]
    if compile_cols:
        header += ["dense compiled tok/s", "hf_moe compiled tok/s", "compile gain (hf_moe)"]
    header.append("tokens equal to Mixtral's")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["kind"],
            str(r["batch"]),
            f"{r['dense']:.1f}",
            f"{r['mixtral']:.1f}",
            f"{r['hf_moe']:.1f}",
            f"{r['hf_moe'] / r['dense']:.2f}x",
            f"{r['hf_moe'] / r['mixtral']:.2f}x",
        ]
        if compile_cols:
            cells += [
                f"{r['dense compiled']:.1f}",
                f"{r['hf_moe compiled']:.1f}",
                f"{r['hf_moe compiled'] / r['hf_moe']:.2f}x",
            ]
        cells.append(f"{100 * r['same_as_mixtral']:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["kind"] == "equal-active" and r["batch"] in DENSE_TARGETS:
            bound, ratio = DENSE_TARGETS[r["batch"]], r["hf_moe"] / r["dense"]
            parts.append(
                f"{r['kind']} batch {r['batch']} vs dense {ratio:.2f}x (>= {bound}x: "
                f"{'met' if ratio >= bound else 'missed'})"
            )
        ratio = r["hf_moe"] / r["mixtral"]
        parts.append(
            f"{r['kind']} batch {r['batch']} vs Mixtral {ratio:.2f}x (>= {MIXTRAL_TARGET}x: "
            f"{'met' if ratio >= MIXTRAL_TARGET else 'missed'})"
        )
    return "Targets: " + "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", choices=list(UPCYCLES), default=list(UPCYCLES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile + static cache")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: profile decoding steps (calls and self time per token per layer)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.profile:
        return profile_main(args, argv)
    load_before = load_line()
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = [row for kind in args.kinds for row in run_kind(kind, args)]
    table = render(rows, args.compile)
    command = command_line("generate.py", argv)
    body = "\n".join(
        [
            f"### Decode speed on the real SmolLM2-135M upcycles ({DTYPE_LABELS[args.dtype]}, CPU)",
            "",
            f"`{command}` on {started:%Y-%m-%d %H:%M} UTC; {machine_line(args.threads)}.",
            f"Greedy `generate` on real text: {args.prompt_len}-token prompts, {args.new_tokens} new tokens; decode "
            "tokens/s = batch x (new tokens - 1) / (time of that call - time of a 1-new-token call), the prefill "
            f"excluded; median of {args.rounds} rounds in rotating order. `equal-active`: 8 experts of half width, "
            "top-2 (the dense model's active parameters); `copy`: 4 full copies, top-2 (twice the dense MLP per "
            "token). Mixtral = transformers' `MixtralForCausalLM` on the same weights (`hf-moe export --to mixtral`), "
            'its default experts implementation; hf_moe with its default ("hf_moe").',
            f"Machine load average before: {load_before}; after: {load_line()} (2 cores shared with other jobs: "
            "absolute figures are noisy, ratios within one run less so).",
            "",
            table,
            "",
            verdict(rows) + ("" if args.dtype == "float32" else " (the targets are set for fp32)"),
        ]
    )
    print()
    print(table)
    print(verdict(rows))
    if not args.no_write:
        section = "generate" if args.dtype == "float32" else f"generate_{DTYPE_LABELS[args.dtype]}"
        write_section(args.output, section, body, script="generate")
        print(f"wrote {args.output}")
    return 0


def profile_main(args, argv: list[str] | None) -> int:
    load_before = load_line()
    started = datetime.datetime.now(datetime.timezone.utc)
    command = command_line("generate.py", argv)
    parts = [
        "### Where decode time goes: op profile per decoding step per decoder layer (fp32, CPU)",
        "",
        f"`{command}` on {started:%Y-%m-%d %H:%M} UTC; {machine_line(args.threads)}; load average before "
        f"{load_before}.",
        "torch.profiler over 4 decoding forwards (one new token per sequence) after a prefill; calls and mean self "
        "CPU microseconds per step per decoder layer (profiler overhead included), sorted by the difference between "
        "hf_moe and dense. On a loaded machine the means carry stalls (a 2-thread op waits for a preempted thread): "
        "read the call counts, and the times only as a rough split.",
    ]
    for kind in args.kinds:
        for batch in args.batch:
            parts += [
                "",
                f"`{kind}` upcycle, batch {batch}:",
                "",
                profile_decode(kind, batch, args.prompt_len),
            ]
    parts.append(f"\nLoad average after: {load_line()}.")
    body = "\n".join(parts)
    print(body)
    if not args.no_write:
        write_section(args.output, "generate_profile", body, script="generate")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
