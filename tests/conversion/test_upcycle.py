"""Upcycling dense checkpoints into hf_moe: exactness per source family and router, expert-init ops (split, drop,
noise), config translation, bad input (clear errors, nothing written), atomic output under SIGKILL, CLI, and the
real SmolLM2-135M."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen3Config,
)

import hf_moe
from hf_moe.cli import main as cli_main
from hf_moe.conversion.init import (
    add_relative_noise,
    drop_upcycle,
    expert_weights,
    seeded_generator,
    shared_expert_weights,
)
from hf_moe.conversion.io import CheckpointReader
from hf_moe.conversion.sources import translate_config
from hf_moe.conversion.upcycle import parse_moe_layers, upcycle
from tests.helpers.dense import SMALL, save_dense

FAMILIES = {
    "llama_tied": (LlamaConfig, dict(tie_word_embeddings=True)),
    "llama_bias": (
        LlamaConfig,
        dict(
            attention_bias=True, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
        ),
    ),
    "mistral_sliding": (MistralConfig, dict(sliding_window=5, head_dim=8)),
    "qwen2_bias": (Qwen2Config, dict()),
    "qwen3_qknorm": (Qwen3Config, dict(head_dim=16)),
}
# Routers whose top-k weights sum to one (noisy_topk: in eval), as the config overrides they need.
EXACT_ROUTERS = {
    "topk_softmax": {},
    "softmax_topk": {"norm_topk_prob": True},
    "sigmoid_topk": {"norm_topk_prob": True, "routed_scaling_factor": 1.0},
    "noisy_topk": {},
}


def make_dense(
    path: Path,
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "20KB",
    **overrides,
) -> tuple[Path, torch.nn.Module]:
    """A tiny randomised checkpoint of one of `FAMILIES` (tests/helpers/dense.py), sharded."""
    config_cls, extra = FAMILIES[family]
    config = config_cls(**{**SMALL, **extra, **overrides})
    return path, save_dense(path, config, seed=seed, dtype=dtype, max_shard_size=max_shard_size)


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("dense")
    models = {family: make_dense(root / family, family) for family in FAMILIES}
    for family, (path, _) in models.items():
        assert len(list(path.glob("model-*-of-*.safetensors"))) > 1, family  # multi-shard input exercised
    return models


def input_ids(seq_len: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 99, (2, seq_len), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(dense: torch.nn.Module, moe_dir: Path, ids: torch.Tensor) -> None:
    """The upcycled checkpoint in `moe_dir` gives `dense`'s logits on `ids`."""
    moe = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    with torch.no_grad():
        expected, got = dense(ids).logits, moe(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


# ================================================================================================================
# Exactness.
# ================================================================================================================


def test_dense_fixture_features_matter(dense_models):
    """The family features the exactness tests rely on actually change the dense logits (else the tests below
    could not catch a translation that drops them)."""
    ids = input_ids()
    _, mistral = dense_models["mistral_sliding"]
    full = MistralForCausalLM(MistralConfig(**{**mistral.config.to_dict(), "sliding_window": None})).eval()
    full.load_state_dict(mistral.state_dict())
    with torch.no_grad():
        assert (full(ids).logits - mistral(ids).logits).abs().max() > 1e-3
        _, qwen2 = dense_models["qwen2_bias"]
        assert qwen2.model.layers[0].self_attn.q_proj.bias.abs().max() > 0.05


@pytest.mark.parametrize("router_type", list(EXACT_ROUTERS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_copy_upcycle_is_exact(tmp_path, dense_models, family, router_type):
    src, dense = dense_models[family]
    out = upcycle(
        src,
        tmp_path / "moe",
        num_experts=4,
        top_k=2,
        router_type=router_type,
        progress=False,
        max_shard_size="30KB",
        require_exact=True,
        config_overrides=EXACT_ROUTERS[router_type],
    )
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert_same_logits(dense, out, input_ids())


@pytest.mark.parametrize("router_type", ["topk_softmax", "softmax_topk", "sigmoid_topk"])
@pytest.mark.parametrize("family", ["llama_tied", "qwen3_qknorm"])
def test_split_virtual_group_is_exact(tmp_path, dense_models, family, router_type):
    src, dense = dense_models[family]
    out = upcycle(
        src,
        tmp_path / "moe",
        num_experts=8,
        top_k=4,
        granularity=2,
        router_type=router_type,
        router_init="virtual-group",
        progress=False,
        require_exact=True,
        config_overrides=EXACT_ROUTERS[router_type],
    )
    config = json.loads((out / "config.json").read_text())
    assert config["moe_intermediate_size"] == 32 and config["num_experts"] == 8
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        router = f.get_tensor("model.layers.0.mlp.gate.weight")  # (E, H)
    assert torch.equal(router[0], router[1]) and not torch.equal(
        router[1], router[2]
    )  # groups of 2 share a row
    assert_same_logits(dense, out, input_ids())


def test_split_granularity_4_with_shared_experts_is_exact(tmp_path, dense_models):
    src, dense = dense_models["qwen2_bias"]
    out = upcycle(
        src,
        tmp_path / "moe",
        num_experts=8,
        top_k=4,
        granularity=4,
        num_shared_experts=4,
        progress=False,
        require_exact=True,
    )
    assert_same_logits(dense, out, input_ids())


@pytest.mark.parametrize("shared", [1, 2])
@pytest.mark.parametrize("family", ["llama_tied", "mistral_sliding"])
def test_shared_experts_are_exact(tmp_path, dense_models, family, shared):
    src, dense = dense_models[family]
    out = upcycle(
        src,
        tmp_path / "moe",
        num_experts=4,
        top_k=1,
        num_shared_experts=shared,
        progress=False,
        require_exact=True,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["num_shared_experts"] == shared and config["shared_expert_intermediate_size"] == 64 * shared
    assert_same_logits(dense, out, input_ids())


@pytest.mark.parametrize("moe_layers,expected", [("every-2", [1]), ("0", [0]), ([1], [1])])
def test_partial_moe_layers_are_exact(tmp_path, dense_models, moe_layers, expected):
    src, dense = dense_models["llama_bias"]
    out = upcycle(src, tmp_path / "moe", num_experts=4, top_k=2, moe_layers=moe_layers, progress=False)
    config = hf_moe.HfMoeConfig.from_pretrained(out)
    assert config.moe_layers == expected
    with CheckpointReader(out) as reader:
        for i in range(2):
            assert (f"model.layers.{i}.mlp.experts.gate_up_proj" in reader) == (i in expected)
            assert (f"model.layers.{i}.mlp.gate_proj.weight" in reader) == (i not in expected)
    assert_same_logits(dense, out, input_ids())


def test_non_exact_options_do_change_logits(tmp_path, dense_models):
    """Negative control: the exactness check above detects a non-function-preserving upcycle."""
    src, dense = dense_models["llama_tied"]
    ids = input_ids()
    cases = {
        "no_norm": dict(config_overrides={"norm_topk_prob": False}),
        "noise": dict(noise_std=0.5),
        "split_random_router": dict(num_experts=8, top_k=4, granularity=2, router_init="random"),
    }
    for name, kwargs in cases.items():
        kwargs = {"num_experts": 4, "top_k": 2, **kwargs}
        with pytest.raises(ValueError, match="require_exact"):
            upcycle(src, tmp_path / f"strict_{name}", progress=False, require_exact=True, **kwargs)
        assert_nothing_written(tmp_path / f"strict_{name}")
        out = upcycle(src, tmp_path / name, progress=False, **kwargs)
        with pytest.raises(AssertionError):
            assert_same_logits(dense, out, ids)
        provenance = json.loads((out / "hf_moe_provenance.json").read_text())
        assert provenance["function_preserving"] is False and provenance["not_function_preserving_because"]


def test_generation_identical_and_tied_embeddings_kept(tmp_path, dense_models):
    src, dense = dense_models["llama_tied"]
    out = upcycle(src, tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    with CheckpointReader(out) as reader:
        assert "lm_head.weight" not in reader
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert moe.config.tie_word_embeddings
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    ids = input_ids(6)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(dense.generate(ids, **kwargs), moe.generate(ids, **kwargs))


def test_output_folder_contents_and_remote_code(tmp_path, dense_models):
    src, dense = dense_models["qwen3_qknorm"]
    (src / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    try:
        out = upcycle(src, tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    finally:
        (src / "tokenizer_config.json").unlink()
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "configuration_hf_moe.py",
        "modeling_hf_moe.py",
        "hf_moe_provenance.json",
        "generation_config.json",
        "tokenizer_config.json",
    } <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hf_moe" and config["architectures"] == ["HfMoeForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hf_moe.HfMoeForCausalLM"
    assert config["text_config"]["model_type"] == "qwen3"  # the base decoder, q/k norm included
    provenance = json.loads((out / "hf_moe_provenance.json").read_text())
    assert provenance["method"] == "upcycle" and provenance["function_preserving"] is True
    assert provenance["options"]["num_experts"] == 4 and provenance["source"]["model_type"] == "qwen3"
    assert "tokenizer_config.json" in provenance["source"]["files_sha256"]
    assert any(name.startswith("model-") for name in provenance["source"]["files_sha256"])
    # trust_remote_code without hf_moe imported: only the files in the folder define the model.
    ids = input_ids(8).tolist()
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "assert 'hf_moe' not in sys.modules, 'hf_moe was imported'\n"
        f"print(json.dumps(m(torch.tensor({ids})).logits[0, -1, :5].tolist()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    remote = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        torch.testing.assert_close(remote, dense(torch.tensor(ids)).logits[0, -1, :5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "src_dtype,dtype,expected",
    [
        (torch.bfloat16, None, torch.bfloat16),
        (torch.float32, "bfloat16", torch.bfloat16),
        (torch.float32, "float16", torch.float16),
        (torch.bfloat16, "float32", torch.float32),
    ],
)
def test_dtype_preserved_or_converted(tmp_path, src_dtype, dtype, expected):
    src, dense = make_dense(tmp_path / "dense", "llama_tied", dtype=src_dtype)
    out = upcycle(src, tmp_path / "moe", num_experts=4, top_k=2, dtype=dtype, progress=False)
    with CheckpointReader(out) as reader:
        dtypes = {
            reader.dtype(name) for name in reader.keys() if not name.endswith("e_score_correction_bias")
        }
        assert dtypes == {expected}
        # conversion is a plain cast of the dense weights
        expected_embed = dense.model.embed_tokens.weight.detach().to(expected)
        assert torch.equal(reader.get_tensor("model.embed_tokens.weight"), expected_embed)
        expert0 = reader.get_tensor("model.layers.0.mlp.experts.down_proj")[0]
        assert torch.equal(expert0, dense.model.layers[0].mlp.down_proj.weight.detach().to(expected))
    assert json.loads((out / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")


# ================================================================================================================
# Expert initialisation ops.
# ================================================================================================================


def _dense_mlp(seed=0, inter=64, hidden=32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(inter, hidden, generator=g),
        torch.randn(inter, hidden, generator=g) * 2 + 0.5,
        torch.randn(hidden, inter, generator=g) * 0.5 - 0.1,
    )


def test_expert_weights_copy_and_split():
    gate, up, down = _dense_mlp()
    gate_up, d = expert_weights(gate, up, down, num_experts=3)
    assert gate_up.shape == (3, 128, 32) and d.shape == (3, 32, 64)
    for e in range(3):
        assert torch.equal(gate_up[e], torch.cat([gate, up])) and torch.equal(d[e], down)
    gate_up, d = expert_weights(gate, up, down, num_experts=8, granularity=4, down_scale=4.0)
    assert gate_up.shape == (8, 32, 32) and d.shape == (8, 32, 16)
    for e in range(8):
        j = e % 4
        assert torch.equal(gate_up[e], torch.cat([gate[16 * j : 16 * (j + 1)], up[16 * j : 16 * (j + 1)]]))
        assert torch.equal(d[e], down[:, 16 * j : 16 * (j + 1)] * 4.0)
    # one virtual group (experts 0..3) with router weight 1/4 each reproduces the dense MLP
    x = torch.randn(5, 32)
    dense_out = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    moe_out = sum(
        0.25 * (torch.nn.functional.silu(x @ gate_up[e, :16].T) * (x @ gate_up[e, 16:].T)) @ d[e].T
        for e in range(4)
    )
    torch.testing.assert_close(moe_out, dense_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of granularity"):
        expert_weights(gate, up, down, num_experts=6, granularity=4)
    with pytest.raises(ValueError, match="divide the intermediate size"):
        expert_weights(gate, up, down, num_experts=6, granularity=3)


def test_shared_expert_weights_cycle_slices():
    gate, up, down = _dense_mlp()
    sg, su, sd = shared_expert_weights(gate, up, down, width=128, granularity=2, down_scale=0.25)
    assert torch.equal(sg, torch.cat([gate, gate])) and torch.equal(su, torch.cat([up, up]))
    assert torch.equal(sd, torch.cat([down, down], dim=1) * 0.25)


@pytest.mark.parametrize("drop_ratio", [0.25, 0.5, 0.9])
def test_drop_upcycle_reinitialises_the_specified_units(drop_ratio):
    gate, up, down = _dense_mlp(inter=256, hidden=64)
    gate_up, d = expert_weights(gate, up, down, num_experts=4)
    new_gu, new_d, dropped = drop_upcycle(
        gate_up, d, drop_ratio=drop_ratio, generator=seeded_generator(0, "t")
    )
    width = 256
    n = round(drop_ratio * width)
    assert dropped.shape == (4, n)
    assert torch.equal(gate_up, expert_weights(gate, up, down, num_experts=4)[0])  # inputs untouched
    for e in range(4):
        idx = dropped[e]
        assert len(set(idx.tolist())) == n
        keep = torch.ones(width, dtype=torch.bool)
        keep[idx] = False
        # kept units equal the original exactly; dropped units all differ
        assert torch.equal(new_gu[e, :width][keep], gate[keep]) and torch.equal(
            new_gu[e, width:][keep], up[keep]
        )
        assert torch.equal(new_d[e][:, keep], down[:, keep])
        changed = (
            (new_gu[e, :width] != gate).any(dim=1)
            | (new_gu[e, width:] != up).any(dim=1)
            | (new_d[e] != down).any(dim=0)
        )
        assert torch.equal(changed, ~keep)
        # re-initialised values follow the original matrices' mean/std
        for fresh, orig in (
            (new_gu[e, :width][idx], gate),
            (new_gu[e, width:][idx], up),
            (new_d[e][:, idx], down),
        ):
            assert abs(fresh.mean() - orig.mean()) < 0.1 * orig.std() + 0.02
            assert abs(fresh.std() / orig.std() - 1) < 0.1
    # different subsets per expert
    assert len({tuple(dropped[e].tolist()) for e in range(4)}) == 4
    # reproducible with the seed, different with another
    again = drop_upcycle(gate_up, d, drop_ratio=drop_ratio, generator=seeded_generator(0, "t"))
    other = drop_upcycle(gate_up, d, drop_ratio=drop_ratio, generator=seeded_generator(1, "t"))
    assert torch.equal(again[0], new_gu) and torch.equal(again[1], new_d) and torch.equal(again[2], dropped)
    assert not torch.equal(other[2], dropped) and not torch.equal(other[0], new_gu)


def test_noise_is_relative_to_each_matrix_std():
    gate, up, down = _dense_mlp(inter=256, hidden=64)
    gate_up, d = expert_weights(gate, up, down, num_experts=2)
    noisy_gu, noisy_d = add_relative_noise(gate_up, d, noise_std=0.1, generator=seeded_generator(0, "n"))
    for e in range(2):
        for new, orig in ((noisy_gu[e, :256], gate), (noisy_gu[e, 256:], up), (noisy_d[e], down)):
            ratio = (new - orig).std() / orig.std()
            assert 0.09 < ratio < 0.11
            assert abs((new - orig).mean()) < 0.01 * orig.std()
    assert not torch.equal(noisy_gu[0], noisy_gu[1])  # experts get different noise
    again = add_relative_noise(gate_up, d, noise_std=0.1, generator=seeded_generator(0, "n"))
    assert torch.equal(again[0], noisy_gu) and torch.equal(again[1], noisy_d)


def test_upcycle_drop_and_noise_reproducible_with_seed(tmp_path, dense_models):
    src, _ = dense_models["llama_tied"]
    kwargs = dict(num_experts=4, top_k=2, drop_ratio=0.5, noise_std=0.01, progress=False)
    a = upcycle(src, tmp_path / "a", seed=3, **kwargs)
    b = upcycle(src, tmp_path / "b", seed=3, **kwargs)
    c = upcycle(src, tmp_path / "c", seed=4, **kwargs)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    with CheckpointReader(a) as ra, CheckpointReader(b) as rb, CheckpointReader(c) as rc:
        for key in ra.keys():
            assert torch.equal(ra.get_tensor(key), rb.get_tensor(key)), key
        assert not torch.equal(ra.get_tensor(name), rc.get_tensor(name))
        experts = ra.get_tensor(name)  # (E, 2I, H)
        dense_gate = CheckpointReader(src).get_tensor("model.layers.1.mlp.gate_proj.weight")
        for e in range(
            4
        ):  # half of each expert's 64 units re-initialised (noise touches all, so compare loosely)
            far = ((experts[e, :64] - dense_gate).abs().max(dim=1).values > 0.05).sum().item()
            assert 28 <= far <= 32
        assert not torch.equal(experts[0], experts[1])


# ================================================================================================================
# Config translation and option parsing.
# ================================================================================================================


def test_parse_moe_layers():
    assert parse_moe_layers("all", 4) == [0, 1, 2, 3]
    assert parse_moe_layers("every-2", 6) == [1, 3, 5]
    assert parse_moe_layers("0-2", 30) == [0, 1, 2]
    assert parse_moe_layers("0,2,4-5", 8) == [0, 2, 4, 5]
    assert parse_moe_layers([3, 1, 1], 4) == [1, 3]
    for bad, match in (
        ("0-11", "layers 0..3"),
        ("sometimes", "cannot parse"),
        ([], "selects no layer"),
        ("3-1", "reversed"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_moe_layers(bad, 4)


def test_translate_config_options():
    """The dense config becomes the base decoder's config as transformers parses it; options hf_moe cannot hold are
    refused naming them."""
    llama = translate_config(LlamaConfig(**SMALL, attention_bias=True).to_dict())["text_config"]
    assert isinstance(llama, LlamaConfig) and llama.attention_bias and llama.architectures is None
    sliding = translate_config(
        Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=7, max_window_layers=1).to_dict()
    )["text_config"]
    assert (
        sliding.layer_types
        == Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=7, max_window_layers=1).layer_types
    )  # mixed windows kept
    with pytest.raises(ValueError, match="mlp_bias"):
        translate_config(LlamaConfig(**SMALL, mlp_bias=True).to_dict())
    with pytest.raises(ValueError, match="not gated"):
        translate_config({"model_type": "starcoder2"})
    # legacy (transformers 4) rope fields
    legacy = {
        **LlamaConfig(**SMALL).to_diff_dict(),
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    legacy.pop("rope_parameters", None)
    rope = translate_config(legacy)["text_config"].rope_parameters
    assert rope["rope_theta"] == 500000.0 and rope["rope_type"] == "linear" and rope["factor"] == 4.0


# ================================================================================================================
# Bad input: a clear error and nothing written.
# ================================================================================================================


def _copytree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


BAD_INPUTS = {
    "missing_config": (lambda p: (p / "config.json").unlink(), FileNotFoundError, "config.json"),
    "missing_shard": (
        lambda p: sorted(p.glob("model-*.safetensors"))[1].unlink(),
        FileNotFoundError,
        "missing",
    ),
    "truncated_shard": (
        lambda p: (lambda f: f.write_bytes(f.read_bytes()[:-64]))(sorted(p.glob("model-*.safetensors"))[-1]),
        ValueError,
        "truncated",
    ),
    "index_outside": (
        lambda p: (p / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "weight_map": {
                        **json.loads((p / "model.safetensors.index.json").read_text())["weight_map"],
                        "model.norm.weight": "../elsewhere/model.safetensors",
                    }
                }
            )
        ),
        ValueError,
        "outside",
    ),
    "shape_mismatch": (
        lambda p: _edit_config(p, intermediate_size=48),
        ValueError,
        "does not match|do not match",
    ),
    "hidden_mismatch": (lambda p: _edit_config(p, hidden_size=40, head_dim=8), ValueError, "match"),
    "unsupported_arch": (
        lambda p: _edit_config(p, model_type="mamba"),
        ValueError,
        r"unsupported source architecture.*gemma3_text, .*llama, .*phi3, .*qwen3",
    ),
    "pickle_only": (
        lambda p: ([f.unlink() for f in p.glob("model*")], torch.save({}, p / "pytorch_model.bin")),
        ValueError,
        r"pickle.*save_pretrained",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_clear_error_nothing_written(tmp_path, dense_models, case):
    src = _copytree(dense_models["llama_tied"][0], tmp_path / "src")
    damage, error, match = BAD_INPUTS[case]
    damage(src)
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    out = tmp_path / "out" / "moe"
    with pytest.raises(error, match=match):
        upcycle(src, out, num_experts=4, top_k=2, progress=False)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before  # inputs untouched


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=4, top_k=2, granularity=3), "granularity"),
        (dict(num_experts=6, top_k=2, granularity=3), "granularity=3 must divide"),
        (dict(num_experts=4, top_k=2, router_init="magic"), "unknown router_init"),
        (dict(num_experts=4, top_k=2, dtype="float8"), "dtype"),
        (dict(num_experts=4, top_k=2, router_type="nope"), "router_type"),
        (dict(num_experts=4, top_k=2, drop_ratio=1.5), "drop_ratio"),
    ],
)
def test_bad_options(tmp_path, dense_models, kwargs, match):
    out = tmp_path / "moe"
    with pytest.raises(ValueError, match=match):
        upcycle(dense_models["llama_tied"][0], out, progress=False, **kwargs)
    assert_nothing_written(out)


def test_existing_out_dir_and_overwrite(tmp_path, dense_models):
    src, dense = dense_models["llama_tied"]
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        upcycle(src, out, num_experts=4, top_k=2, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # a failing overwrite keeps the old folder
    with pytest.raises(ValueError):
        upcycle(src, out, num_experts=4, top_k=2, granularity=3, overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    upcycle(src, out, num_experts=4, top_k=2, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]
    assert_same_logits(dense, out, input_ids())


def test_prompts_router_init_is_a_registry_hook(tmp_path, dense_models):
    from hf_moe.conversion.init import ROUTER_INITS

    assert {"random", "virtual-group", "prompts"} <= set(ROUTER_INITS)
    out = tmp_path / "moe"
    # The entry is implemented in hf_moe.conversion.prompts (tests/conversion/test_prompts.py); without prompts it
    # refuses before writing anything.
    with pytest.raises(ValueError, match="needs prompts"):
        upcycle(
            dense_models["llama_tied"][0], out, num_experts=4, top_k=2, router_init="prompts", progress=False
        )
    assert_nothing_written(out)


# ================================================================================================================
# CLI and process kill.
# ================================================================================================================


def test_cli_upcycle(tmp_path, dense_models, capsys):
    assert hf_moe.upcycle is upcycle  # the public lazy name
    src, dense = dense_models["mistral_sliding"]
    out = tmp_path / "moe"
    argv = [
        "upcycle",
        str(src),
        str(out),
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--router",
        "topk_softmax",
        "--moe-layers",
        "every-2",
        "--shared-experts",
        "1",
        "--max-shard-size",
        "30KB",
        "--no-progress",
        "--require-exact",
    ]
    assert cli_main(argv) == 0
    assert str(out) in capsys.readouterr().out
    assert hf_moe.HfMoeConfig.from_pretrained(out).moe_layers == [1]
    assert_same_logits(dense, out, input_ids())
    assert cli_main(argv) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert cli_main(argv + ["--overwrite"]) == 0
    assert cli_main(["upcycle", str(src), str(tmp_path / "x"), "--num-experts", "2", "--top-k", "3"]) == 2
    assert "top_k" in capsys.readouterr().err
    assert_nothing_written(tmp_path / "x")


def test_sigkill_mid_conversion_leaves_no_out_dir(tmp_path, dense_models):
    src, _ = dense_models["llama_tied"]
    out = tmp_path / "moe"
    # The CLI in a child process, slowed down by a sleep before every tensor write so it can be killed mid-way.
    code = (
        "import sys, time\n"
        "import hf_moe.conversion.io as io\n"
        "add = io.ShardWriter.add\n"
        "def slow_add(self, name, tensor):\n"
        "    time.sleep(0.3)\n"
        "    return add(self, name, tensor)\n"
        "io.ShardWriter.add = slow_add\n"
        "from hf_moe.cli import main\n"
        f"sys.exit(main(['upcycle', {str(src)!r}, {str(out)!r}, '--num-experts', '4', '--top-k', '2', "
        "'--max-shard-size', '10KB', '--no-progress']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    temp = None
    while time.monotonic() < deadline:  # wait until the child has written at least one shard
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".moe.tmp-")]
        if temps and len(list(temps[0].glob(".model-*.partial"))) >= 2:
            temp = temps[0]
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    assert temp is not None, "the conversion never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert temp.exists() and temp.name.startswith(".moe.tmp-")  # clearly temporary; cleaned by the next run
    upcycle(src, out, num_experts=4, top_k=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


# ================================================================================================================
# Real weights: SmolLM2-135M.
# ================================================================================================================


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir, shakespeare_heldout_text) -> dict:
    """Dense SmolLM2-135M logits on 128 held-out Shakespeare tokens and its 20-token greedy continuation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer(shakespeare_heldout_text[5000:20000], return_tensors="pt").input_ids[:, :128]
    assert ids.shape[1] == 128
    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = dense(ids).logits
        generated = dense.generate(ids[:, :32], max_new_tokens=20, do_sample=False)
        # The dense model's own float32 rounding noise, for context: the same weights with eager attention.
        dense.set_attn_implementation("eager")
        noise_floor = (dense(ids).logits - logits).abs().max().item()
    return {"ids": ids, "logits": logits, "generated": generated, "noise_floor": noise_floor}


@pytest.mark.slow
@pytest.mark.parametrize("num_experts", [4, 8])
def test_smollm2_upcycle_matches_dense(tmp_path, smollm2_dir, smollm2_reference, num_experts):
    ids = smollm2_reference["ids"]
    out = upcycle(
        smollm2_dir, tmp_path / "moe", num_experts=num_experts, top_k=2, progress=False, require_exact=True
    )
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert moe.config.num_experts == num_experts and len(moe.config.moe_layers) == 30
    with torch.no_grad():
        got = moe(ids).logits
        generated = moe.generate(ids[:, :32], max_new_tokens=20, do_sample=False)
    diff = (got - smollm2_reference["logits"]).abs().max().item()
    floor = smollm2_reference["noise_floor"]
    print(
        f"SmolLM2-135M -> {num_experts} experts: max |logit diff| = {diff:.3g} over {ids.shape[1]} tokens "
        f"(dense sdpa vs eager: {floor:.3g})"
    )
    assert diff <= 1e-4, (
        f"max |logit diff| {diff:.4g} > 1e-4 (the dense model's sdpa-vs-eager difference is {floor:.3g})"
    )
    assert torch.equal(generated, smollm2_reference["generated"])


def test_router_init_registry_entry_is_used(tmp_path, dense_models, monkeypatch):
    """A new router initialisation is a registry entry (how the prompts-based init plugs in)."""
    from hf_moe.conversion.init import ROUTER_INITS, RouterInitContext

    seen: list[RouterInitContext] = []

    def layer_index_rows(context: RouterInitContext):
        seen.append(context)
        return lambda layer_idx: torch.full((context.num_experts, context.hidden_size), float(layer_idx + 1))

    monkeypatch.setitem(ROUTER_INITS, "layer-index", layer_index_rows)
    src, _ = dense_models["llama_tied"]
    out = upcycle(src, tmp_path / "moe", num_experts=4, top_k=2, router_init="layer-index", progress=False)
    assert len(seen) == 1 and seen[0].moe_layers == [0, 1] and seen[0].src_dir == src
    with CheckpointReader(out) as reader:
        for i in range(2):
            assert torch.equal(
                reader.get_tensor(f"model.layers.{i}.mlp.gate.weight"), torch.full((4, 32), i + 1.0)
            )
