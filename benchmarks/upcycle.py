"""Benchmark: upcycle SmolLM2-135M into an 8-expert hf_moe checkpoint.

Measures, in one run so machine noise hits both sides alike:
- wall time of `upcycle()` called in this process (interpreter start and imports excluded, as the target says) vs
  `cp -r` of its output folder (the same bytes), each started from the same memory state: right after a ballast
  file of the output's size was written and deleted, so both write into page-cache pages the machine backs (see
  `warm_page_cache`);
- wall time of `hf-moe upcycle` as a subprocess (interpreter start and imports included) and of `cp -r`, without
  that preparation;
- peak RSS of the upcycle subprocess (GNU time) vs the largest input shard, and vs the RSS of a process that only
  imports hf_moe's upcycler (the interpreter + torch + transformers floor).

Inputs: the single-file float32 SmolLM2 folder from ``examples/offline_assets.py`` and, with ``--sharded``, the same
weights re-saved in shards of ``--shard-size``. The page cache is flushed (``sync``) before every timed command, not
after (neither side waits for the disk; "until synced" adds a `sync` after the command).

    python benchmarks/upcycle.py --repeats 3 --sharded --write
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


def warm_page_cache(nbytes: int, where: Path) -> None:
    """Write and delete a ballast file of `nbytes`, so that the next writer gets page-cache pages the machine backs.

    On a VM that hands freed guest memory back to the hypervisor (virtio-balloon free page reporting, as on the
    machine of BENCHMARKS.md), memory freed a few seconds earlier costs a hypervisor fault per page when it is
    reused: writing 2.5 GB then took 17-21 s of system time instead of 1 s. A command started right after an
    `rm` of an equally large folder reuses pages that are still backed and runs fast; one started after a 5 s
    import does not. Preparing both sides alike removes that bias from the ratio.
    """
    chunk = bytes(16 << 20)
    ballast = where / ".ballast"
    with open(ballast, "wb") as f:
        for _ in range(max(1, nbytes // len(chunk))):
            f.write(chunk)
    ballast.unlink()


def timed_in_process(fn, out: Path, nbytes: int) -> tuple[float, float]:
    """(wall seconds, wall seconds until synced) of `fn()`, after `sync` and a page-cache warm-up."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    warm_page_cache(nbytes, out.parent)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    subprocess.run(["sync"], check=True)
    return wall, time.perf_counter() - start


def bench(src: Path, work: Path, *, num_experts: int, top_k: int, repeats: int) -> dict:
    from hf_moe.conversion.io import CheckpointReader
    from hf_moe.conversion.upcycle import upcycle

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

    def run_upcycle() -> None:
        upcycle(src, out, num_experts=num_experts, top_k=top_k, progress=False)

    def run_cp() -> None:
        subprocess.run(["cp", "-r", str(out), str(copy)], check=True)

    run_upcycle()  # the output's size, for the warm-up
    out_bytes = folder_bytes(out)
    up_walls, cp_walls, rss, floor_walls, up_cpu, floor_cpu = ([] for _ in range(6))
    fn_walls, fn_sync, cpw_walls, cpw_sync = ([] for _ in range(4))
    for _ in range(repeats):  # interleaved, so load changes on the shared machine hit both sides
        # Imports excluded, both sides from the same memory state: the comparison the target names.
        wall, durable = timed_in_process(run_upcycle, out, out_bytes)
        fn_walls.append(wall)
        fn_sync.append(durable)
        wall, durable = timed_in_process(run_cp, copy, out_bytes)
        cpw_walls.append(wall)
        cpw_sync.append(durable)
        # Whole commands as a user runs them (the upcycle subprocess also gives the peak RSS).
        wall, floor, cpu, _ = run_measured(floor_cmd)
        floor_walls.append(wall)
        floor_cpu.append(cpu)
        shutil.rmtree(out, ignore_errors=True)
        wall, peak, cpu, _ = run_measured(upcycle_cmd)
        up_walls.append(wall)
        up_cpu.append(cpu)
        rss.append(peak)
        shutil.rmtree(copy, ignore_errors=True)
        wall, _, _, _ = run_measured(["cp", "-r", str(out), str(copy)])
        cp_walls.append(wall)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(copy, ignore_errors=True)
    med = statistics.median
    peak = max(rss)
    return {
        "input_shards": n_shards,
        "largest_input_shard_MB": largest / 1e6,
        "output_MB": out_bytes / 1e6,
        "upcycle_fn_s": [round(w, 2) for w in fn_walls],
        "cp_warm_s": [round(w, 2) for w in cpw_walls],
        "time_ratio_excluding_import": med(fn_walls) / med(cpw_walls),
        "upcycle_fn_until_synced_s": [round(w, 2) for w in fn_sync],
        "cp_warm_until_synced_s": [round(w, 2) for w in cpw_sync],
        "time_ratio_until_synced": med(fn_sync) / med(cpw_sync),
        "upcycle_cli_s": [round(w, 2) for w in up_walls],
        "cp_s": [round(w, 2) for w in cp_walls],
        "time_ratio_cli": med(up_walls) / med(cp_walls),
        "import_only_s": [round(w, 2) for w in floor_walls],
        "upcycle_cpu_s": [round(c, 2) for c in up_cpu],
        "import_only_cpu_s": [round(c, 2) for c in floor_cpu],
        "peak_rss_MB": peak / 1e6,
        "import_floor_rss_MB": floor / 1e6,
        "rss_ratio_vs_largest_shard": peak / largest,
        "rss_above_floor_ratio_vs_largest_shard": (peak - floor) / largest,
    }


