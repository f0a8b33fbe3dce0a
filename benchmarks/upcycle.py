"""Benchmark: upcycle SmolLM2-135M into an 8-expert hf_moe checkpoint.

Measures, in one run so machine noise hits both sides alike:
- wall time of `hf-moe upcycle` (a subprocess) vs `cp -r` of its output folder (the same number of bytes);
- peak RSS of the upcycle process (``os.wait4`` rusage, ru_maxrss) vs the largest input shard, and vs the RSS of a
  process that only imports hf_moe's upcycler (the interpreter + torch + transformers floor).

Inputs: the single-file float32 SmolLM2 folder from ``hf_moe.assets`` and, with ``--sharded``, the same weights
re-saved in shards of ``--shard-size``. The page cache is flushed (``sync``) before every timed command, not after
(neither side waits for the disk).

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


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a child process.

    The peak comes from GNU time run as the child: a process forked straight from this (large) Python process
    would report the parent's RSS at fork time as its ru_maxrss, inflating small peaks.
    """
    subprocess.run(["sync"], check=True)
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        start = time.perf_counter()
        subprocess.run([TIME, "-f", "%M", "-o", rss_file.name, *cmd], stdout=subprocess.DEVNULL, check=True)
        wall = time.perf_counter() - start
        peak_kib = int(rss_file.read().strip().splitlines()[-1])
    return wall, peak_kib * 1024


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
    upcycle_cmd = [sys.executable, "-m", "hf_moe.cli", "upcycle", str(src), str(out), "--num-experts",
                   str(num_experts), "--top-k", str(top_k), "--no-progress"]
    floor_cmd = [sys.executable, "-c", "import hf_moe.conversion.upcycle"]
    up_walls, cp_walls, rss, floor_walls = [], [], [], []
    for _ in range(repeats):
        wall, floor = run_measured(floor_cmd)
        floor_walls.append(wall)
        shutil.rmtree(out, ignore_errors=True)
        wall, peak = run_measured(upcycle_cmd)
        up_walls.append(wall)
        rss.append(peak)
        shutil.rmtree(copy, ignore_errors=True)
        wall, _ = run_measured(["cp", "-r", str(out), str(copy)])
        cp_walls.append(wall)
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
        "peak_rss_MB": peak / 1e6,
        "import_floor_rss_MB": floor / 1e6,
        "rss_ratio_vs_largest_shard": peak / largest,
        "rss_above_floor_ratio_vs_largest_shard": (peak - floor) / largest,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=None, help="dense folder (default: SmolLM2-135M from assets)")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sharded", action="store_true", help="also measure with the input re-saved in shards")
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.src is None:
        from hf_moe.assets import smollm2_dense_dir

        args.src = smollm2_dense_dir()
    work = Path(tempfile.mkdtemp(prefix="hf_moe_bench_", dir=args.workdir))
    try:
        results = {"single-file input": bench(args.src, work, num_experts=args.num_experts, top_k=args.top_k,
                                              repeats=args.repeats)}
        if args.sharded:
            sharded = reshard(args.src, work / "sharded_src", args.shard_size)
            results[f"input in {args.shard_size} shards"] = bench(
                sharded, work, num_experts=args.num_experts, top_k=args.top_k, repeats=args.repeats
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2), flush=True)
    print("\n| input | output | upcycle s (median) | cp s (median) | time ratio (median / best) | peak RSS | largest shard |"
          " RSS ratio | RSS above import floor / shard |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['output_MB'] / 1e3:.2f} GB | {statistics.median(r['upcycle_s']):.1f} | "
              f"{statistics.median(r['cp_s']):.1f} | {r['time_ratio_median']:.2f}x / {r['time_ratio_best']:.2f}x | {r['peak_rss_MB']:.0f} MB | "
              f"{r['largest_input_shard_MB']:.0f} MB | {r['rss_ratio_vs_largest_shard']:.2f}x | "
              f"{r['rss_above_floor_ratio_vs_largest_shard']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
