"""Train an hf_moe model on text with accelerate: one process, several, or FSDP2-sharded, the same script.

    python examples/train.py --steps 20
    accelerate launch --multi_gpu --num_processes 2 examples/train.py --steps 20         # two processes
    accelerate launch --multi_gpu --num_processes 2 examples/train.py --steps 20 --fsdp  # FSDP2 sharding

(the README's commands, "Training"). On a CPU-only machine `--multi_gpu` is just accelerate's torchrun launcher:
the script passes `cpu=True` when no CUDA device exists, so the processes use gloo.

The global batch is fixed (`--batch-size`, split evenly across processes in rank order), so every process count
sees the same tokens per step and the loss curves agree up to floating-point reduction order and the router
losses, which are computed per process. On GPUs the same command scales: raise `--num_processes` to the GPU
count, add `--num_machines/--machine_rank/--main_process_ip` for several nodes (see README, "Training").
"""

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin, set_seed

from hf_moe import HfMoeConfig, HfMoeForCausalLM
from hf_moe.training import RouterMonitor, update_router_biases

BYTE_OFFSET = 3  # ids 0..2 are pad/bos/eos; byte b is token b + 3


def byte_tokens(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long) + BYTE_OFFSET


def default_text() -> str:
    from offline_assets import shakespeare_texts

    return "\n".join(shakespeare_texts(split="train").values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--text", type=Path, help="training text file (default: the Shakespeare plays, train split)"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences per optimizer step)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--router", default="softmax_topk")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2")
    p.add_argument("--log-file", type=Path, help="write one JSON line per step (main process)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fsdp = (
        FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["HfMoeDecoderLayer"],
            reshard_after_forward=True,
        )
        if args.fsdp
        else None
    )
    # cpu=True on a machine without CUDA makes accelerate pick MULTI_CPU + gloo under a multi-process launch.
    accelerator = Accelerator(fsdp_plugin=fsdp, cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    set_seed(args.seed)

    text = args.text.read_text(encoding="utf-8") if args.text else default_text()
    tokens = byte_tokens(text)
    windows = tokens[: (len(tokens) // args.seq_len) * args.seq_len].view(-1, args.seq_len)  # (N, S)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed))

    config = HfMoeConfig(
        vocab_size=256 + BYTE_OFFSET,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        moe_intermediate_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        router_type=args.router,
        router_bias_update_rate=1e-3 if args.router == "sigmoid_topk" else 0.0,
        router_bias_update="manual",
        max_position_embeddings=args.seq_len,
        output_router_logits=True,
        router_z_loss_coef=1e-3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = HfMoeForCausalLM(config)
    # fused: one kernel over every parameter, on the CPU as on CUDA (the README's CPU training tips).
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    monitor = RouterMonitor(model)
    per_rank = args.batch_size // world
    log = open(args.log_file, "w") if (args.log_file and accelerator.is_main_process) else None
    model.train()
    for step in range(args.steps):
        start = time.perf_counter()
        idx = order[(step * args.batch_size) % len(order) :][: args.batch_size]
        batch = windows[idx][rank * per_rank : (rank + 1) * per_rank].to(accelerator.device)  # (B/world, S)
        out = model(input_ids=batch, labels=batch)  # the loss shifts labels itself
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad()
        update_router_biases(model)  # once per optimizer step, all ranks alike
        loss = accelerator.reduce(out.loss.detach(), reduction="mean").item()
        stats = monitor.summary(per_layer=False)
        if accelerator.is_main_process:
            row = {"step": step, "loss": loss, "sec": time.perf_counter() - start, "world": world, **stats}
            print(json.dumps(row), flush=True)
            if log:
                log.write(json.dumps(row) + "\n")
        if not math.isfinite(loss):
            raise SystemExit(f"loss is {loss} at step {step}")
    if log:
        log.close()
    monitor.remove()
    accelerator.wait_for_everyone()
    # Free the DDP wrapper (its gradient reducer holds the gloo process group) while the group is still alive:
    # freed after end_training(), its destructor joins gloo's worker threads while holding the GIL that one of them
    # waits for, and the process never exits (torch 2.13, gloo on CPU).
    del model, optimizer
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
