"""TRL's SFTTrainer on tiny hf_moe models with real Shakespeare text: full fine-tuning and a LoRA preset, the
router metrics in the logs, and hf_moe's router losses (balancing + z-loss) in the loss TRL optimises."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")  # the [trl] extra; part of [dev] and CI
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from hf_moe import HfMoeForCausalLM  # noqa: E402
from hf_moe.peft import FusedExpertsLora, lora_config  # noqa: E402
from hf_moe.training import MoeTrainerCallback  # noqa: E402
from tests.helpers.tiny import tiny_router_config  # noqa: E402
from tests.helpers.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 128
MOE_KEYS = ("moe/aux_loss", "moe/z_loss", "moe/load_cv", "moe/load_max", "moe/dropped", "moe/entropy")


@pytest.fixture(scope="module")
def shakespeare_lines(shakespeare_heldout_text: str) -> list[str]:
    return [line.strip() for line in shakespeare_heldout_text.splitlines() if len(line.strip()) > 20][:400]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, shakespeare_lines):
    return build_tiny_tokenizer(
        tmp_path_factory.mktemp("tok"), vocab_size=VOCAB, corpus=tuple(shakespeare_lines)
    )


def _dataset(lines: list[str], n: int) -> Dataset:
    return Dataset.from_dict({"text": [" ".join(lines[i * 3 : i * 3 + 3]) for i in range(n)]})


def _config(tmp_path: Path, steps: int, **overrides) -> SFTConfig:
    return SFTConfig(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, max_length=48, logging_steps=1,
        learning_rate=1e-3, save_strategy="no", report_to=[], bf16=False, gradient_checkpointing=False,
        use_cpu=True, disable_tqdm=True, **overrides,
    )  # fmt: skip


def _model(router_type: str, **overrides) -> HfMoeForCausalLM:
    torch.manual_seed(0)
    config = tiny_router_config(
        router_type,
        vocab_size=VOCAB,
        output_router_logits=True,
        router_aux_loss_coef=0.05,
        router_z_loss_coef=0.01,
        **overrides,
    )
    return HfMoeForCausalLM(config)


def test_sft_trainer_logs_router_metrics_and_optimises_hf_moe_router_losses(
    tmp_path, tokenizer, shakespeare_lines
):
    # sigmoid_topk with group-limited routing: TRL's own balancing term (Mixtral's, recomputed with a softmax
    # top-k from the logits) is not the loss of this router, and TRL has no z-loss.
    model = _model("sigmoid_topk", router_bias_update_rate=0.01)
    callback = MoeTrainerCallback(per_layer=True)
    trainer = SFTTrainer(
        model=model,
        args=_config(tmp_path, 3),
        train_dataset=_dataset(shakespeare_lines, 12),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trl_forward = model.forward  # TRL's fused-LM-head forward, before the callback wraps it
    trainer.train()

    assert callback.router_losses_installed and callback.bias_updates == 3
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 3
    for row in rows:
        for key in (*MOE_KEYS, "moe/layer_1/entropy"):
            assert key in row, key
        assert 0 < row["moe/entropy"] <= float(torch.log(torch.tensor(4.0))) + 1e-6
        assert row["moe/dropped"] == 0.0  # dropless router

    # The loss TRL computes is the model's own: token NLL + aux_coef * aux + z_coef * z.
    model.eval()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch))
        own = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            output_router_logits=True,
        )
        assert own.aux_loss > 0 and own.z_loss > 0
        torch.testing.assert_close(trl_loss, own.loss, rtol=1e-5, atol=1e-6)
        # TRL's forward alone gets it wrong: its loss misses the z-loss and uses another balancing term.
        model.forward = trl_forward
        plain_trl = trainer.compute_loss(model, dict(batch))
    assert (plain_trl - own.loss).abs() > 1e-3


def test_sft_trainer_with_lora_preset_trains_the_fast_experts_layer(tmp_path, tokenizer, shakespeare_lines):
    model = _model("softmax_topk")
    experts_before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    peft_config = lora_config(model, targets=["experts", "attention"], r=4, alpha=8)
    callback = MoeTrainerCallback()
    trainer = SFTTrainer(
        model=model,
        args=_config(tmp_path, 4),
        train_dataset=_dataset(shakespeare_lines, 12),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )
    trainer.train()

    assert callback.router_losses_installed
    layers = [m for m in trainer.model.modules() if isinstance(m, FusedExpertsLora)]
    assert len(layers) == 2
    # LoRA B starts at zero; training moved it. The base experts stay frozen.
    assert all(layer.lora_B["default"].gate_up_proj.abs().max() > 0 for layer in layers)
    torch.testing.assert_close(layers[0].get_base_layer().gate_up_proj, experts_before, rtol=0, atol=0)
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 4 and all(key in row for row in rows for key in MOE_KEYS)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_trl_example_runs(tmp_path, tokenizer, shakespeare_lines):
    model_dir = tmp_path / "model"
    tokenizer.save_pretrained(model_dir)
    _model("softmax_topk").save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(shakespeare_lines))
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import trl_sft
    finally:
        sys.path.pop(0)
    out = tmp_path / "out"
    summary = trl_sft.main(
        [
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--text",
            str(text),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--max-length",
            "48",
            "--chunk-chars",
            "200",
            "--lora",
            "experts",
            "--rank",
            "4",
        ]
    )
    assert summary["steps"] == 3 and summary["router_losses_in_loss"] and summary["lora"]
    history = json.loads((out / "log_history.json").read_text())
    assert all(key in row for row in history if "loss" in row for key in MOE_KEYS)
    assert (out / "adapter_config.json").is_file()
