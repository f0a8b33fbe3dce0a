"""vLLM's OpenAI server on an hf_moe checkpoint through the plugin: one smoke test of the command `hf-moe serve
--plugin` builds (/v1/completions returns transformers' greedy completion), and one of `hf-moe serve` itself: killed
with SIGTERM, it leaves the port free and no vLLM process behind. Loopback only, free ports, bounded waits, and
whatever is left is killed in `finally`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; run scripts/run_vllm_tests.sh (the .venv-vllm venv)"
)

from transformers import AutoTokenizer  # noqa: E402

from hf_moe.serving.serve import plan_serve  # noqa: E402
from tests.helpers.native import tiny_target_model  # noqa: E402
from tests.helpers.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

from .vllm_helpers import KV_CACHE_BYTES, MAX_TOKENS, PROMPTS, hf_greedy  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

READY_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _wait_ready(server: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        assert server.poll() is None, "server exited:\n" + log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, "server not ready:\n" + log.read_text()[-4000:]
        time.sleep(1.0)


def test_openai_server_serves_hf_moe_through_plugin(tmp_path):
    # switch routing (top-1, dropless) fits no native architecture: this is what the plugin is for.
    model = tiny_target_model("mixtral", router_type="switch", num_experts_per_tok=1)
    model.save_pretrained(tmp_path / "model")
    build_tiny_tokenizer(tmp_path / "model", vocab_size=model.config.vocab_size)
    want = hf_greedy(model, prompts=PROMPTS[:1])[0]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")

    port = _free_port()
    plan = plan_serve(
        tmp_path / "model",
        route="plugin",
        port=port,
        kv_cache_bytes=KV_CACHE_BYTES,
        extra_args=["--enforce-eager", "--max-model-len", "128"],
    )
    assert plan.route == "plugin"
    assert (
        plan.command[plan.command.index("--dtype") + 1] == "float32"
    )  # the checkpoint's, as transformers loads it
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        plan.command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **plan.env},
    )
    try:
        _wait_ready(server, port, tmp_path / "server.log")
        reply = _post(
            f"{plan.url}/completions",
            {
                "model": "model",
                "prompt": PROMPTS[0],
                "max_tokens": MAX_TOKENS,
                "temperature": 0.0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
        )
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        except ProcessLookupError:
            pass
        log.close()
    choice = reply["choices"][0]
    assert choice["token_ids"] == want.tokens  # asked for with return_token_ids
    assert choice["text"] == tokenizer.decode(want.tokens, skip_special_tokens=True)


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` now (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _port_free(port: int, wait_s: float = 10.0) -> bool:
    """Whether a new server can listen on `port` (bind + listen with SO_REUSEADDR, as uvicorn does: connections of
    the old server left in TIME_WAIT do not count, a socket still listening does), polling up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                s.listen(1)
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(0.5)


def test_sigterm_to_hf_moe_serve_frees_the_port_and_leaves_no_process(tmp_path):
    model = tiny_target_model("mixtral", router_type="switch", num_experts_per_tok=1)
    model.save_pretrained(tmp_path / "model")
    build_tiny_tokenizer(tmp_path / "model", vocab_size=model.config.vocab_size)
    hf_moe = shutil.which("hf-moe", path=str(Path(sys.executable).parent))
    assert hf_moe is not None, "hf-moe is not installed in the vLLM venv (scripts/vllm_env.sh installs it)"

    port = _free_port()
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")
    serve = subprocess.Popen(
        [
            hf_moe,
            "serve",
            str(tmp_path / "model"),
            "--plugin",
            "--port",
            str(port),
            "--kv-cache-bytes",
            str(KV_CACHE_BYTES),
            "--vllm-args",
            "--enforce-eager --max-model-len 128",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server: set[int] = set()
    try:
        _wait_ready(serve, port, log_path)
        server = _descendants(serve.pid)  # vLLM's API process, its engine core, ...
        assert server, "hf-moe serve runs vLLM in a child process"
        serve.send_signal(signal.SIGTERM)  # to hf-moe serve only, as `kill PID` or a supervisor would
        assert serve.wait(timeout=120) == 128 + signal.SIGTERM
        left = {pid for pid in server if _running(pid)}
        assert left == set(), f"vLLM processes outlived hf-moe serve: {left}\n" + log_path.read_text()[-3000:]
        assert _port_free(port), f"port {port} still bound after hf-moe serve exited"
        assert "serving in float32 (the checkpoint's dtype" in log_path.read_text()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(timeout=30)
        for pid in server | _descendants(serve.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
