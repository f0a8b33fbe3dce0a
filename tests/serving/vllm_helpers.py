"""Shared by the vLLM tests: an in-process engine on a tiny fp32 model, greedy decoding with log-probabilities in
vLLM and in transformers, and the comparison.

Why these tolerances: both sides run fp32 on the CPU, but vLLM uses its own kernels (paged attention, fused-MoE
experts, fused RMSNorm / SiLU-and-mul) that sum in other orders than transformers' eager code. On the tiny models
the measured log-probability gaps are ~1e-6 (docs/serving.md); LOGPROB_ATOL = 2e-4 leaves room for other CPUs'
vector widths while staying far below any real difference (a wrong router weight, a dropped bias or a swapped
expert moves log-probs by 1e-2 or more on these models). Greedy tokens must be equal.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch

LOGPROB_ATOL = 2e-4
KV_CACHE_BYTES = int(os.environ.get("HF_MOE_VLLM_KV_CACHE_BYTES", 64 << 20))
PROMPTS = ([1, 17, 42, 5, 63, 8, 21], [1, 90, 3, 77, 12])  # token ids; 1 is <s> in the tiny tokenizer
MAX_TOKENS = 8


@dataclass
class Greedy:
    tokens: list[int]
    logprobs: list[float]  # log-probability of each generated token


def make_llm(model_dir: str | Path, **kwargs):
    """An in-process vLLM engine on `model_dir` (fp32, eager, bounded KV cache)."""
    from vllm import LLM

    options = dict(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        max_model_len=128,
        max_num_seqs=8,
        seed=0,
    )
    return LLM(**{**options, **kwargs})


def close_llm(llm) -> None:
    """Free the engine and vLLM's process-wide distributed state so the next test can build another one."""
    from vllm.distributed import cleanup_dist_env_and_memory

    if llm is not None:
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) if engine is not None else None
        if shutdown is not None:
            shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def vllm_greedy(llm, prompts=PROMPTS, max_tokens: int = MAX_TOKENS) -> list[Greedy]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[tok].logprob for tok, step in zip(tokens, completion.logprobs, strict=True)]
        results.append(Greedy(tokens, logprobs))
    return results


@torch.no_grad()
def hf_greedy(model, prompts=PROMPTS, max_tokens: int = MAX_TOKENS) -> list[Greedy]:
    """Greedy decoding with transformers, one prompt at a time (no padding), with raw-logit log-probabilities.

    The end-of-sequence token is neither a stop nor suppressed (no `min_new_tokens`, which would mask its logit),
    as vLLM's `ignore_eos=True` does: both sides then take the plain argmax at every step."""
    from transformers import GenerationConfig

    never = model.config.get_text_config().vocab_size  # an id no logit has: generation never stops early
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=never, pad_token_id=0)
    results = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        logprobs = [
            torch.log_softmax(step[0].float(), -1)[tok].item() for step, tok in zip(out.logits, tokens)
        ]
        results.append(Greedy(tokens, logprobs))
    return results


def assert_same_greedy(got: list[Greedy], want: list[Greedy], atol: float = LOGPROB_ATOL) -> float:
    """Equal greedy tokens and log-probs within `atol`; returns the largest log-prob gap."""
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.tokens == w.tokens, f"prompt {i}: vLLM tokens {g.tokens} != transformers tokens {w.tokens}"
        gap = max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs, strict=True))
        assert gap <= atol, f"prompt {i}: log-prob gap {gap:.2e} > {atol:.0e}"
        worst = max(worst, gap)
    return worst
