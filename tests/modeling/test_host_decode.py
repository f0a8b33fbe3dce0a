"""CPU decoding routes on the host (HfMoeSparseMoeBlock._decode_on_host), one token or a small batch (then through
the fused experts kernel): the same function as the reference path, chosen only where nothing watches or rewrites
the router or the experts."""

import pytest
import torch

from hf_moe.modeling.experts import FUSED_MAX_ROWS_ENV, SMALL_GROUPS_ENV
from hf_moe.modeling.modeling_hf_moe import CACHE_FIELD, HOST_ROUTING_MAX_ROUTER_LOGITS
from tests.helpers.tiny import tiny_model

CASES = [
    ("topk_softmax", {}),
    ("softmax_topk", {"norm_topk_prob": True}),
    ("softmax_topk", {"norm_topk_prob": False}),
]


def _sharpen(model) -> None:
    # Router rows of unit scale: routing that actually differs between tokens and layers.
    torch.manual_seed(1)
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=1.0)


@pytest.mark.parametrize(("router_type", "extra"), CASES)
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("shared", [0, 1])
def test_one_token_decoding_equals_the_reference(router_type, extra, top_k, shared):
    model = tiny_model(router_type=router_type, num_experts_per_tok=top_k, num_shared_experts=shared, **extra)
    _sharpen(model)
    block = model.model.layers[0].mlp
    tokens = torch.randn(40, 1, 1, model.config.hidden_size)  # 40 single-token steps
    with torch.no_grad():
        assert block._host_decodable(tokens[0].reshape(1, -1))
        fast = torch.cat([block(t) for t in tokens])
        model.set_experts_implementation("eager")
        assert not block._host_decodable(tokens[0].reshape(1, -1))
        reference = torch.cat([block(t) for t in tokens])
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("router_type", "extra"), CASES)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shared", [0, 1])
def test_batch_decoding_on_the_host_equals_the_reference(router_type, extra, top_k, shared, monkeypatch):
    """Decoding batches of 2 to 16 tokens (the fused kernel's range on 4 experts at 32 rows per expert) route on the
    host, and equal the reference path."""
    monkeypatch.setenv(SMALL_GROUPS_ENV, "fused")
    monkeypatch.setenv(FUSED_MAX_ROWS_ENV, "32")  # the AVX-512 cap, on every host
    model = tiny_model(router_type=router_type, num_experts_per_tok=top_k, num_shared_experts=shared, **extra)
    _sharpen(model)
    block = model.model.layers[0].mlp
    batches = [torch.randn(size, 1, model.config.hidden_size) for size in (2, 3, 7, 16)]
    with torch.no_grad():
        assert all(block._host_decodable(b.reshape(b.shape[0], -1)) for b in batches)
        with torch.profiler.profile() as prof:
            fast = [block(b) for b in batches]
        assert [e.name for e in prof.events()].count("hf_moe_kernels::fused_experts") == len(batches)
        model.set_experts_implementation("eager")
        reference = [block(b) for b in batches]
    for actual, expected in zip(fast, reference):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv(FUSED_MAX_ROWS_ENV, "1")  # a lower cap: 16 tokens are past it, so the general path
    model.set_experts_implementation("hf_moe")
    assert not block._host_decodable(batches[-1].reshape(16, -1))


@pytest.mark.parametrize(("router_type", "extra"), CASES)
def test_host_routing_picks_the_routers_experts_and_weights(router_type, extra):
    model = tiny_model(router_type=router_type, num_experts_per_tok=2, **extra)
    _sharpen(model)
    router = model.model.layers[1].mlp.gate
    hidden = torch.randn(200, model.config.hidden_size)
    with torch.no_grad():
        _, weights, index = router(hidden)
        logits = torch.nn.functional.linear(hidden, router.weight)
    for row in range(hidden.shape[0]):
        experts, host_weights = router.route_one(logits[row].tolist())
        assert experts == index[row].tolist()
        assert max(abs(a - b) for a, b in zip(host_weights, weights[row].tolist())) <= 1.2e-7
        if router_type == "topk_softmax" or extra.get("norm_topk_prob"):
            assert sum(host_weights) == 1.0  # top-2 weights sum to one exactly, as the tensor path's


def test_watched_or_training_blocks_take_the_general_path(monkeypatch):
    model = tiny_model()
    block = model.model.layers[0].mlp
    token = torch.randn(1, model.config.hidden_size)
    with torch.no_grad():
        assert block._host_decodable(token)
        handle = block.gate.register_forward_hook(lambda *args: None)  # e.g. output_router_logits' recorder
        assert not block._host_decodable(token)
        handle.remove()
        too_many = HOST_ROUTING_MAX_ROUTER_LOGITS // model.config.num_experts + 1
        assert not block._host_decodable(torch.randn(too_many, model.config.hidden_size))  # a large batch
        batch = torch.randn(3, model.config.hidden_size)
        monkeypatch.setenv(SMALL_GROUPS_ENV, "fused")
        assert block._host_decodable(batch)
        monkeypatch.setenv(
            SMALL_GROUPS_ENV, "padded"
        )  # a batch on the host needs the fused kernel; one token not
        assert not block._host_decodable(batch) and block._host_decodable(token)
        model.to(torch.bfloat16)
        assert not block._host_decodable(token.bfloat16())
    assert not block._host_decodable(token)  # autograd on
    # Router logits requested during cached generation still come from the router itself.
    model = tiny_model().float()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = model(ids, use_cache=True, output_router_logits=True)
        cache = {
            CACHE_FIELD: getattr(out, CACHE_FIELD)
        }  # `cache` from transformers 5.24, else past_key_values
        step = model(ids[:, -1:], **cache, output_router_logits=True)
    assert len(step.router_logits) == model.config.num_hidden_layers
    assert step.router_logits[0].shape == (1, model.config.num_experts)
