"""The conversion core (hf_moe.conversion.core) on its own: the pieces every conversion shares."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_moe.conversion.core import (
    CheckpointSink,
    check_tensors,
    expected_tensors,
    parse_dtype,
    remote_code_files,
    save_hf_moe_config,
    unchanged_or_cast,
)
from hf_moe.conversion.io import CheckpointReader, ShardWriter, StoredTensor
from tests.helpers.dense import make_dense_llama
from tests.helpers.tiny import tiny_config, tiny_model


@pytest.mark.parametrize(
    ("given", "dtype"),
    [("bf16", torch.bfloat16), ("torch.float16", torch.float16), ("FP32", torch.float32), (None, None)],
)
def test_parse_dtype_accepts_names_and_aliases(given, dtype):
    assert parse_dtype(given) is dtype


@pytest.mark.parametrize("given", ["float64", torch.float64, "int8", "fp8"])
def test_parse_dtype_refuses_what_a_checkpoint_cannot_take(given):
    with pytest.raises(ValueError, match="float32, bfloat16"):
        parse_dtype(given)


@pytest.mark.parametrize("overrides", [{}, {"num_shared_experts": 1}, {"router_type": "noisy_topk"}])
def test_expected_tensors_are_the_models_state_dict(overrides):
    config = tiny_config(**overrides)
    model = tiny_model(**overrides)
    expected = expected_tensors(config)
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    assert expected == state
    assert expected["model.layers.0.mlp.experts.gate_up_proj"] == (4, 32, 32)  # (E, 2I, H)


def test_check_tensors_names_missing_unexpected_and_wrong_shapes():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    check_tensors(dict(expected), expected, "ok")  # equal: no error
    with pytest.raises(ValueError) as err:
        check_tensors({"a": (3, 2), "b": (4,), "d": (1,)}, expected, "ckpt")
    message = str(err.value)
    assert "missing: ['c']" in message and "unexpected: ['d']" in message and "wrong shape: ['a']" in message


def _layer_parts(config, seed: int = 0):
    torch.manual_seed(seed)
    num_experts, inter, hidden = config.num_experts, config.moe_intermediate_size, config.hidden_size
    gate_up = [torch.randn(2 * inter, hidden) for _ in range(num_experts)]
    down = [torch.randn(hidden, inter) for _ in range(num_experts)]
    return gate_up, down, torch.randn(num_experts, hidden)


def test_sink_writes_a_layer_and_refuses_an_incomplete_checkpoint(tmp_path):
    config = tiny_config(router_type="sigmoid_topk", n_group=2, topk_group=1, routed_scaling_factor=1.0)
    expected = expected_tensors(config)
    gate_up, down, router = _layer_parts(config)
    with ShardWriter(tmp_path) as writer:
        sink = CheckpointSink(writer, expected)
        sink.write_moe_layer(0, gate_up=gate_up, down=down, router=router, shared=None, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="missing"):
            sink.check_complete("test")
    tensors = load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.0.mlp."
    assert torch.equal(tensors[prefix + "experts.gate_up_proj"], torch.stack(gate_up).bfloat16())
    assert torch.equal(tensors[prefix + "experts.down_proj"], torch.stack(down).bfloat16())
    assert torch.equal(tensors[prefix + "gate.weight"], router.bfloat16())
    # The router state the config has (DeepSeek-V3's correction bias) starts at zero and stays float32.
    bias = tensors[prefix + "gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and not bias.any()


def test_sink_refuses_a_tensor_the_config_does_not_have(tmp_path):
    with ShardWriter(tmp_path) as writer:
        sink = CheckpointSink(writer, {"x": (1,)})
        sink.add("x", torch.zeros(1))
        sink.add("y", torch.zeros(1))
        with pytest.raises(ValueError, match="unexpected \\['y'\\]"):
            sink.check_complete("test")


def test_remote_code_is_the_modeling_file_and_what_it_imports():
    names = {path.name for path in remote_code_files()}
    assert {"modeling_hf_moe.py", "configuration_hf_moe.py", "experts.py"} <= names
    assert all(path.is_file() for path in remote_code_files())


def test_saved_config_loads_through_remote_code_without_hf_moe(tmp_path):
    """What finish_checkpoint writes for an hf_moe config is enough for AutoConfig(trust_remote_code=True) in a
    process where `import hf_moe` fails."""
    save_hf_moe_config(tiny_config(), tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"].startswith("configuration_hf_moe.")
    script = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def guarded(name, *a, **k):\n"
        "    if name == 'hf_moe' or name.startswith('hf_moe.'):\n"
        "        raise ImportError('hf_moe blocked')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guarded\n"
        "from transformers import AutoConfig\n"
        f"config = AutoConfig.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        "print(type(config).__name__, config.num_experts)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["HfMoeConfig", "4"]


@pytest.mark.parametrize(
    ("dtype", "stored"),
    [(None, True), (torch.float32, True), (torch.bfloat16, False), (torch.float16, False)],
)
def test_unchanged_or_cast_hands_over_stored_bytes_only_when_nothing_changes(tmp_path, dtype, stored):
    """A copy whose dtype stays becomes a file range (copied without loading); a cast loads and casts. Routing
    biases (`e_score_correction_bias`) stay float32 whatever the dtype. The written checkpoint is the same either
    way."""
    src = tmp_path / "dense"
    make_dense_llama(src, randomised=True, tokenizer=False)
    name = "model.embed_tokens.weight"
    out = tmp_path / "out"
    out.mkdir()
    with CheckpointReader(src) as reader:
        assert reader.dtype(name) == torch.float32
        got = unchanged_or_cast(reader, name, name, dtype)
        assert isinstance(got, StoredTensor) is stored
        bias = unchanged_or_cast(
            reader, name, "model.layers.0.mlp.gate.e_score_correction_bias", torch.bfloat16
        )
        assert isinstance(bias, StoredTensor)  # float32 source, float32 rule: unchanged
        with ShardWriter(out) as writer:
            writer.add(name, got)
        source = reader.get_tensor(name)
    written = load_file(out / "model.safetensors")[name]
    assert written.dtype == (dtype or torch.float32)
    assert torch.equal(written, source.to(written.dtype))
