"""Why a batch of decoding tokens costs an MoE more than its active parameters: the weight bytes it reads.

One MoE layer of the real SmolLM2-135M `equal-active` upcycle (8 half-width experts, top-2; benchmarks/real_models.py)
against the dense model's MLP of the same layer, on the real hidden states of a decoding step (`--batch` sequences
of Shakespeare after a prefill). The MoE experts run three ways on the same tokens, with the same kernels:
- `as routed`: the experts the router picks (a batch of 16 touches every expert);
- `one copy`: every token sent to experts 0 and 1 with the routed weights, i.e. the bytes of one dense MLP.
Each row gives the weight bytes the variant reads per step and its time, median of interleaved rounds. Before each
timed call a buffer twice the last-level cache is written, so the weights come from memory as in a whole
decoding step (the model is far larger than the cache), not from the last call's cache lines. When time
follows bytes (as routed ~ bytes x dense, one copy ~ dense), the step is bound by memory traffic, not by per-op
overhead, and no kernel can bring the batch to the dense speed without reading fewer bytes.

    python benchmarks/decode_bandwidth.py               # batch 16; writes its section of BENCHMARKS.md
    python benchmarks/decode_bandwidth.py --batch 4 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import (  # noqa: E402
    command_line,
    eviction_buffer,
    load,
    load_line,
    machine_line,
    model_dirs,
    text_batch,
    write_section,
)


def layer_inputs(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, H) input of `layer`'s MLP at the first decoding step after a prefill of `ids` (B, S)."""
    captured = []
    mlp = model.model.layers[layer].mlp
    handle = mlp.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
            next_ids = out.logits[:, -1:].argmax(-1)  # (B, 1)
            captured.clear()
            model(next_ids, cache=out.cache if hasattr(out, "cache") else out.past_key_values, use_cache=True)
    finally:
        handle.remove()
    return captured[0].reshape(ids.shape[0], -1)  # (B, H)


def weight_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dirs = model_dirs("equal-active")
    ids = text_batch(args.batch, 16)
    dense_model, moe_model = load(dirs["dense"]), load(dirs["hf_moe"])
    x = layer_inputs(moe_model, ids, args.layer)  # (B, H) the MoE model's own hidden states
    dense_mlp = dense_model.model.layers[args.layer].mlp
    block = moe_model.model.layers[args.layer].mlp
    experts = block.experts
    with torch.no_grad():
        _, weights, index = block.gate(x)  # (B, K)
    one_copy = torch.arange(index.shape[1]).expand_as(index).contiguous()  # experts 0..K-1 for every token

    per_expert = weight_bytes([experts.gate_up_proj[0], experts.down_proj[0]])
    router_bytes = weight_bytes([block.gate.weight])
    variants = {
        "dense MLP": (lambda: dense_mlp(x.unsqueeze(0)), weight_bytes(list(dense_mlp.parameters()))),
        "MoE block, as routed": (
            lambda: block(x.unsqueeze(0)),
            router_bytes + per_expert * index.unique().numel(),
        ),
        "MoE experts, as routed": (lambda: experts(x, index, weights), per_expert * index.unique().numel()),
        "MoE experts, one copy": (lambda: experts(x, one_copy, weights), per_expert * index.shape[1]),
    }
    load_before = load_line()
    times: dict[str, list[float]] = {name: [] for name in variants}
    evict = eviction_buffer()
    with torch.no_grad():
        for fn, _ in variants.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, (fn, _) in variants.items():
                evict.add_(1.0)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    load_after = load_line()
    dense_ms = statistics.median(times["dense MLP"]) * 1e3
    dense_bytes = variants["dense MLP"][1]
    rows = [
        "| variant | weight MB read | x dense bytes | ms (median) | x dense time |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (_, nbytes) in variants.items():
        ms = statistics.median(times[name]) * 1e3
        rows.append(
            f"| {name} | {nbytes / 1e6:.1f} | {nbytes / dense_bytes:.2f}x | {ms:.3f} | {ms / dense_ms:.2f}x |"
        )
    command = command_line("decode_bandwidth.py", argv)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(
        [
            "### Decoding a batch: time follows the weight bytes read (fp32, CPU)",
            "",
            f"`{command}` on {now}; {machine_line(args.threads)}.",
            f"Layer {args.layer} of the SmolLM2-135M equal-active upcycle, the hidden states of the first decoding "
            f"step of {args.batch} Shakespeare sequences; {len(index.unique())} of {experts.num_experts} experts "
            f"routed to. Median of {args.rounds} interleaved rounds, caches "
            f"evicted before each call ({evict.numel() * 4 >> 20} MB written). Load average {load_before} before, "
            f"{load_after} after.",
            "",
            *rows,
        ]
    )
    print(body)
    if not args.no_write:
        write_section(args.output, "decode_bandwidth", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
