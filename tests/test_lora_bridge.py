"""The MoE-LoRA bridge (`hf-moe lora convert / verify`): adapters made by real PEFT on tiny hf_moe, Mixtral and
Qwen3-MoE models, converted between the fused, target-parameters and per-expert layouts. Every round trip returns
the same tensors; converted adapters load with PEFT and give the same logits; merged equals unmerged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hf_moe.cli import main as cli_main
from hf_moe.peft import (
    FusedExpertsLora,
    convert_moe_adapter,
    detect_adapter_format,
    lora_config,
    read_moe_adapter,
    verify_moe_adapter,
)
from tests.helpers.dense import SMALL
from tests.helpers.tiny import tiny_model

FAMILIES = ("hf_moe", "mixtral", "qwen3_moe")
NAMING = {"hf_moe": "qwen", "mixtral": "mixtral", "qwen3_moe": "qwen"}
_NATIVE = {k: v for k, v in SMALL.items() if k != "intermediate_size"}  # each family sets its widths


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if family == "hf_moe":
        model = tiny_model(seed=seed, num_shared_experts=1)
    elif family == "mixtral":
        model = MixtralForCausalLM(
            MixtralConfig(**_NATIVE, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
        )
    else:
        model = Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **_NATIVE,
                intermediate_size=64,
                moe_intermediate_size=16,
                num_experts=4,
                num_experts_per_tok=2,
                mlp_only_layers=[0],
                decoder_sparse_step=1,
                head_dim=8,
            )
        )
    with torch.no_grad():  # spread the routers so top-k choices are not near ties
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(3, 99, (2, 10), generator=torch.Generator().manual_seed(1))


def make_adapter(
    family: str,
    out: Path,
    *,
    experts_impl: str = "fast",
    targets=("experts", "attention", "router"),
    **kwargs,
) -> torch.Tensor:
    """Train-free adapter with random B (init_lora_weights=False); returns the adapted logits."""
    model = build(family)
    config = lora_config(
        model,
        targets=list(targets),
        r=4,
        alpha=8,
        experts_impl=experts_impl,
        init_lora_weights=False,
        **kwargs,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        logits = peft_model(ids()).logits
    peft_model.save_pretrained(out)
    return logits


def load_logits(family: str, adapter: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(build(family), adapter).eval()
    with torch.no_grad():
        return model(ids()).logits


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def test_layouts_and_names(tmp_path, family):
    make_adapter(family, tmp_path / "fused")
    naming = NAMING[family]
    assert detect_adapter_format(tmp_path / "fused") == "fused"
    convert_moe_adapter(tmp_path / "fused", tmp_path / "tp", to="target-parameters")
    convert_moe_adapter(tmp_path / "fused", tmp_path / "pe", to="per-expert", naming=naming)
    assert detect_adapter_format(tmp_path / "tp") == "target-parameters"
    assert detect_adapter_format(tmp_path / "pe") == "per-expert"
    layer = 1
    h, i, e, r = 32, 16, 4, 4
    tp = tensors(tmp_path / "tp")
    p = f"base_model.model.model.layers.{layer}.mlp.experts"
    assert tp[f"{p}.base_layer.lora_A.weight"].shape == (e * r, h)  # gate_up_proj
    assert tp[f"{p}.base_layer.lora_B.weight"].shape == (2 * i, r * e)
    assert tp[f"{p}.lora_A.weight"].shape == (e * r, i)  # down_proj
    assert tp[f"{p}.lora_B.weight"].shape == (h, r * e)
    pe = tensors(tmp_path / "pe")
    block = "block_sparse_moe" if naming == "mixtral" else "mlp"
    gate, up, down = ("w1", "w3", "w2") if naming == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    q = f"base_model.model.model.layers.{layer}.{block}.experts.3"
    assert pe[f"{q}.{gate}.lora_A.weight"].shape == (r, h) and pe[f"{q}.{gate}.lora_B.weight"].shape == (i, r)
    assert pe[f"{q}.{up}.lora_B.weight"].shape == (i, r)
    assert pe[f"{q}.{down}.lora_A.weight"].shape == (r, i) and pe[f"{q}.{down}.lora_B.weight"].shape == (h, r)
    # per expert, gate and up rows of B_gu[e] and the shared A_gu[e]
    fused = tensors(tmp_path / "fused")
    torch.testing.assert_close(
        pe[f"{q}.{up}.lora_B.weight"], fused[f"{p}.lora_B.gate_up_proj"][3, i:], rtol=0, atol=0
    )
    torch.testing.assert_close(
        pe[f"{q}.{gate}.lora_A.weight"], fused[f"{p}.lora_A.gate_up_proj"][3], rtol=0, atol=0
    )
    # the other tensors (attention, router) are carried over unchanged
    others = [k for k in fused if ".experts." not in k]
    assert others and all(torch.equal(pe[k], fused[k]) and torch.equal(tp[k], fused[k]) for k in others)
    assert "## Loading this adapter" in (tmp_path / "fused" / "README.md").read_text()
    assert "vLLM" in (tmp_path / "pe" / "README.md").read_text()


def test_every_round_trip_is_exact(tmp_path, family):
    make_adapter(family, tmp_path / "fused")
    naming = NAMING[family]
    start = {"fused": tmp_path / "fused"}
    convert_moe_adapter(start["fused"], tmp_path / "tp", to="target-parameters")
    convert_moe_adapter(start["fused"], tmp_path / "pe", to="per-expert", naming=naming)
    start["target-parameters"], start["per-expert"] = tmp_path / "tp", tmp_path / "pe"
    for src, folder in start.items():
        for via in ("fused", "target-parameters", "per-expert"):
            if via == src:
                continue
            mid, back = tmp_path / f"{src}-{via}", tmp_path / f"{src}-{via}-{src}"
            convert_moe_adapter(folder, mid, to=via, naming=naming)
            convert_moe_adapter(mid, back, to=src, naming=naming)
            assert_same_tensors(folder, back)
            cfg_a = json.loads((folder / "adapter_config.json").read_text())
            cfg_b = json.loads((back / "adapter_config.json").read_text())
            for key in (
                "r",
                "lora_alpha",
                "rank_pattern",
                "alpha_pattern",
                "target_parameters",
                "target_modules",
            ):
                if src != "fused":  # the fused start is PEFT's own config (regex rank patterns), not ours
                    assert cfg_a[key] == cfg_b[key], (src, via, key)


def test_converted_adapters_give_the_same_logits(tmp_path, family):
    want = make_adapter(family, tmp_path / "fused")
    torch.testing.assert_close(load_logits(family, tmp_path / "fused"), want, rtol=0, atol=0)
    # PEFT's own target_parameters path (no hf_moe layer) on the converted adapter
    convert_moe_adapter(tmp_path / "fused", tmp_path / "tp", to="target-parameters")
    tp_model = PeftModel.from_pretrained(build(family), tmp_path / "tp").eval()
    assert not any(isinstance(m, FusedExpertsLora) for m in tp_model.modules())
    with torch.no_grad():
        torch.testing.assert_close(tp_model(ids()).logits, want, rtol=1e-5, atol=1e-5)
    # per-expert and back: fused again, same logits bit for bit
    convert_moe_adapter(tmp_path / "fused", tmp_path / "pe", to="per-expert", naming=NAMING[family])
    convert_moe_adapter(tmp_path / "pe", tmp_path / "pe-fused", to="fused")
    torch.testing.assert_close(load_logits(family, tmp_path / "pe-fused"), want, rtol=0, atol=0)


def test_peft_target_parameters_adapter_converts_to_fused(tmp_path, family):
    want = make_adapter(family, tmp_path / "tp", experts_impl="target_parameters", targets=("experts",))
    assert detect_adapter_format(tmp_path / "tp") == "target-parameters"
    convert_moe_adapter(tmp_path / "tp", tmp_path / "fused", to="fused")
    model = PeftModel.from_pretrained(build(family), tmp_path / "fused").eval()
    assert sum(isinstance(m, FusedExpertsLora) for m in model.modules()) >= 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, want, rtol=1e-5, atol=1e-5)
    convert_moe_adapter(tmp_path / "fused", tmp_path / "tp2", to="target-parameters")
    assert_same_tensors(tmp_path / "tp", tmp_path / "tp2")
    # PEFT saves target_parameters from a set (its order varies between runs); the reader must not rely on it
    config_file = tmp_path / "tp" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for order in (sorted, lambda names: sorted(names, reverse=True)):
        config["target_parameters"] = order(config["target_parameters"])
        config_file.write_text(json.dumps(config))
        convert_moe_adapter(tmp_path / "tp", tmp_path / "fused-again", to="fused", overwrite=True)
        assert_same_tensors(tmp_path / "fused", tmp_path / "fused-again")


def test_independent_gate_and_up_factors_fuse_at_double_rank(tmp_path):
    # Per-expert adapters trained on unfused experts (as vLLM serves them) have their own A for gate and for up.
    make_adapter("mixtral", tmp_path / "fused", targets=("experts",))
    convert_moe_adapter(tmp_path / "fused", tmp_path / "pe", to="per-expert", naming="mixtral")
    files = tensors(tmp_path / "pe")
    generator = torch.Generator().manual_seed(3)
    for key in files:
        if ".w3.lora_A." in key:  # a different A for up than for gate
            files[key] = torch.randn(files[key].shape, generator=generator)
    save_file(files, tmp_path / "pe" / "adapter_model.safetensors")
    convert_moe_adapter(tmp_path / "pe", tmp_path / "fused2", to="fused")
    fused = read_moe_adapter(tmp_path / "fused2")
    config = json.loads((tmp_path / "pe" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    for path, factors in fused.experts.items():
        assert factors.a_gate_up.shape[1] == 8  # rank 2r for gate_up, down keeps r
        deltas = factors.deltas()
        block = path.replace(".mlp.experts", ".block_sparse_moe.experts")
        for e in range(4):

            def delta(proj: str) -> torch.Tensor:
                a = files[f"base_model.model.{block}.{e}.{proj}.lora_A.weight"].double()
                b = files[f"base_model.model.{block}.{e}.{proj}.lora_B.weight"].double()
                return scale * b @ a

            torch.testing.assert_close(deltas["gate_up_proj"][e], torch.cat([delta("w1"), delta("w3")]))
            torch.testing.assert_close(deltas["down_proj"][e], delta("w2"))
    # and PEFT applies exactly that update: merged weights equal base + delta
    result = verify_moe_adapter(_save_base("mixtral", tmp_path), tmp_path / "pe")
    assert result["ok"] and result["format"] == "per-expert", result


def _save_base(family: str, tmp_path: Path) -> Path:
    folder = tmp_path / f"base-{family}"
    if not folder.exists():
        build(family).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("fmt", ["fused", "target-parameters", "per-expert"])
def test_verify_merged_equals_unmerged(tmp_path, family, fmt):
    make_adapter(family, tmp_path / "fused")
    adapter = tmp_path / "fused"
    if fmt != "fused":
        adapter = tmp_path / fmt
        convert_moe_adapter(tmp_path / "fused", adapter, to=fmt, naming=NAMING[family])
    result = verify_moe_adapter(_save_base(family, tmp_path), adapter)
    assert result["format"] == fmt
    assert result["ok"], result
    assert result["adapter_effect"] > 1e-2  # the adapter changes the logits: equality is not vacuous
    assert result["max_abs_diff"] < 1e-4 and result["max_weight_diff"] < 1e-5


def test_cli_convert_and_verify(tmp_path, capsys):
    make_adapter("qwen3_moe", tmp_path / "fused")
    assert (
        cli_main(["lora", "convert", str(tmp_path / "fused"), str(tmp_path / "pe"), "--to", "per-expert"])
        == 0
    )
    assert "per-expert" in capsys.readouterr().out
    assert detect_adapter_format(tmp_path / "pe") == "per-expert"
    base = _save_base("qwen3_moe", tmp_path)
    assert cli_main(["lora", "verify", str(base), str(tmp_path / "pe")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["format"] == "per-expert"
    # bad input: a clear message and exit code 2, the input untouched
    assert cli_main(["lora", "convert", str(tmp_path), str(tmp_path / "x"), "--to", "fused"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert cli_main(["lora", "convert", str(tmp_path / "fused"), str(tmp_path / "pe"), "--to", "fused"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["lora", "convert", str(tmp_path / "fused"), str(tmp_path / "y"), "--to", "vllm"])
    assert exc.value.code == 2


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        convert_moe_adapter(tmp_path, tmp_path / "out", to="fused")
    make_adapter("hf_moe", tmp_path / "attn", targets=("attention",))
    with pytest.raises(ValueError, match="no LoRA on fused experts"):
        convert_moe_adapter(tmp_path / "attn", tmp_path / "out", to="fused")
    make_adapter("hf_moe", tmp_path / "fused")
    with pytest.raises(ValueError, match="Unknown adapter format"):
        convert_moe_adapter(tmp_path / "fused", tmp_path / "out", to="vllm")
    with pytest.raises(ValueError, match="naming"):
        convert_moe_adapter(tmp_path / "fused", tmp_path / "out", to="per-expert", naming="llama")
    before = {p.name: p.read_bytes() for p in (tmp_path / "fused").iterdir()}
    convert_moe_adapter(tmp_path / "fused", tmp_path / "out", to="per-expert")
    with pytest.raises(FileExistsError):
        convert_moe_adapter(tmp_path / "fused", tmp_path / "out", to="per-expert")
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "fused").iterdir()}  # input not modified
