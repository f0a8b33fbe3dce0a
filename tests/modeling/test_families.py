"""Any dense decoder family transformers ships: a tiny random checkpoint of each, saved by transformers' own class,
upcycled by `hf_moe.upcycle`, reproduces the dense logits (copy, fine-grained split, and shared experts with drop=0)
and its greedy generations, with the KV cache, through the base family's own decoder. Runs on the oldest and newest
supported transformers (scripts/run_vllm_tests.sh runs tests/modeling on 5.19)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_moe
from hf_moe import HfMoeForCausalLM
from hf_moe.conversion.sources import SOURCES
from tests.helpers.dense import SMALL as DENSE

SMALL = {**DENSE, "head_dim": 8}
# What a family needs on top of SMALL to be small and to exercise its peculiarities.
FAMILY_EXTRA: dict[str, dict] = {
    "gemma2": {"sliding_window": 4, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {"sliding_window": 4, "sliding_window_pattern": 2},
    "granite": {
        "embedding_multiplier": 2.0,
        "logits_scaling": 4.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.2,
    },
    "cohere": {"logit_scale": 0.5},
    "cohere2": {"sliding_window": 4},
    "mistral": {"sliding_window": 4},
    "ministral": {"sliding_window": 4},
    "phi3": {"pad_token_id": 0},
    "smollm3": {"no_rope_layer_interval": 2},
}
# Upcycle options: plain copies, the fine-grained split, shared experts (routed + shared halves, drop 0).
OPTIONS = {
    "copy": dict(num_experts=4, top_k=2),
    "split": dict(num_experts=4, top_k=2, granularity=2),
    "shared": dict(num_experts=4, top_k=2, num_shared_experts=1, drop_ratio=0.0),
}
INPUT_IDS = torch.tensor(
    [[1, 5, 17, 42, 8, 93, 23, 4, 61, 11, 7, 30], [1, 88, 3, 3, 64, 12, 29, 50, 9, 70, 2, 6]]
)


def _dense(family: str, path):
    config = AutoConfig.for_model(family, **{**SMALL, **FAMILY_EXTRA.get(family, {})})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from their init, so that a misplaced norm changes the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("family", sorted(SOURCES))
def test_upcycle_is_exact_at_init(tmp_path, family, option):
    dense = _dense(family, tmp_path / "dense")
    out = hf_moe.upcycle(
        tmp_path / "dense", tmp_path / "moe", **OPTIONS[option], require_exact=True, progress=False
    )
    moe = HfMoeForCausalLM.from_pretrained(out).eval()
    assert moe.config.get_text_config().model_type == family
    assert all(hasattr(layer.mlp, "experts") for layer in moe.model.layers)
    mask = torch.ones_like(INPUT_IDS)
    mask[0, :2] = 0  # left padding on one row
    with torch.no_grad():
        expected = dense(INPUT_IDS, attention_mask=mask).logits
        got = moe(INPUT_IDS, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max().item() <= 1e-4
    prompt = INPUT_IDS[1:, :6]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(moe.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))


@pytest.mark.parametrize("family", ["gemma3_text", "phi3"])
def test_remote_code_loads_a_new_family_without_hf_moe(tmp_path, family):
    """The saved folder loads with trust_remote_code where hf_moe is not importable, whatever the base family."""
    import subprocess
    import sys

    _dense(family, tmp_path / "dense")
    out = hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    with torch.no_grad():
        expected = HfMoeForCausalLM.from_pretrained(out).eval()(INPUT_IDS).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys, builtins, torch
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name == "hf_moe" or name.startswith("hf_moe."):
        raise ImportError("hf_moe is not installed here")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.tensor({INPUT_IDS.tolist()})
with torch.no_grad():
    got = model(ids).logits
torch.testing.assert_close(got, torch.load({str(tmp_path / "expected.pt")!r}))
prompt = ids[1:, :6]
a = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
b = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
assert torch.equal(a, b), (a, b)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["text_config"]["model_type"] == family


@pytest.mark.parametrize("family", ["gpt_neox", "starcoder2", "phi"])
def test_non_gated_families_are_refused_with_the_reason(tmp_path, family):
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"model_type": family}))
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, tmp_path / "dense" / "model.safetensors")
    with pytest.raises(ValueError, match="not gated"):
        hf_moe.upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    assert not (tmp_path / "moe").exists()
