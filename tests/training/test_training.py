"""Router-aware training: the monitor's numbers, the Trainer callback, the plain loop and multi-process runs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_moe import HfMoeForCausalLM
from hf_moe.training import MoeTrainerCallback, RouterMonitor, update_router_biases
from tests.helpers.tiny import tiny_model, tiny_router_config

ROOT = Path(__file__).resolve().parents[2]


def test_monitor_matches_model_losses_with_padding():
    model = tiny_model(seed=0, output_router_logits=True)
    ids = torch.randint(3, 99, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :7] = 0
    with RouterMonitor(model) as monitor:
        out = model(ids, attention_mask=mask)
        stats = monitor.summary()
    torch.testing.assert_close(stats["moe/aux_loss"], out.aux_loss.item(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["moe/z_loss"], out.z_loss.item(), rtol=1e-5, atol=1e-6)
    assert stats["moe/dropped"] == 0.0
    # Entropy of a distribution over 4 experts lies in [0, ln 4].
    assert 0.0 < stats["moe/entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert monitor.summary() == {}  # summary() resets


def test_monitor_counts_dropped_assignments():
    model = tiny_model(seed=0, router_type="switch", num_experts_per_tok=1, capacity_factor=0.25)
    ids = torch.randint(3, 99, (2, 16))  # 32 tokens, capacity ceil(0.25 * 32 / 4) = 2 per expert
    with RouterMonitor(model) as monitor:
        out = model(ids, output_router_indices=True)
        stats = monitor.summary()
    expected = sum(float((idx == 4).float().mean()) for idx in out.router_indices) / len(out.router_indices)
    assert stats["moe/dropped"] == pytest.approx(expected)
    assert stats["moe/dropped"] >= 1 - 4 * 2 / 32  # at most 8 of 32 tokens fit


def _byte_dataset(text: str, seq_len: int, n: int) -> list[dict]:
    data = torch.tensor(list(text.encode()[: seq_len * n]), dtype=torch.long) % 96 + 3
    rows = data.view(n, seq_len)
    return [{"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in rows]


def test_trainer_callback_logs_router_metrics_and_updates_bias_once_per_step(
    tmp_path, shakespeare_train_text
):
    config = tiny_router_config("sigmoid_topk", router_bias_update_rate=0.01, output_router_logits=True)
    torch.manual_seed(0)
    model = HfMoeForCausalLM(config)
    callback = MoeTrainerCallback(per_layer=True)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    bias_before = [m.gate.e_score_correction_bias.clone() for m in model.modules() if hasattr(m, "gate")]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_byte_dataset(shakespeare_train_text, 16, 12),
        callbacks=[callback],
    )
    trainer.train()
    assert model.config.router_bias_update == "manual"
    assert callback.bias_updates == 3  # one per optimizer step, not one per micro-batch
    bias_after = [m.gate.e_score_correction_bias for m in model.modules() if hasattr(m, "gate")]
    for before, after in zip(bias_before, bias_after):
        moved = (after - before).abs()
        # Each step moves every bias by exactly the rate or 0 (sign update), so after 3 steps |delta| <= 3 * rate.
        assert moved.max() <= 0.03 + 1e-6 and moved.max() > 0
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 3
    for row in logged:
        for key in (
            "moe/aux_loss",
            "moe/z_loss",
            "moe/load_cv",
            "moe/dropped",
            "moe/entropy",
            "moe/layer_0/load_cv",
        ):
            assert key in row, key


def test_update_router_biases_is_noop_without_sigmoid_routers():
    model = tiny_model()
    assert update_router_biases(model) == 0


def test_plain_loop_example_loss_decreases(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train  # examples/train.py
    finally:
        sys.path.pop(0)
    log = tmp_path / "log.jsonl"
    assert train.main(["--steps", "25", "--batch-size", "4", "--seq-len", "32", "--log-file", str(log)]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert all("moe/load_cv" in r for r in rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_train(tmp_path: Path, name: str, processes: int, *extra: str) -> list[float]:
    log = tmp_path / f"{name}.jsonl"
    args = [
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--router",
        "sigmoid_topk",
        "--log-file",
        str(log),
        *extra,
    ]
    if processes == 1:
        cmd = [sys.executable, str(ROOT / "examples" / "train.py"), *args]
    else:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), str(ROOT / "examples" / "train.py"), *args,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out_file = tmp_path / f"{name}.out"
    with open(out_file, "w") as out:
        # Output to a file, not a pipe: launcher children inherit it, and a full pipe would stall them.
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert proc.returncode == 0, out_file.read_text()[-3000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["world"] for r in rows} == {processes}
    return [r["loss"] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one_process(tmp_path, mode, shakespeare_train_text):
    text = tmp_path / "text.txt"
    text.write_text(shakespeare_train_text[:200_000])
    single = _run_train(tmp_path, "single", 1, "--text", str(text))
    extra = ["--fsdp"] if mode == "fsdp2" else []
    double = _run_train(tmp_path, mode, 2, "--text", str(text), *extra)
    # Same global batch and init; the router losses are computed per process, the rest is reduction order.
    torch.testing.assert_close(torch.tensor(double), torch.tensor(single), rtol=0, atol=2e-3)
    assert single[-1] < single[0]
