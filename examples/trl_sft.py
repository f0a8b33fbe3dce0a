"""Supervised fine-tuning of an hf_moe model with TRL's `SFTTrainer`, with router statistics in the logs and hf_moe's
router losses (load balancing + z-loss) in the training loss.

    pip install -e ".[trl]"
    hf-moe upcycle HuggingFaceTB/SmolLM2-135M smol-moe --num-experts 8 --top-k 2     # any hf_moe checkpoint
    python examples/trl_sft.py --model smol-moe --out runs/sft --steps 100
    python examples/trl_sft.py --model smol-moe --out runs/sft-lora --lora experts,attention --steps 100

Text: `--text FILE` (plain text, split into chunks of about `--chunk-chars` characters), or Shakespeare's held-out
plays from hf_moe's offline assets. Outputs in OUT: the fine-tuned model (or the LoRA adapter) and
`log_history.json`, whose rows carry TRL's `loss` and hf_moe's `moe/*` metrics (expert load balance, dropped
fraction, routing entropy, aux and z loss; per layer with `--per-layer`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import hf_moe  # noqa: F401  (registers the hf_moe model type and the fused-experts LoRA layer)
from hf_moe.training import MoeTrainerCallback


def text_chunks(text: str, chunk_chars: int, limit: int) -> list[str]:
    """Up to `limit` chunks of about `chunk_chars` characters, cut at line ends."""
    chunks, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current) >= chunk_chars:
            chunks.append(current.strip())
            current = ""
            if len(chunks) == limit:
                break
    return [c for c in chunks if c]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an hf_moe checkpoint folder with its tokenizer")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--text", help="plain-text training file (default: Shakespeare's held-out plays)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example")
    parser.add_argument("--chunk-chars", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument(
        "--lora", help="comma-separated LoRA preset targets (e.g. experts,attention); full FT if unset"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--per-layer", action="store_true", help="also log per-layer router metrics")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
    else:
        from offline_assets import shakespeare_texts  # examples/offline_assets.py, beside this script

        text = "\n\n".join(shakespeare_texts(split="heldout").values())
    chunks = text_chunks(text, args.chunk_chars, limit=args.steps * args.batch_size)
    dataset = Dataset.from_dict({"text": chunks})

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
    if getattr(model.config, "model_type", None) != "hf_moe":
        raise SystemExit(
            f"{args.model} is not an hf_moe checkpoint (model_type {model.config.model_type!r})."
        )
    peft_config = None
    if args.lora:
        from hf_moe.peft import lora_config

        peft_config = lora_config(model, targets=args.lora.split(","), r=args.rank, alpha=2 * args.rank)

    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=args.lr,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=torch.cuda.is_available(),
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=False,
    )
    callback = MoeTrainerCallback(per_layer=args.per_layer)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )
    trainer.train()
    out = Path(args.out)
    trainer.save_model(str(out))
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    losses = [row["loss"] for row in history if "loss" in row]
    return {
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "router_losses_in_loss": callback.router_losses_installed,
        "lora": bool(args.lora),
        "out": str(out),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
