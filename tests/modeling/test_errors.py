"""Bad configs and bad checkpoints fail loudly, naming the problem; registration is idempotent."""

import importlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaModel

import hf_moe
from hf_moe import HfMoeConfig, HfMoeForCausalLM, HfMoeModel
from tests.helpers.tiny import TINY, tiny_model

SWITCH = {"router_type": "switch", "num_experts_per_tok": 1}
SIGMOID = {"router_type": "sigmoid_topk"}

# (case id, overrides on the tiny config, the field the message must name)
INVALID_CONFIGS = [
    ("top_k_over_experts", {"num_experts": 4, "num_experts_per_tok": 5}, "num_experts_per_tok"),
    ("top_k_zero", {"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ("no_experts", {"num_experts": 0, "num_experts_per_tok": 0}, "num_experts"),
    ("unknown_router", {"router_type": "hash"}, "router_type"),
    ("capacity_zero", {**SWITCH, "capacity_factor": 0.0}, "capacity_factor"),
    ("capacity_negative", {**SWITCH, "capacity_factor": -1.0}, "capacity_factor"),
    (
        "capacity_on_dropless_router",
        {"router_type": "softmax_topk", "capacity_factor": 1.25},
        "capacity_factor",
    ),
    ("capacity_on_sigmoid_router", {**SIGMOID, "capacity_factor": 1.25}, "capacity_factor"),
    ("switch_top2", {"router_type": "switch", "num_experts_per_tok": 2}, "num_experts_per_tok"),
    ("expert_choice_with_cache", {"router_type": "expert_choice", "use_cache": True}, "use_cache"),
    ("n_group_not_dividing", {**SIGMOID, "n_group": 3}, "n_group"),
    ("n_group_zero", {**SIGMOID, "n_group": 0}, "n_group"),
    ("topk_group_over_n_group", {**SIGMOID, "n_group": 2, "topk_group": 3}, "topk_group"),
    ("topk_group_zero", {**SIGMOID, "n_group": 2, "topk_group": 0}, "topk_group"),
    (
        "groups_too_small_for_k",
        {**SIGMOID, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 3},
        "topk_group",
    ),
    ("groups_on_softmax_router", {"router_type": "softmax_topk", "n_group": 2}, "n_group"),
    ("negative_aux_coef", {"router_aux_loss_coef": -0.01}, "router_aux_loss_coef"),
    ("negative_z_coef", {"router_z_loss_coef": -1.0}, "router_z_loss_coef"),
    ("negative_jitter", {"router_jitter_noise": -0.1}, "router_jitter_noise"),
    ("mlp_only_layer_too_big", {"mlp_only_layers": [2]}, "mlp_only_layers"),
    ("mlp_only_layer_negative", {"mlp_only_layers": [-1]}, "mlp_only_layers"),
    ("first_k_dense_too_big", {"first_k_dense_replace": 3}, "first_k_dense_replace"),
    ("sparse_step_zero", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("bias_update_on_softmax_router", {"router_bias_update_rate": 0.01}, "router_bias_update_rate"),
    ("bias_update_negative", {**SIGMOID, "router_bias_update_rate": -0.01}, "router_bias_update_rate"),
    ("bias_update_mode_unknown", {**SIGMOID, "router_bias_update": "epoch"}, "router_bias_update"),
    ("routed_scaling_zero", {**SIGMOID, "routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ("shared_gate_without_shared", {"shared_expert_gate": True}, "shared_expert_gate"),
    ("negative_shared_experts", {"num_shared_experts": -1}, "num_shared_experts"),
    (
        "shared_width_zero",
        {"num_shared_experts": 1, "shared_expert_intermediate_size": 0},
        "shared_expert_intermediate_size",
    ),
    ("moe_width_zero", {"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ("kv_heads_not_dividing", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("sliding_window_zero", {"sliding_window": 0}, "sliding_window"),
    ("hidden_size_zero", {"hidden_size": 0}, "hidden_size"),
]


@pytest.mark.parametrize(
    "overrides, field", [c[1:] for c in INVALID_CONFIGS], ids=[c[0] for c in INVALID_CONFIGS]
)
def test_invalid_config_raises_naming_the_field(overrides, field):
    # Decoder fields belong to the base config and are named with its prefix (`text_config.num_key_value_heads`).
    with pytest.raises(ValueError, match=rf"`(text_config\.)?{field}`"):
        HfMoeConfig(**{**TINY, **overrides})
    # Through the Auto API too.
    # Decoder fields belong to the base config and are named with its prefix (`text_config.num_key_value_heads`).
    with pytest.raises(ValueError, match=rf"`(text_config\.)?{field}`"):
        AutoConfig.for_model("hf_moe", **{**TINY, **overrides})


def test_unknown_router_message_lists_the_options():
    with pytest.raises(ValueError) as info:
        HfMoeConfig(**{**TINY, "router_type": "hash"})
    for name in ("topk_softmax", "softmax_topk", "sigmoid_topk", "noisy_topk", "switch", "expert_choice"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    "edge",
    [
        {"num_experts_per_tok": 4},  # k == E
        {**SWITCH, "capacity_factor": 0.01},
        {"router_type": "expert_choice", "use_cache": False, "capacity_factor": 4.0},  # factor == E
        {"first_k_dense_replace": 2},  # every layer dense is allowed
        {**SIGMOID, "n_group": 2, "topk_group": 2, "router_bias_update_rate": 0.001},
    ],
)
def test_valid_edge_configs_are_accepted(edge):
    config = HfMoeConfig(**{**TINY, **edge})  # no error, and the values are kept as given
    assert {key: getattr(config, key) for key in edge} == edge


# --- bad checkpoints ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    tiny_model(seed=0).save_pretrained(path)
    return path


def _tamper(saved, tmp_path, edit) -> str:
    out = tmp_path / "bad"
    shutil.copytree(saved, out)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return str(out)


MISSING = "model.layers.1.mlp.gate.weight"
BAD_CHECKPOINTS = {
    "missing": (lambda t: t.pop(MISSING), "missing_keys", MISSING),
    "unexpected": (
        lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2, 2)),
        "unexpected_keys",
        "model.layers.0.mlp.extra.weight",
    ),
    "wrong_shape": (
        lambda t: t.__setitem__("model.layers.0.mlp.experts.down_proj", torch.zeros(4, 32, 8)),
        "mismatched_keys",
        "model.layers.0.mlp.experts.down_proj",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_raises_and_strict_false_loads(case, saved, tmp_path):
    edit, kind, key = BAD_CHECKPOINTS[case]
    path = _tamper(saved, tmp_path, edit)
    for loader in (HfMoeForCausalLM, AutoModelForCausalLM):
        with pytest.raises(ValueError) as info:
            loader.from_pretrained(path)
        message = str(info.value)
        assert kind in message and key in message and "strict=False" in message
    extra = {"ignore_mismatched_sizes": True} if case == "wrong_shape" else {}
    model, loading_info = HfMoeForCausalLM.from_pretrained(
        path, strict=False, output_loading_info=True, **extra
    )
    assert any(key in str(k) for k in loading_info[kind])
    # Every other tensor is the file's; the named one is re-initialised at the model's own shape.
    good, state = load_file(saved / "model.safetensors"), model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in good.items() if name != key)
    assert key not in state or state[key].shape == good[key].shape
    if case == "wrong_shape":
        # strict, but an explicit ignore_mismatched_sizes=True accepts the re-initialised tensor.
        reloaded = HfMoeForCausalLM.from_pretrained(path, ignore_mismatched_sizes=True)
        assert reloaded.state_dict()[key].shape == good[key].shape


def test_good_checkpoint_loads_strictly_with_loading_info(saved):
    model, info = HfMoeForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    assert all(torch.equal(state[name], t) for name, t in load_file(saved / "model.safetensors").items())


def test_missing_checkpoint_folder_raises(tmp_path):
    with pytest.raises(OSError):  # transformers' own error (EnvironmentError) for a folder without weights
        HfMoeForCausalLM.from_pretrained(tmp_path / "nowhere")


# --- registration -------------------------------------------------------------------------------------------


def test_registration_is_idempotent():
    hf_moe.register()
    hf_moe.register()
    importlib.reload(hf_moe)  # re-runs the import-time register()
    config = AutoConfig.for_model("hf_moe", **TINY)
    assert type(config).__name__ == "HfMoeConfig"
    assert config.model_type == "hf_moe"
    assert type(AutoModelForCausalLM.from_config(config)).__name__ == "HfMoeForCausalLM"
    assert type(AutoModel.from_config(config)).__name__ == "HfMoeModel"


def test_auto_config_for_model():
    config = AutoConfig.for_model("hf_moe", **{**TINY, "num_experts": 8, "router_type": "topk_softmax"})
    assert isinstance(config, HfMoeConfig)
    assert (config.num_experts, config.router_type) == (8, "topk_softmax")
    assert config.num_local_experts == 8  # transformers' alias
    model = AutoModelForCausalLM.from_config(config)
    # The decoder is the base family's own (Llama here), presented as the hf_moe base model.
    assert isinstance(model, HfMoeForCausalLM) and isinstance(model.model, HfMoeModel)
    assert (
        isinstance(model.model.hf_moe_base, LlamaModel)
        and model.model.layers is model.model.hf_moe_base.layers
    )
    assert isinstance(AutoModel.from_config(config), HfMoeModel)


def test_from_pretrained_names_the_file_of_a_broken_shard_and_refuses_outside_index(tmp_path):
    import json

    model = tiny_model()
    model.save_pretrained(tmp_path / "ok", max_shard_size="20KB")
    index = json.loads((tmp_path / "ok" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]

    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "ok", truncated)
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{shard}: truncated"):
        HfMoeForCausalLM.from_pretrained(truncated)

    garbled = tmp_path / "garbled"
    shutil.copytree(tmp_path / "ok", garbled)
    (garbled / shard).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    with pytest.raises(ValueError, match=f"{shard}: garbled safetensors header"):
        HfMoeForCausalLM.from_pretrained(garbled)

    outside = tmp_path / "outside"
    shutil.copytree(tmp_path / "ok", outside)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../ok/" + shard
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        HfMoeForCausalLM.from_pretrained(outside)
