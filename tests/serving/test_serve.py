"""`hf-moe serve` planning and its dry run (no vLLM needed), the served dtype, the process-group lifetime of the
server (with real processes standing in for vLLM), the plugin's router policy, and the promise that `import hf_moe`
never imports vLLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hf_moe.cli import main
from hf_moe.serving.compat import serving_problems
from hf_moe.serving.serve import describe_plan, plan_serve
from tests.helpers.native import build_tiny_for_target, tiny_target_config
from tests.helpers.tiny import tiny_router_config


def test_import_hf_moe_does_not_import_vllm():
    code = (
        "import sys, hf_moe, hf_moe.serving.serve, hf_moe.serving.vllm_plugin; print('vllm' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk", "sigmoid_topk", "noisy_topk"])
def test_per_token_routers_are_servable(router):
    assert serving_problems(tiny_router_config(router)) == []


def test_switch_is_servable_only_without_capacity():
    assert serving_problems(tiny_router_config("switch", capacity_factor=None)) == []
    (problem,) = serving_problems(tiny_router_config("switch"))
    assert "capacity_factor" in problem and "None" in problem


def test_expert_choice_is_refused():
    (problem,) = serving_problems(tiny_router_config("expert_choice"))
    assert "expert_choice" in problem and "causal" in problem


def test_auto_route_exports_when_a_native_target_fits(tmp_path):
    src = build_tiny_for_target("qwen3_moe", tmp_path / "m")
    plan = plan_serve(src, port=8123, cache_dir=tmp_path / "cache")
    assert plan.route == "native" and plan.target == "qwen3_moe" and plan.needs_export
    assert plan.model_dir.parent == tmp_path / "cache"
    assert plan.command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert plan.command[plan.command.index("--model") + 1] == str(plan.model_dir)
    assert plan.command[plan.command.index("--host") + 1] == "127.0.0.1"
    assert "--kv-cache-memory-bytes" in plan.command
    assert plan.url == "http://127.0.0.1:8123/v1"
    # The cache key follows the checkpoint's files: touching a file gives a new export folder.
    (src / "config.json").write_text((src / "config.json").read_text() + "\n")
    assert plan_serve(src, cache_dir=tmp_path / "cache").model_dir != plan.model_dir


def test_plugin_route_when_no_native_target_fits(tmp_path):
    from hf_moe import HfMoeForCausalLM

    model = HfMoeForCausalLM(tiny_target_config("mixtral", router_type="switch", num_experts_per_tok=1))
    model.save_pretrained(tmp_path / "m")
    plan = plan_serve(tmp_path / "m")
    assert plan.route == "plugin" and plan.target is None and not plan.needs_export
    assert plan.command[plan.command.index("--model") + 1] == str(tmp_path / "m")
    with pytest.raises(ValueError, match="fits no native architecture"):
        plan_serve(tmp_path / "m", route="native")


def test_refused_router_fails_before_vllm_starts(tmp_path):
    from hf_moe import HfMoeForCausalLM

    HfMoeForCausalLM(
        tiny_target_config("mixtral", router_type="expert_choice", use_cache=False)
    ).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="expert_choice"):
        plan_serve(tmp_path / "m", route="plugin")


def test_cli_dry_run(tmp_path, capsys):
    src = build_tiny_for_target("mixtral", tmp_path / "m")
    code = main(
        [
            "serve",
            str(src),
            "--port",
            "8111",
            "--dry-run",
            "--cache-dir",
            str(tmp_path / "c"),
            "--vllm-args",
            "--max-model-len 64",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "would export" in out and "mixtral" in out
    assert (
        "vllm.entrypoints.openai.api_server" in out
        and "--port 8111" in out
        and out.count("--max-model-len 64") == 1
    )
    assert "http://127.0.0.1:8111/v1" in out
    assert not (tmp_path / "c").exists(), "a dry run writes nothing"
    assert main(["serve", str(src), "--plugin", "--dry-run"]) == 0
    assert f"--model {src}" in capsys.readouterr().out


def test_cli_missing_folder_is_exit_2(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope"), "--dry-run"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_cli_without_vllm_names_the_fix(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: the command would start a server")
    src = build_tiny_for_target("qwen3_moe", tmp_path / "m")
    assert main(["serve", str(src), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "--python" in capsys.readouterr().err
    assert not (tmp_path / "c").exists(), "nothing is exported when vLLM is missing"


# ---------------------------------------------------------------------------------------------------------------
# Precision: the checkpoint's dtype unless asked otherwise (vLLM's "auto" serves float32 in 16 bits).


def _command_dtype(plan) -> str:
    return plan.command[plan.command.index("--dtype") + 1]


def test_serves_in_the_checkpoints_dtype(tmp_path):
    import torch

    from hf_moe import HfMoeForCausalLM

    fp32 = build_tiny_for_target("mixtral", tmp_path / "fp32")
    plan = plan_serve(fp32, route="plugin")
    assert _command_dtype(plan) == "float32" and plan.dtype_origin == "the checkpoint's"
    assert "serving in float32 (the checkpoint's dtype" in describe_plan(plan)[0]
    assert plan.command.count("--dtype") == 1

    HfMoeForCausalLM(tiny_target_config("mixtral")).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert _command_dtype(plan_serve(tmp_path / "bf16", route="plugin")) == "bfloat16"

    chosen = plan_serve(fp32, route="plugin", dtype="auto")
    assert _command_dtype(chosen) == "auto" and chosen.dtype_origin == "--dtype"
    with pytest.raises(ValueError, match="--dtype"):
        plan_serve(fp32, route="plugin", extra_args=["--dtype", "half"])


def test_dtype_from_the_weights_when_the_config_names_none(tmp_path):
    import torch

    from hf_moe import HfMoeForCausalLM

    HfMoeForCausalLM(tiny_target_config("mixtral")).to(torch.float16).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert _command_dtype(plan_serve(tmp_path / "m", route="plugin")) == "float16"


def test_cli_dry_run_says_dtype_and_export_cache(tmp_path, capsys):
    src = build_tiny_for_target("qwen3_moe", tmp_path / "m")
    cache = tmp_path / "cache"
    (cache / "older-export").mkdir(parents=True)
    (cache / "older-export" / "model.safetensors").write_bytes(b"x" * 2500)
    assert main(["serve", str(src), "--dry-run", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "--dtype float32" in out and "serving in float32 (the checkpoint's dtype" in out
    assert f"the export cache {cache} holds 2.5 KB" in out
    assert main(["serve", str(src), "--dry-run", "--cache-dir", str(cache), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "--dtype bfloat16" in out and "serving in bfloat16 (--dtype)" in out


# ---------------------------------------------------------------------------------------------------------------
# Lifetime: the server's whole process group stops with `serve` (real processes stand in for vLLM here; the vLLM
# test kills a real `hf-moe serve`).

# A "server" that starts a worker (as vLLM's API process starts its engine core) and records both pids; with
# "stubborn" both ignore SIGTERM, so only the SIGKILL escalation stops them.
_SERVER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    stubborn = sys.argv[2] == "stubborn"
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if stubborn else ""
    worker_code = "import signal, time\\n" + ignore + "time.sleep(600)"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = subprocess.Popen([sys.executable, "-c", worker_code])
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {worker.pid}")
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)
""")

