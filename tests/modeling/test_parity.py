"""Parity with transformers' own models in fp32: the same weights, copied by name (tests/modeling/mapping.py),
must give the same logits. MoE: Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4.5-MoE (full model) and DeepSeek-V3 (MoE
block only; its attention is MLA, which hf_moe does not have). Dense: Llama, Mistral, Qwen2, Qwen3 as a
one-expert model."""

import pytest
import torch
from transformers import (
    DeepseekV3Config,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from hf_moe import HfMoeConfig, HfMoeForCausalLM
from hf_moe.modeling.modeling_hf_moe import HfMoeSparseMoeBlock
from tests.helpers.dense import SMALL
from tests.modeling.mapping import (
    dense_state_dict_to_single_expert,
    hf_moe_config_from_native,
    randomize_,
    rename_moe_state_dict,
)

# The shared tiny dense decoder (tests/helpers/dense.py) with widths and a norm epsilon of its own, and no pad
# token: randomize_ leaves embeddings at their init, which zeroes a pad token's row, and the inputs use token 0.
BASE = {
    **SMALL,
    "intermediate_size": 48,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "pad_token_id": None,
}


def _inputs(seq: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    ids = torch.randint(0, BASE["vocab_size"], (2, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    return ids, mask


def _native(cls, config):
    torch.manual_seed(0)
    model = cls(config).eval()
    randomize_(model)
    return model


def _assert_same_logits(native: torch.nn.Module, ours: HfMoeForCausalLM, seq: int = 9) -> None:
    ids, mask = _inputs(seq)
    with torch.no_grad():
        expected = native(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
        # Without a mask too: the plain causal path.
        expected_plain, got_plain = native(ids).logits, ours(ids).logits
    torch.testing.assert_close(got[1], expected[1])
    torch.testing.assert_close(got[0, 3:], expected[0, 3:])
    torch.testing.assert_close(got_plain, expected_plain)


def _load(config: HfMoeConfig, state_dict: dict) -> HfMoeForCausalLM:
    model = HfMoeForCausalLM(config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


# --- MoE architectures --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_mixtral(tied):
    native_config = MixtralConfig(
        **{**BASE, "intermediate_size": 16},
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=tied,
    )
    native = _native(MixtralForCausalLM, native_config)
    config = hf_moe_config_from_native(
        native_config,
        router_type="topk_softmax",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=native_config.intermediate_size,
    )
    _assert_same_logits(native, _load(config, rename_moe_state_dict(native.state_dict())))


def test_qwen2_moe():
    native_config = Qwen2MoeConfig(
        **{**BASE, "num_hidden_layers": 3},
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=40,
        norm_topk_prob=False,
        qkv_bias=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    )
    native = _native(Qwen2MoeForCausalLM, native_config)
    config = hf_moe_config_from_native(
        native_config,
        router_type="softmax_topk",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=False,
        num_shared_experts=1,
        shared_expert_intermediate_size=40,
        shared_expert_gate=True,
        attention_bias=True,
        mlp_only_layers=[1],
    )
    assert config.moe_layers == [0, 2]
    _assert_same_logits(native, _load(config, rename_moe_state_dict(native.state_dict())))


def test_qwen3_moe():
    native_config = Qwen3MoeConfig(
        **BASE,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
    )
    native = _native(Qwen3MoeForCausalLM, native_config)
    config = hf_moe_config_from_native(
        native_config,
        router_type="softmax_topk",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        use_qk_norm=True,
    )
    _assert_same_logits(native, _load(config, rename_moe_state_dict(native.state_dict())))


def _glm_moe_kwargs() -> dict:
    return dict(
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
    )


@pytest.mark.parametrize("use_qk_norm", [False, True])
def test_glm4_moe(use_qk_norm):
    native_config = Glm4MoeConfig(
        **{**BASE, "num_hidden_layers": 3},
        n_routed_experts=8,
        n_shared_experts=1,
        attention_bias=True,
        use_qk_norm=use_qk_norm,
        **_glm_moe_kwargs(),
    )
    assert native_config.rope_parameters["partial_rotary_factor"] == 0.5
    native = _native(Glm4MoeForCausalLM, native_config)
    assert native.model.layers[1].mlp.gate.e_score_correction_bias.abs().min() > 0  # really set
    config = hf_moe_config_from_native(
        native_config,
        router_type="sigmoid_topk",
        num_experts=8,
        num_shared_experts=1,
        attention_bias=True,
        use_qk_norm=use_qk_norm,
        **_glm_moe_kwargs(),
    )
    assert config.moe_layers == [1, 2]
    ours = _load(config, rename_moe_state_dict(native.state_dict()))
    _assert_same_logits(native, ours)
    # The correction bias matters: zeroing it on our side alone changes the logits.
    with torch.no_grad():
        for layer in config.moe_layers:
            ours.model.layers[layer].mlp.gate.e_score_correction_bias.add_(
                torch.linspace(-1.0, 1.0, config.num_experts)
            )
    with pytest.raises(AssertionError):
        _assert_same_logits(native, ours)


def test_deepseek_v3_moe_block():
    native_config = DeepseekV3Config(
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        n_shared_experts=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    native = DeepseekV3MoE(native_config).eval()
    with torch.no_grad():
        for param in native.parameters():  # experts start empty (uninitialised) outside a PreTrainedModel
            param.normal_(0.0, 0.3)
    randomize_(native)
    config = HfMoeConfig(
        hidden_size=32,
        num_attention_heads=4,
        router_type="sigmoid_topk",
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        n_group=4,
        topk_group=2,
        num_shared_experts=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    ours = HfMoeSparseMoeBlock(config).eval()
    ours.load_state_dict(native.state_dict(), strict=True)
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(ours(hidden), native(hidden))


# --- Dense decoders as a one-expert model -------------------------------------------------------------------


def _single_expert(native_config, **extra) -> HfMoeConfig:
    return hf_moe_config_from_native(
        native_config,
        router_type="softmax_topk",
        num_experts=1,
        num_experts_per_tok=1,
        moe_intermediate_size=native_config.intermediate_size,
        **extra,
    )


def _check_dense(cls, native_config, seq: int = 9, **extra) -> None:
    native = _native(cls, native_config)
    ours = _load(
        _single_expert(native_config, **extra), dense_state_dict_to_single_expert(native.state_dict())
    )
    assert all(hasattr(layer.mlp, "experts") for layer in ours.model.layers)
    _assert_same_logits(native, ours, seq=seq)


@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_llama(attention_bias, tied):
    native_config = LlamaConfig(**BASE, attention_bias=attention_bias, tie_word_embeddings=tied)
    # Llama's attention_bias covers o_proj too: hf_moe splits it into attention_bias + attention_output_bias.
    _check_dense(
        LlamaForCausalLM, native_config, attention_bias=attention_bias, attention_output_bias=attention_bias
    )


def test_mistral_sliding_window():
    native_config = MistralConfig(**BASE, sliding_window=4)
    _check_dense(MistralForCausalLM, native_config, seq=12, sliding_window=4)


def test_mistral_sliding_window_is_not_full_attention():
    """The Mistral parity is only meaningful if the window changes the result on that sequence."""
    native_config = MistralConfig(**BASE, sliding_window=4)
    native = _native(MistralForCausalLM, native_config)
    windowless = _single_expert(
        MistralConfig(**BASE, sliding_window=None)
    )  # the same decoder, full attention
    ours = _load(windowless, dense_state_dict_to_single_expert(native.state_dict()))
    with pytest.raises(AssertionError):
        _assert_same_logits(native, ours, seq=12)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2(tied):
    native_config = Qwen2Config(**BASE, tie_word_embeddings=tied)
    native = _native(Qwen2ForCausalLM, native_config)
    assert native.model.layers[0].self_attn.q_proj.bias is not None
    assert native.model.layers[0].self_attn.o_proj.bias is None
    _check_dense(Qwen2ForCausalLM, native_config, attention_bias=True)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3(tied):
    native_config = Qwen3Config(**BASE, head_dim=8, tie_word_embeddings=tied)
    _check_dense(Qwen3ForCausalLM, native_config, use_qk_norm=True)