def render(results: dict, args: argparse.Namespace) -> str:
    import datetime
    import platform

    import torch
    import transformers

    med = statistics.median
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    lines = [
        "### Upcycling SmolLM2-135M to 8 experts: wall time vs `cp`, peak memory vs the largest input shard",
        "",
        f"`python benchmarks/upcycle.py --repeats {args.repeats} --sharded --write` on {stamp}; torch "
        f"{torch.__version__}, transformers {transformers.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"1-minute load average {load:.1f} at the end. SmolLM2-135M-Instruct (float32) -> {args.num_experts} experts "
        f"top-{args.top_k}; {args.repeats} interleaved rounds, medians. **Excluding imports**: `upcycle()` called "
        "in the benchmark's process vs `cp -r` of its output folder, each after `sync` and a page-cache warm-up "
        "(a ballast file of the output's size written and deleted: see the note below the table); \"until "
        'synced" adds a `sync` after the command (the upcycle also fsyncs its files before the atomic rename, cp '
        "does not). **CLI**: `hf-moe upcycle` as a subprocess (interpreter and imports included) vs `cp -r`, "
        "after `sync` only; peak RSS from GNU time.",
        "",
        "| input | output | upcycle() s | cp s | ratio excl. import | until synced s (ratio) | CLI upcycle s | "
        "CLI cp s | CLI ratio | import-only s | peak RSS | import floor | largest input shard | "
        "(RSS - floor) / shard |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['output_MB'] / 1e3:.2f} GB | {med(r['upcycle_fn_s']):.2f} | {med(r['cp_warm_s']):.2f} | "
            f"{r['time_ratio_excluding_import']:.2f}x | {med(r['upcycle_fn_until_synced_s']):.2f} / "
            f"{med(r['cp_warm_until_synced_s']):.2f} ({r['time_ratio_until_synced']:.2f}x) | "
            f"{med(r['upcycle_cli_s']):.1f} | {med(r['cp_s']):.1f} | {r['time_ratio_cli']:.2f}x | "
            f"{med(r['import_only_s']):.1f} | {r['peak_rss_MB']:.0f} MB | {r['import_floor_rss_MB']:.0f} MB | "
            f"{r['largest_input_shard_MB']:.0f} MB | {r['rss_above_floor_ratio_vs_largest_shard']:.2f}x |"
        )
    lines.append("")
    for name, r in results.items():
        wall_ok = "met" if r["time_ratio_excluding_import"] <= 3 else "missed"
        rss_ok = "met" if r["rss_above_floor_ratio_vs_largest_shard"] <= 1.5 else "missed"
        lines.append(
            f"Targets, {name}: wall <= 3x cp excluding imports {wall_ok} ({r['time_ratio_excluding_import']:.2f}x); "
            f"peak RSS <= the import floor + 1.5x the largest input shard {rss_ok} "
            f"({r['rss_above_floor_ratio_vs_largest_shard']:.2f}x above the floor)."
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