# What `hf-moe serve` does once the plan is made: run the server command through run_process_group.
_SERVE = textwrap.dedent("""
    import sys
    from hf_moe.serving.serve import run_process_group
    sys.exit(run_process_group([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], stop_timeout_s=2.0))
""")


def _running(pid: int) -> bool:
    """Alive and not a zombie (orphans are reaped by whoever adopted them, maybe late)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_for(path: Path, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} not written"
        time.sleep(0.05)
    return path.read_text()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
@pytest.mark.parametrize(
    "signum, behaviour", [(signal.SIGTERM, "polite"), (signal.SIGINT, "polite"), (signal.SIGTERM, "stubborn")]
)
def test_signal_to_serve_stops_the_whole_server(tmp_path, signum, behaviour):
    pids_file = tmp_path / "pids"
    serve = subprocess.Popen(
        [sys.executable, "-c", _SERVE, _SERVER, str(pids_file), behaviour],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        server, worker = map(int, _wait_for(pids_file).split())
        assert _running(server) and _running(worker)
        serve.send_signal(signum)  # to `serve` only, as `kill PID` or a supervisor would
        assert serve.wait(timeout=60) == 128 + signum
    finally:
        if serve.poll() is None:
            serve.kill()
    deadline = time.monotonic() + 10
    while (_running(server) or _running(worker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(server) and not _running(worker), "a server process outlived hf-moe serve"


def test_server_exit_reaps_its_leftover_workers(tmp_path):
    # The server exits by itself, leaving its worker: the worker must not outlive run_process_group.
    from hf_moe.serving.serve import run_process_group

    code = textwrap.dedent(f"""
        import subprocess, sys
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(tmp_path / "worker")!r}, "w").write(str(worker.pid))
        sys.exit(3)
    """)
    assert run_process_group([sys.executable, "-c", code], stop_timeout_s=5.0) == 3
    worker = int((tmp_path / "worker").read_text())
    assert not _running(worker)
