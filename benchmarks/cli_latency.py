"""Wall time of `hf-moe --help` and of a usage error against a bare `python -c pass`, side by side.

`hf-moe` loads the library (torch, transformers) only once its arguments are parsed, so `--help`, `<command>
--help` and argument errors should cost about what starting Python costs. Each case is a fresh process; the cases
are interleaved round by round (the machine is shared, so absolute times drift and the ratios within one run are
the figures that mean something). `python -c "import hf_moe"` is what every call cost before the lazy import, and
what a command still pays once it runs.

The table goes to stdout and, unless `--no-write`, into BENCHMARKS.md between this benchmark's begin/end markers
(a rerun replaces its own section).

Usage:
    python benchmarks/cli_latency.py                 # 7 rounds; writes BENCHMARKS.md
    python benchmarks/cli_latency.py --rounds 3 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ANCHOR = "<!-- cli_latency: written by benchmarks/cli_latency.py -->"
BEGIN, END = "<!-- cli_latency:begin -->", "<!-- cli_latency:end -->"
TARGET_RATIO = 5.0  # `hf-moe --help` within 5x a bare interpreter start counts as instant


def cases(hf_moe: str) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "python -c pass": [py, "-c", "pass"],
        "hf-moe --help": [hf_moe, "--help"],
        "hf-moe serve --help": [hf_moe, "serve", "--help"],
        "hf-moe export (usage error)": [hf_moe, "export"],
        'python -c "import hf_moe"': [py, "-c", "import hf_moe"],
    }


def time_once(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 2):  # 2: the usage error is the point of that case
        raise RuntimeError(f"{command} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return elapsed


def measure(rounds: int, hf_moe: str) -> dict[str, list[float]]:
    commands = cases(hf_moe)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for command in commands.values():  # warm the page cache once, untimed
        time_once(command)
    for _ in range(rounds):
        for name, command in commands.items():
            times[name].append(time_once(command))
    return times


def render(times: dict[str, list[float]], rounds: int) -> str:
    base = statistics.median(times["python -c pass"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "### `hf-moe --help` latency (lazy library import)",
        "",
        f"`python benchmarks/cli_latency.py --rounds {rounds}` on {now}; Python {platform.python_version()}, "
        f"{platform.machine()} CPU ({os.cpu_count()} cores, shared with other jobs, load average {load:.1f}). "
        "Median wall time of a fresh process per case, cases interleaved round by round.",
        "",
        "| case | median (s) | min (s) | vs `python -c pass` |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| `{name}` | {median:.3f} | {min(values):.3f} | {median / base:.1f}x |")
    help_ratio = statistics.median(times["hf-moe --help"]) / base
    import_ratio = statistics.median(times['python -c "import hf_moe"']) / statistics.median(
        times["hf-moe --help"]
    )
    verdict = "met" if help_ratio <= TARGET_RATIO else "missed"
    lines += [
        "",
        f"Target `hf-moe --help` <= {TARGET_RATIO:.0f}x `python -c pass`: {verdict} ({help_ratio:.1f}x). Before the "
        f"lazy import every call paid at least `import hf_moe`, {import_ratio:.0f}x today's `--help`.",
    ]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    text = path.read_text(encoding="utf-8")
    section = f"{BEGIN}\n{body.strip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    elif ANCHOR in text:
        text = text.replace(ANCHOR, f"{ANCHOR}\n{section}", 1)
    else:
        text = text.rstrip("\n") + f"\n\n{ANCHOR}\n{section}\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per case (default 7)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    hf_moe = shutil.which("hf-moe", path=str(Path(sys.executable).parent))
    if hf_moe is None:
        raise SystemExit(f"no hf-moe next to {sys.executable}: pip install -e . in this environment")
    body = render(measure(args.rounds, hf_moe), args.rounds)
    print(body)
    if not args.no_write:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
