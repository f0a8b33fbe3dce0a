"""One smoke test of vLLM's OpenAI server on an hf_moe checkpoint through the plugin (the command `hf-moe serve
--plugin` builds, in the checkpoint's dtype): /v1/completions returns transformers' greedy completion. Loopback only,
a free port, a bounded wait, and the server's process group is killed in `finally`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; run scripts/run_vllm_tests.sh (the .venv-vllm venv)")

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
    plan = plan_serve(tmp_path / "model", route="plugin", port=port, kv_cache_bytes=KV_CACHE_BYTES,
                      extra_args=["--enforce-eager", "--max-model-len", "128"])
    assert plan.route == "plugin"
    assert plan.command[plan.command.index("--dtype") + 1] == "float32"  # the checkpoint's, as transformers loads it
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(plan.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, **plan.env})
    try:
        _wait_ready(server, port, tmp_path / "server.log")
        reply = _post(f"{plan.url}/completions", {
            "model": "model", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True,
        })
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
