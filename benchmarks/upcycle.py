"""Benchmark: upcycle SmolLM2-135M into an 8-expert hf_moe checkpoint.

Measures, in one run so machine noise hits both sides alike:
- wall time of `hf-moe upcycle` (a subprocess) vs `cp -r` of its output folder (the same number of bytes);
- peak RSS of the upcycle process (``os.wait4`` rusage, ru_maxrss) vs the largest input shard, and vs the RSS of a
  process that only imports hf_moe's upcycler (the interpreter + torch + transformers floor).

Inputs: the single-file float32 SmolLM2 folder from ``examples/offline_assets.py`` and, with ``--sharded``, the same
weights re-saved in shards of ``--shard-size``. The page cache is flushed (``sync``) before every timed command, not
after (neither side waits for the disk).

    python benchmarks/upcycle.py --repeats 3 --sharded
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME = shutil.which("time") or "/usr/bin/time"


def run_measured(cmd: list[str]) -> tuple[float, int, float, float]:
    """(wall seconds, peak RSS bytes, user+system CPU seconds, wall seconds until the output is on disk, i.e.
    including a `sync` after the command) of a child process.

    The peak comes from GNU time run as the child: a process forked straight from this (large) Python process
    would report the parent's RSS at fork time as its ru_maxrss, inflating small peaks.
    """
    subprocess.run(["sync"], check=True)
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        start = time.perf_counter()
        subprocess.run(
            [TIME, "-f", "%M %U %S", "-o", rss_file.name, *cmd], stdout=subprocess.DEVNULL, check=True
        )
        wall = time.perf_counter() - start
        subprocess.run(["sync"], check=True)
        durable = time.perf_counter() - start
        peak_kib, user, system = rss_file.read().strip().splitlines()[-1].split()
    return wall, int(peak_kib) * 1024, float(user) + float(system), durable


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def reshard(src: Path, dst: Path, shard_size: str) -> Path:
    from hf_moe.conversion.io import CheckpointReader, ShardWriter, copy_tokenizer_files

    dst.mkdir(parents=True)
    with CheckpointReader(src) as reader, ShardWriter(dst, max_shard_size=shard_size) as writer:
        for name in reader.keys():
            writer.add(name, reader.get_tensor(name))
    shutil.copyfile(src / "config.json", dst / "config.json")
    copy_tokenizer_files(src, dst)
    return dst


def bench(src: Path, work: Path, *, num_experts: int, top_k: int, repeats: int) -> dict:
    from hf_moe.conversion.io import CheckpointReader

    with CheckpointReader(src) as reader:
        largest = reader.largest_file_bytes()
        n_shards = len(reader.files)
    out, copy = work / "moe", work / "moe_cp"
    upcycle_cmd = [
        sys.executable,
        "-m",
        "hf_moe.cli",
        "upcycle",
        str(src),
        str(out),
        "--num-experts",
        str(num_experts),
        "--top-k",
        str(top_k),
        "--no-progress",
    ]
    floor_cmd = [sys.executable, "-c", "import hf_moe.conversion.upcycle"]
    up_walls, cp_walls, rss, floor_walls, up_cpu, cp_cpu, floor_cpu, up_sync, cp_sync = ([] for _ in range(9))
    for _ in range(repeats):  # interleaved, so load changes on the shared machine hit both sides
        wall, floor, cpu, _ = run_measured(floor_cmd)
        floor_walls.append(wall)
        floor_cpu.append(cpu)
        shutil.rmtree(out, ignore_errors=True)
        wall, peak, cpu, durable = run_measured(upcycle_cmd)
        up_walls.append(wall)
        up_cpu.append(cpu)
        up_sync.append(durable)
        rss.append(peak)
        shutil.rmtree(copy, ignore_errors=True)
        wall, _, cpu, durable = run_measured(["cp", "-r", str(out), str(copy)])
        cp_walls.append(wall)
        cp_cpu.append(cpu)
        cp_sync.append(durable)
    out_bytes = folder_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(copy, ignore_errors=True)
    up, cp = statistics.median(up_walls), statistics.median(cp_walls)
    peak = max(rss)
    return {
        "input_shards": n_shards,
        "largest_input_shard_MB": largest / 1e6,
        "output_MB": out_bytes / 1e6,
        "upcycle_s": [round(w, 2) for w in up_walls],
        "cp_s": [round(w, 2) for w in cp_walls],
        "time_ratio_median": up / cp,
        "time_ratio_best": min(up_walls) / min(cp_walls),
        "import_only_s": [round(w, 2) for w in floor_walls],
        "time_ratio_median_excluding_import": (up - statistics.median(floor_walls)) / cp,
        "upcycle_until_synced_s": [round(w, 2) for w in up_sync],
        "cp_until_synced_s": [round(w, 2) for w in cp_sync],
        "time_ratio_until_synced_median": statistics.median(up_sync) / statistics.median(cp_sync),
        "upcycle_cpu_s": [round(c, 2) for c in up_cpu],
        "cp_cpu_s": [round(c, 2) for c in cp_cpu],
        "import_only_cpu_s": [round(c, 2) for c in floor_cpu],
        "peak_rss_MB": peak / 1e6,
        "import_floor_rss_MB": floor / 1e6,
        "rss_ratio_vs_largest_shard": peak / largest,
        "rss_above_floor_ratio_vs_largest_shard": (peak - floor) / largest,
    }


def render(results: dict, args: argparse.Namespace) -> str:
    import platform

    import torch

    med = statistics.median
    lines = [
        "### Upcycling SmolLM2-135M to 8 experts: wall time vs `cp`, peak memory vs the largest input shard",
        "",
        f"SmolLM2-135M-Instruct (float32) -> {args.num_experts} experts top-{args.top_k} with `hf-moe upcycle` (a "
        f"subprocess: interpreter start and imports included) vs `cp -r` of its output folder; {args.repeats} "
        f"interleaved rounds, `sync` before each command; median (and best) wall time, and wall time until the "
        f"written data is on disk (command + `sync`); peak RSS from GNU time. "
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (wall "
        f"times are noisy). Command: `python benchmarks/upcycle.py --repeats {args.repeats} --sharded --write`.",
        "",
        "| input | output | upcycle wall s | cp wall s | wall ratio (median / best) | ratio excl. import | "
        "until synced: upcycle / cp s (ratio) | upcycle CPU s | import-only wall s | peak RSS | largest input shard | "
        "RSS / shard | (RSS - import floor) / shard |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['output_MB'] / 1e3:.2f} GB | {med(r['upcycle_s']):.1f} | {med(r['cp_s']):.1f} | "
            f"{r['time_ratio_median']:.2f}x / {r['time_ratio_best']:.2f}x | "
            f"{r['time_ratio_median_excluding_import']:.2f}x | {med(r['upcycle_until_synced_s']):.1f} / "
            f"{med(r['cp_until_synced_s']):.1f} ({r['time_ratio_until_synced_median']:.2f}x) | "
            f"{med(r['upcycle_cpu_s']):.1f} | "
            f"{med(r['import_only_s']):.1f} | {r['peak_rss_MB']:.0f} MB | {r['largest_input_shard_MB']:.0f} MB | "
            f"{r['rss_ratio_vs_largest_shard']:.2f}x | {r['rss_above_floor_ratio_vs_largest_shard']:.2f}x |"
        )
    lines.append("")
    for name, r in results.items():
        wall_ok = "met" if r["time_ratio_median"] <= 2 else "not met"
        rss_ok = "met" if r["rss_ratio_vs_largest_shard"] <= 1.5 else "not met"
        lines.append(
            f"Targets, {name}: wall <= 2x cp {wall_ok} ({r['time_ratio_median']:.2f}x; "
            f"{r['time_ratio_median_excluding_import']:.2f}x without the interpreter + torch + transformers import); "
            f"peak RSS <= 1.5x the largest input shard {rss_ok} ({r['rss_ratio_vs_largest_shard']:.2f}x; the import "
            f"floor alone is {r['import_floor_rss_MB']:.0f} MB = "
            f"{r['import_floor_rss_MB'] / r['largest_input_shard_MB']:.2f}x)."
        )
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    start, end = "<!-- upcycle: written by benchmarks/upcycle.py -->", "<!-- /upcycle -->"
    text = path.read_text()
    if start not in text:
        raise ValueError(f"{path} lacks the anchor {start!r}")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1] if end in rest else rest
    path.write_text(f"{head}{start}\n{section}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src", type=Path, default=None, help="dense folder (default: SmolLM2-135M from assets)"
    )
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sharded", action="store_true", help="also measure with the input re-saved in shards"
    )
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.src is None:
        sys.path.insert(
            0, str(Path(__file__).resolve().parents[1] / "examples")
        )  # examples/offline_assets.py
        from offline_assets import smollm2_dense_dir

        args.src = smollm2_dense_dir()
    work = Path(tempfile.mkdtemp(prefix="hf_moe_bench_", dir=args.workdir))
    try:
        results = {
            "single-file input": bench(
                args.src, work, num_experts=args.num_experts, top_k=args.top_k, repeats=args.repeats
            )
        }
        if args.sharded:
            sharded = reshard(args.src, work / "sharded_src", args.shard_size)
            results[f"input in {args.shard_size} shards"] = bench(
                sharded, work, num_experts=args.num_experts, top_k=args.top_k, repeats=args.repeats
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2), flush=True)
    section = render(results, args)
    print(section)
    if args.write:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
