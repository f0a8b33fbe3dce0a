"""Tiny dense checkpoints shared by the tests: the sources that conversion tests upcycle, merge, import or read.

`SMALL` is the dense decoder of the tiny hf_moe config (tests/helpers/tiny.py: vocab 99, hidden 32, 2 layers).
`save_dense` writes any family's tiny checkpoint, `make_dense_llama` the Llama one most tests use, `make_fine_tune`
a seeded "fine-tune" of a saved base; `ROUTING_PROMPTS` routes each of three prompts to its own expert.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from tests.helpers.tiny_tokenizer import build_tiny_tokenizer

SMALL = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# One positive prompt per expert and no negatives (words the tiny tokenizer was trained on): then a prompt's mean
# router logits are provably highest at its own expert (hf_moe/conversion/prompts.py docstring).
ROUTING_PROMPTS = {
    "experts": [
        {"positive_prompts": ["To be, or not to be, that is the question."]},
        {"positive_prompts": ["The quick brown fox jumps over the lazy dog."]},
        {"positive_prompts": ["Numbers 0 1 2 3 4 5 6 7 8 9"]},
    ]
}


def randomise(model: torch.nn.Module, seed: int, scale: float = 0.15) -> None:
    # transformers' init (std 0.02, unit norms, zero biases) makes every layer nearly the identity; larger random
    # values make distinct prompts give distinct hidden states, and a wrong copy, a missing bias or a mis-sliced
    # expert show up in the logits.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=generator))


def save_dense(
    path: Path,
    config: PretrainedConfig,
    *,
    seed: int = 0,
    randomised: bool = True,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = "20KB",
    tokenizer: bool = False,
) -> PreTrainedModel:
    """Save a tiny dense model of `config`'s family to `path` and return it (eval mode, in `dtype`).

    Args:
        seed: seeds transformers' init and `randomise`.
        randomised: replace transformers' init with `randomise` (False: keep the init, as saved by the family).
        dtype: the dtype written to disk.
        max_shard_size: shard the safetensors (the default gives several shards); None writes one file.
        tokenizer: also write the tiny tokenizer (tests/helpers/tiny_tokenizer.py).
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if randomised:
        randomise(model, seed)
    model.to(dtype).save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if tokenizer:
        build_tiny_tokenizer(path, vocab_size=config.vocab_size)
    return model


def make_dense_llama(
    path: Path,
    *,
    seed: int = 0,
    randomised: bool = True,
    max_shard_size: str | None = "20KB",
    tokenizer: bool = True,
    **overrides,
) -> LlamaForCausalLM:
    """A tiny Llama (`SMALL`, `overrides` win) saved with the tiny tokenizer, sharded to exercise multi-shard
    reads; the options are `save_dense`'s."""
    config = LlamaConfig(**{**SMALL, **overrides})
    return save_dense(
        path, config, seed=seed, randomised=randomised, max_shard_size=max_shard_size, tokenizer=tokenizer
    )


def make_fine_tune(
    base: Path,
    out: Path,
    seed: int,
    *,
    mlp_std: float = 0.05,
    other_std: float = 0.01,
    max_shard_size: str = "20KB",
) -> LlamaForCausalLM:
    """A 'fine-tune' of `base`: seeded noise on every weight, larger on the MLPs (the part that becomes an
    expert)."""
    model = LlamaForCausalLM.from_pretrained(base).eval()
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * (mlp_std if ".mlp." in name else other_std))
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return model
