"""LoRA on the experts of an hf_moe model, end to end on CPU: a small model is trained briefly on Shakespeare
(train split), then adapted with LoRA (routed experts + attention, fast grouped path) to the held-out plays; the
adapter is saved, reloaded onto a fresh copy of the base model, and merged into it.

    python examples/lora_experts.py                       # outputs in a temporary folder
    python examples/lora_experts.py --out runs/lora --lora-steps 60

Text is byte-level (token = byte + 3), so no tokenizer is needed. Outputs: OUT/base (the base checkpoint),
OUT/adapter (PEFT adapter_config.json + adapter_model.safetensors), OUT/merged (base with the adapter merged in).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from peft import get_peft_model

from hf_moe import HfMoeConfig, HfMoeForCausalLM
from hf_moe.peft import load_adapter, lora_config

BYTE_OFFSET = 3  # ids 0..2 are pad/bos/eos; byte b is token b + 3


def byte_batches(text: str, *, seq_len: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids of `text` (N,) and random window starts (10000, batch_size), one row per step."""
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long) + BYTE_OFFSET
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len - 1, (10_000, batch_size), generator=generator)
    return ids, starts


def window(ids: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])  # (B, S)


def mean_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)


def train(
    model: torch.nn.Module, ids: torch.Tensor, starts: torch.Tensor, *, steps: int, seq_len: int, lr: float
) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        batch = window(ids, starts[step], seq_len)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="output folder (default: a new temporary folder)")
    p.add_argument("--base-steps", type=int, default=40, help="full training steps of the base model")
    p.add_argument("--lora-steps", type=int, default=40, help="LoRA steps on the held-out plays")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="hf_moe_lora_"))
    out.mkdir(parents=True, exist_ok=True)

    from offline_assets import shakespeare_texts

    train_text = "\n".join(shakespeare_texts(split="train").values())
    heldout_text = "\n".join(shakespeare_texts(split="heldout").values())

    # 1. A small base model, trained briefly on the train split, saved as an ordinary checkpoint.
    torch.manual_seed(args.seed)
    config = HfMoeConfig(
        vocab_size=256 + BYTE_OFFSET,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        max_position_embeddings=args.seq_len,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base = HfMoeForCausalLM(config)
    ids, starts = byte_batches(train_text, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    train(base, ids, starts, steps=args.base_steps, seq_len=args.seq_len, lr=3e-3)
    base.save_pretrained(out / "base")

    # 2. LoRA on the routed experts (fast grouped path) and attention, trained on the held-out plays.
    held_ids, held_starts = byte_batches(
        heldout_text, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed + 1
    )
    eval_batches = [window(held_ids, held_starts[-1 - i], args.seq_len) for i in range(4)]
    model = HfMoeForCausalLM.from_pretrained(out / "base")
    cfg = lora_config(
        model,
        targets=["experts", "attention"],
        r=args.r,
        alpha=2 * args.r,
        dropout=0.05,
        rank_pattern={"attention": max(1, args.r // 2)},
    )
    peft_model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    loss_before = mean_loss(peft_model, eval_batches)
    train(peft_model, held_ids, held_starts, steps=args.lora_steps, seq_len=args.seq_len, lr=1e-2)
    loss_after = mean_loss(peft_model, eval_batches)
    peft_model.save_pretrained(out / "adapter")

    # 3. Reload the adapter onto a fresh base model (exact), then merge it into the weights (same outputs).
    probe = eval_batches[0]
    with torch.no_grad():
        want = peft_model(input_ids=probe).logits
        reloaded = load_adapter(HfMoeForCausalLM.from_pretrained(out / "base"), str(out / "adapter"))
        reload_diff = (reloaded(input_ids=probe).logits - want).abs().max().item()
        merged = reloaded.merge_and_unload()
        merge_diff = (merged(input_ids=probe).logits - want).abs().max().item()
    merged.save_pretrained(out / "merged")

    summary = {
        "out": str(out),
        "trainable_params": trainable,
        "total_params": total,
        "heldout_loss_before_lora": round(loss_before, 4),
        "heldout_loss_after_lora": round(loss_after, 4),
        "reload_max_abs_diff": reload_diff,
        "merge_max_abs_diff": merge_diff,
        "adapter_files": sorted(f.name for f in (out / "adapter").iterdir()),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
