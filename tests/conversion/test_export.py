"""Export to native MoE architectures and import back: transformers' own classes load the export with no missing or
unexpected keys and give the hf_moe logits; import(export(x)) == x; unrepresentable configs and bad inputs are
refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_moe
from hf_moe import HfMoeForCausalLM
from hf_moe.cli import main
from hf_moe.conversion.export import export, import_native
from hf_moe.conversion.io import sha256_file
from hf_moe.conversion.native import SPECS, TARGETS, compatible_targets, representability_problems
from tests.helpers.native import build_tiny_for_target, tiny_target_config

INPUT_IDS = torch.tensor([[1, 5, 17, 42, 8, 93, 23, 4, 61, 11, 7], [1, 88, 3, 3, 64, 12, 29, 50, 9, 70, 2]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=INPUT_IDS, attention_mask=torch.ones_like(INPUT_IDS)).logits


def _load_native(out: Path, target: str) -> torch.nn.Module:
    cls = getattr(transformers, SPECS[target].architecture)
    model, info = cls.from_pretrained(out, output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), f"{key}: {info[key]}"
    assert type(model) is cls
    return model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if name in p.name]


# --- every target: transformers loads it and computes the same logits ------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_export_matches_transformers_native_class(tmp_path, target):
    src = build_tiny_for_target(target, tmp_path / "src")
    out = export(src, tmp_path / "out", to=target)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == target and config["architectures"] == [SPECS[target].architecture]
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    spec = SPECS[target]
    moe_layer = hf_moe.HfMoeConfig.from_pretrained(src).moe_layers[0]
    gate_name = spec.expert_names[0]
    # The Hub layout, one tensor per expert, which vLLM's loaders and transformers' conversion mapping read.
    assert f"model.layers.{moe_layer}.{spec.moe_prefix}.experts.3.{gate_name}.weight" in names
    assert not any("gate_up_proj" in n for n in names)

    native = _load_native(out, target)
    torch.testing.assert_close(_logits(native), _logits(HfMoeForCausalLM.from_pretrained(src)))
    assert (out / "README.md").is_file()
    assert json.loads((out / "hf_moe_provenance.json").read_text())["method"] == "export"


@pytest.mark.parametrize("target", TARGETS)
def test_round_trip_is_exact(tmp_path, target):
    src = build_tiny_for_target(target, tmp_path / "src", seed=3)
    back = import_native(export(src, tmp_path / "native", to=target), tmp_path / "back")
    before, after = _tensors(src), _tensors(back)
    assert set(before) == set(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    a, b = hf_moe.HfMoeConfig.from_pretrained(src), hf_moe.HfMoeConfig.from_pretrained(back)
    assert a.moe_layers == b.moe_layers
    # The imported model's base decoder is the native architecture's own (e.g. qwen3 -> qwen3_moe).
    assert b.get_text_config().model_type == target
    for field in (
        "router_type",
        "num_experts",
        "num_experts_per_tok",
        "norm_topk_prob",
        "num_shared_experts",
        "shared_expert_intermediate_size",
        "shared_expert_gate",
        "n_group",
        "topk_group",
        "routed_scaling_factor",
        "hidden_size",
        "num_hidden_layers",
        "rope_parameters",
    ):
        if field == "norm_topk_prob" and a.router_type != b.router_type:
            continue  # topk_softmax imports as the equivalent renormalised softmax_topk
        assert getattr(a, field) == getattr(b, field), field
    # The imported checkpoint is a complete hf_moe folder: strict load (no missing keys), auto_map, model card.
    torch.testing.assert_close(
        _logits(HfMoeForCausalLM.from_pretrained(back)),
        _logits(HfMoeForCausalLM.from_pretrained(src)),
        rtol=0,
        atol=0,
    )
    assert "auto_map" in json.loads((back / "config.json").read_text())
    assert (back / "modeling_hf_moe.py").is_file() and (back / "README.md").is_file()


# Configs that are exported through an exact rewrite rather than a one-to-one copy.
EQUIVALENT_CASES = {
    # Qwen2-MoE always gates its shared expert: zero gate + doubled down_proj.
    "qwen2_moe-ungated": ("qwen2_moe", {"shared_expert_gate": False}),
    # ... and always has one: a Qwen2 upcycle without shared experts gets one of width 1 whose output is zero.
    "qwen2_moe-no-shared": (
        "qwen2_moe",
        {"num_shared_experts": 0, "shared_expert_intermediate_size": None, "shared_expert_gate": False},
    ),
    # noisy_topk adds noise in training only.
    "mixtral-noisy_topk": ("mixtral", {"router_type": "noisy_topk"}),
    "mixtral-sliding-window-4": ("mixtral", {"sliding_window": 4}),  # shorter than the 11-token inputs
    "mixtral-softmax_topk-norm": ("mixtral", {"router_type": "softmax_topk", "norm_topk_prob": True}),
    "qwen3_moe-topk_softmax": ("qwen3_moe", {"router_type": "topk_softmax"}),
    # Dropless switch = top-1 of the full softmax, weighted by its probability.
    "qwen3_moe-switch-dropless": ("qwen3_moe", {"router_type": "switch", "num_experts_per_tok": 1}),
    "qwen3_moe-tied-sparse-step": (
        "qwen3_moe",
        {"tie_word_embeddings": True, "mlp_only_layers": [], "decoder_sparse_step": 2},
    ),
    "glm4_moe-two-shared-no-groups": (
        "glm4_moe",
        {
            "num_shared_experts": 2,
            "n_group": 1,
            "topk_group": 1,
            "use_qk_norm": False,
            "attention_bias": False,
        },
    ),
    "deepseek_v3-unscaled": ("deepseek_v3", {"routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1}),
}


@pytest.mark.parametrize("case", EQUIVALENT_CASES)
def test_export_variants_match(tmp_path, case):
    target, overrides = EQUIVALENT_CASES[case]
    src = build_tiny_for_target(target, tmp_path / "src", **overrides)
    out = export(src, tmp_path / "out", to=target)
    torch.testing.assert_close(
        _logits(_load_native(out, target)), _logits(HfMoeForCausalLM.from_pretrained(src))
    )


def test_tied_lm_head_saved_anyway_is_skipped(tmp_path):
    src = build_tiny_for_target("qwen3_moe", tmp_path / "src", tie_word_embeddings=True)
    tensors = load_file(src / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = export(src, tmp_path / "out", to="qwen3_moe")
    assert "lm_head.weight" not in _tensors(out)
    native = _load_native(out, "qwen3_moe")
    assert native.lm_head.weight.data_ptr() == native.model.embed_tokens.weight.data_ptr()
    back = import_native(out, tmp_path / "back")
    assert set(_tensors(back)) == set(tensors) - {"lm_head.weight"}


def test_export_dtype_and_shards(tmp_path):
    src = build_tiny_for_target("glm4_moe", tmp_path / "src")
    out = export(src, tmp_path / "out", to="glm4_moe", dtype="bfloat16", max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tensors = _tensors(out)
    assert set(tensors) == set(index["weight_map"])
    biases = {n for n in tensors if n.endswith("e_score_correction_bias")}
    assert biases and all(tensors[n].dtype == torch.float32 for n in biases)
    assert all(t.dtype == torch.bfloat16 for n, t in tensors.items() if n not in biases)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = _load_native(out, "glm4_moe")
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_export_copies_tokenizer_and_extends_provenance(tmp_path):
    src = build_tiny_for_target("mixtral", tmp_path / "src", with_tokenizer=True)
    (src / "hf_moe_provenance.json").write_text(json.dumps({"method": "upcycle", "license": "apache-2.0"}))
    out = export(src, tmp_path / "out", to="mixtral")
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert transformers.AutoTokenizer.from_pretrained(out)("the fox").input_ids[0] == 1
    provenance = json.loads((out / "hf_moe_provenance.json").read_text())
    assert provenance["method"] == "export" and provenance["options"]["to"] == "mixtral"
    assert [step["method"] for step in provenance["history"]] == ["upcycle"]
    assert provenance["license"] == "apache-2.0"
    assert "model.safetensors" in provenance["source"]["files_sha256"]
    assert "license: apache-2.0" in (out / "README.md").read_text()


# --- refusals ---------------------------------------------------------------------------------------------------

# case -> (tiny config it starts from, overrides, target asked for, substrings of the message, targets that fit)
REFUSALS = {
    "expert_choice": (
        "mixtral",
        {"router_type": "expert_choice", "use_cache": False},
        "mixtral",
        ["router_type='expert_choice'"],
        [],
    ),
    "switch-capacity": (
        "qwen3_moe",
        {"router_type": "switch", "num_experts_per_tok": 1, "capacity_factor": 1.0},
        "qwen3_moe",
        ["capacity_factor=1.0", "drops tokens"],
        [],
    ),
    "qwen2-into-mixtral": (
        "qwen2_moe",
        {},
        "mixtral",
        [
            "base decoder 'qwen2'",
            "num_shared_experts=1",
            "--shared-experts 0",
            "dense layers [1]",
            "norm_topk_prob=False",
            "--router topk_softmax",
        ],
        ["qwen2_moe"],
    ),
    "unnormalised-into-mixtral": (
        "mixtral",
        {"router_type": "softmax_topk", "norm_topk_prob": False},
        "mixtral",
        ["norm_topk_prob=False"],
        [],
    ),
    "sigmoid-into-qwen3": (
        "glm4_moe",
        {},
        "qwen3_moe",
        ["base decoder 'glm4_moe'", "router_type='sigmoid_topk'", "num_shared_experts=1"],
        ["glm4_moe"],
    ),
    "mistral-into-qwen3": (
        "mixtral",
        {},
        "qwen3_moe",
        ["base decoder 'mistral'", "upcycle a qwen3 checkpoint"],
        ["mixtral"],
    ),
    "qwen3-attention-bias": ("qwen3_moe", {"attention_bias": True}, "qwen3_moe", ["attention_bias=True"], []),
    "sliding-into-qwen3": (
        "qwen3_moe",
        {"use_sliding_window": True, "sliding_window": 64},
        "qwen3_moe",
        ["use_sliding_window=True"],
        [],
    ),
    "dense-into-mixtral": (
        "mixtral",
        {"mlp_only_layers": [0]},
        "mixtral",
        ["dense layers [0]", "--moe-layers all"],
        [],
    ),
    "glm-dense-not-prefix": (
        "glm4_moe",
        {"first_k_dense_replace": 0, "mlp_only_layers": [2]},
        "glm4_moe",
        ["dense layers [2]"],
        [],
    ),
    "glm-gated-shared": (
        "glm4_moe",
        {"shared_expert_gate": True},
        "glm4_moe",
        ["shared_expert_gate=True"],
        [],
    ),
    "glm-shared-width": (
        "glm4_moe",
        {"shared_expert_intermediate_size": 48},
        "glm4_moe",
        ["shared_expert_intermediate_size=48", "multiple of moe_intermediate_size=32"],
        [],
    ),
    "gelu": ("mixtral", {"hidden_act": "gelu"}, "mixtral", ["hidden_act='gelu'", "SiLU"], []),
    "gemma-base": (
        "mixtral",
        {"base_model_type": "gemma3_text", "sliding_window": 4096},
        "mixtral",
        ["base decoder 'gemma3_text'", "hf_moe vLLM plugin", "SiLU"],
        [],
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_fields_and_fitting_targets(tmp_path, case):
    base, overrides, target, fragments, fits = REFUSALS[case]
    config = tiny_target_config(base, **overrides)
    assert target not in compatible_targets(config)
    assert compatible_targets(config) == fits
    src = tmp_path / "src"
    HfMoeForCausalLM(config).save_pretrained(src)
    with pytest.raises(ValueError) as err:
        export(src, tmp_path / "out", to=target)
    message = str(err.value)
    assert SPECS[target].title in message
    for fragment in fragments:
        assert fragment in message
    if fits:
        assert f"targets that can represent this config: {', '.join(fits)}" in message
    else:
        assert "no native target can represent this config" in message
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("target", TARGETS)
def test_each_tiny_config_fits_exactly_its_target(target):
    assert compatible_targets(tiny_target_config(target)) == [target]
    assert representability_problems(tiny_target_config(target), target) == []


# --- bad input leaves nothing behind ----------------------------------------------------------------------------


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def test_bad_inputs_write_nothing(tmp_path):
    src = build_tiny_for_target("mixtral", tmp_path / "src")
    before = _hashes(src)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(tmp_path / "missing", tmp_path / "out", to="mixtral")
    with pytest.raises(ValueError, match="unknown export target 'llama'"):
        export(src, tmp_path / "out", to="llama")
    with pytest.raises(ValueError, match="base decoder 'mistral'.*DeepSeek-V3's decoder"):
        export(src, tmp_path / "out", to="deepseek_v3")
    with pytest.raises(ValueError, match="cannot parse size"):  # fails inside the temporary output folder
        export(src, tmp_path / "out", to="mixtral", max_shard_size="lots")
    native = export(src, tmp_path / "native", to="mixtral")
    with pytest.raises(ValueError, match="model_type='mixtral', not 'hf_moe'"):
        export(native, tmp_path / "out", to="qwen3_moe")
    with pytest.raises(ValueError, match="already an hf_moe checkpoint"):
        import_native(src, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export(src, existing, to="mixtral")
    with pytest.raises(FileExistsError):
        import_native(native, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    export(src, existing, to="mixtral", overwrite=True)
    assert not (existing / "keep.txt").exists() and (existing / "config.json").is_file()

    # Tensors that do not belong to config.json: refused before writing.
    broken = tmp_path / "broken"
    HfMoeForCausalLM(tiny_target_config("mixtral", num_experts=6)).save_pretrained(broken)
    (broken / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ValueError, match="wrong shape"):
        export(broken, tmp_path / "out", to="mixtral")
    not_adapter = tmp_path / "not-an-adapter"
    not_adapter.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        export(src, tmp_path / "out", to="mixtral", merge_adapter=not_adapter)
    with pytest.raises(ValueError, match="lies inside the input"):  # OUT_DIR inside the adapter folder
        export(src, not_adapter / "out", to="mixtral", merge_adapter=not_adapter)
    assert _leftovers(tmp_path, "out") == []
    assert _hashes(src) == before  # the input is untouched


@pytest.mark.parametrize(
    ("model_type", "fragment"),
    [("deepseek_v2", "DeepSeek-V3 .* is supported"), ("llama", "supported native architectures are mixtral")],
)
def test_import_refuses_unsupported_architectures(tmp_path, model_type, fragment):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 32}))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, src / "model.safetensors")
    with pytest.raises(ValueError, match=fragment):
        import_native(src, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


# --- import of checkpoints written by transformers itself -------------------------------------------------------


def _native_config(target: str):
    """The transformers config of `target` that the tiny hf_moe config of that target exports to."""
    from hf_moe.conversion.native import native_config_dict

    return getattr(transformers, SPECS[target].config_class).from_dict(
        native_config_dict(tiny_target_config(target), target)
    )


@pytest.mark.parametrize("target", TARGETS)
def test_import_transformers_saved_native_checkpoint(tmp_path, target):
    """Parity on the same weights: a native model saved by transformers, imported, gives the same logits."""
    model_cls = getattr(transformers, SPECS[target].architecture)
    torch.manual_seed(0)
    native = model_cls(_native_config(target)).eval()
    with torch.no_grad():
        for name, param in native.named_parameters():
            if "gate.weight" in name:
                param.normal_(0.0, 0.5)
        for name, buf in native.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    native.save_pretrained(tmp_path / "native")
    back = import_native(tmp_path / "native", tmp_path / "back")
    torch.testing.assert_close(_logits(HfMoeForCausalLM.from_pretrained(back)), _logits(native))


@pytest.mark.parametrize("target", ["mixtral", "glm4_moe"])
def test_import_fused_layout(tmp_path, target):
    """A native checkpoint holding transformers 5's in-memory names (fused experts, Mixtral's `mlp.`) imports too."""
    config = _native_config(target)
    torch.manual_seed(0)
    native = getattr(transformers, SPECS[target].architecture)(config).eval()
    (tmp_path / "native").mkdir()
    config.save_pretrained(tmp_path / "native")
    state = {k: v.contiguous() for k, v in native.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "native" / "model.safetensors")
    back = import_native(tmp_path / "native", tmp_path / "back")
    torch.testing.assert_close(_logits(HfMoeForCausalLM.from_pretrained(back)), _logits(native))


def test_import_hub_style_config_with_rope_scaling(tmp_path):
    """Hub config.json files predate `rope_parameters`: `rope_theta` + `rope_scaling` at top level."""
    native = export(build_tiny_for_target("qwen3_moe", tmp_path / "src"), tmp_path / "native", to="qwen3_moe")
    config = json.loads((native / "config.json").read_text())
    del config["rope_parameters"]
    config.update(
        rope_theta=50000.0,
        torch_dtype="float32",
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    )
    (native / "config.json").write_text(json.dumps(config))
    back = import_native(native, tmp_path / "back")
    rope = hf_moe.HfMoeConfig.from_pretrained(back).get_text_config().rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["rope_theta"] == 50000.0
    ids = torch.randint(3, 99, (1, 100))  # longer than original_max_position_embeddings
    with torch.no_grad():
        expected = _load_native(native, "qwen3_moe").eval()(ids).logits
        got = HfMoeForCausalLM.from_pretrained(back).eval()(ids).logits
    torch.testing.assert_close(got, expected)


def test_import_skips_glm_multi_token_prediction_layer(tmp_path):
    src = build_tiny_for_target("glm4_moe", tmp_path / "src")
    native = export(src, tmp_path / "native", to="glm4_moe")
    tensors = load_file(native / "model.safetensors")
    num_layers = json.loads((native / "config.json").read_text())["num_hidden_layers"]
    # GLM-4.5 checkpoints carry their MTP module as one extra decoder layer.
    tensors[f"model.layers.{num_layers}.eh_proj.weight"] = torch.zeros(64, 128)
    tensors[f"model.layers.{num_layers}.mlp.gate.weight"] = torch.zeros(8, 64)
    save_file(tensors, native / "model.safetensors")
    back = import_native(native, tmp_path / "back")
    assert set(_tensors(back)) == set(_tensors(src))
    skipped = json.loads((back / "hf_moe_provenance.json").read_text())["options"]["skipped_tensors"]
    assert len(skipped) == 2


# --- merging a PEFT adapter -------------------------------------------------------------------------------------


def _random_adapter(model: HfMoeForCausalLM, config, out: Path, seed: int):
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the function
                param.normal_(0.0, 0.1)
    peft_model.save_pretrained(out)
    return peft_model


@pytest.mark.parametrize("flavour", ["peft-target-parameters", "preset-fast-experts"])
def test_merge_adapter_matches_peft_model(tmp_path, flavour):
    from peft import LoraConfig

    from hf_moe.peft import lora_config

    src = build_tiny_for_target("qwen2_moe", tmp_path / "src")
    base = HfMoeForCausalLM.from_pretrained(src)
    plain = _logits(base)
    if flavour == "peft-target-parameters":
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        )
    else:
        config = lora_config(base, targets=("experts", "attention", "shared_experts"), r=4)
    peft_model = _random_adapter(base, config, tmp_path / "adapter", seed=1)
    expected = _logits(peft_model)
    assert (expected - plain).abs().max() > 1e-2  # the adapter matters

    out = export(src, tmp_path / "out", to="qwen2_moe", merge_adapter=tmp_path / "adapter")
    torch.testing.assert_close(_logits(_load_native(out, "qwen2_moe")), expected)
    provenance = json.loads((out / "hf_moe_provenance.json").read_text())
    assert provenance["options"]["merge_adapter"].endswith("adapter")
    assert "adapter_model.safetensors" in " ".join(provenance["source"]["files_sha256"])


# --- CLI --------------------------------------------------------------------------------------------------------


def test_cli_export_import_and_refusal(tmp_path, capsys):
    src = build_tiny_for_target("qwen3_moe", tmp_path / "src")
    assert (
        main(["export", str(src), str(tmp_path / "native"), "--to", "qwen3_moe", "--dtype", "bfloat16"]) == 0
    )
    assert json.loads((tmp_path / "native" / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["import", str(tmp_path / "native"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "config.json").is_file()
    capsys.readouterr()
    assert main(["export", str(src), str(tmp_path / "mixtral"), "--to", "mixtral"]) == 2
    err = capsys.readouterr().err
    assert "hf-moe export: error: cannot export" in err and "base decoder 'qwen3'" in err
    assert not (tmp_path / "mixtral").exists()
