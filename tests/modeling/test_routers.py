"""Router invariants: shapes, weight normalisation, capacity and dropping, expert choice, noise and jitter
only in training, group-limited routing, and the aux-loss-free bias update."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_moe.modeling.configuration_hf_moe import ROUTER_TYPES
from hf_moe.modeling.modeling_hf_moe import (
    ROUTERS,
    HfMoeSparseMoeBlock,
    SigmoidTopKRouter,
    TopKSoftmaxRouter,
    expert_capacity,
)
from tests.helpers.tiny import ROUTER_CASES, tiny_model, tiny_router_config

T = 12  # tokens per router call


def _router(router_type: str, seed: int = 0, **overrides):
    config = tiny_router_config(router_type, **overrides)
    torch.manual_seed(seed)
    router = ROUTERS[router_type](config).eval()
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
    return router, config


def _hidden(seed: int = 1, tokens: int = T, dim: int = 32) -> torch.Tensor:
    return torch.randn(tokens, dim, generator=torch.Generator().manual_seed(seed))


def test_registry_matches_config_router_types():
    assert set(ROUTERS) == set(ROUTER_TYPES) == set(ROUTER_CASES)


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_shapes_and_index_range(router_type):
    router, config = _router(router_type)
    logits, weights, index = router(_hidden())
    slots = config.num_experts if router_type == "expert_choice" else config.num_experts_per_tok
    assert logits.shape == (T, config.num_experts)
    assert weights.shape == index.shape == (T, slots)
    assert index.dtype == torch.long
    assert int(index.min()) >= 0 and int(index.max()) <= config.num_experts
    assert (weights >= 0).all()
    # Dropped / absent slots (sentinel E) carry weight 0.
    assert (weights[index == config.num_experts] == 0).all()
    if router_type not in ("switch", "expert_choice"):
        # Token choice without capacity: K distinct real experts per token.
        assert (index < config.num_experts).all()
        assert all(len(set(row)) == config.num_experts_per_tok for row in index.tolist())


@pytest.mark.parametrize(
    "router_type, overrides, expected_sum",
    [
        ("topk_softmax", {}, 1.0),
        ("noisy_topk", {}, 1.0),
        ("softmax_topk", {"norm_topk_prob": True}, 1.0),
        ("sigmoid_topk", {"norm_topk_prob": True, "routed_scaling_factor": 1.0}, 1.0),
        ("sigmoid_topk", {"norm_topk_prob": True, "routed_scaling_factor": 2.5}, 2.5),
    ],
)
def test_weights_sum_to_one_where_they_should(router_type, overrides, expected_sum):
    router, _ = _router(router_type, **overrides)
    _, weights, _ = router(_hidden())
    torch.testing.assert_close(weights.sum(dim=-1), torch.full((T,), expected_sum))


@pytest.mark.parametrize(
    "router_type, overrides",
    [("softmax_topk", {"norm_topk_prob": False}), ("sigmoid_topk", {"norm_topk_prob": False})],
)
def test_weights_not_renormalised_otherwise(router_type, overrides):
    router, config = _router(router_type, **overrides)
    logits, weights, index = router(_hidden())
    sums = weights.sum(dim=-1)
    assert not torch.allclose(sums, torch.ones(T))
    # They are the raw probabilities / sigmoid scores of the chosen experts.
    if router_type == "softmax_topk":
        raw = F.softmax(logits.float(), dim=-1)
        assert (sums < 1).all()
    else:
        raw = logits.float().sigmoid()
    torch.testing.assert_close(weights, raw.gather(1, index))


def test_switch_top1_weight_is_softmax_probability():
    router, _ = _router("switch", capacity_factor=None)
    logits, weights, index = router(_hidden())
    probs = F.softmax(logits, dim=-1)
    torch.testing.assert_close(index[:, 0], probs.argmax(dim=-1))
    torch.testing.assert_close(weights[:, 0], probs.max(dim=-1).values)


def _identity_router(router_type: str, num_experts: int = 4, **overrides):
    """A router whose logits are the first `num_experts` features of the input: logits can be written by
    hand."""
    router, config = _router(router_type, num_experts=num_experts, **overrides)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :num_experts] = torch.eye(num_experts)
    return router, config


def _hand_logits(preferred: list[int], num_experts: int = 4, dim: int = 32) -> torch.Tensor:
    h = torch.zeros(len(preferred), dim)
    for t, e in enumerate(preferred):
        # A clear winner; later tokens slightly more confident (so token order, not confidence, must decide).
        h[t, e] = 5.0 + 0.1 * t
    return h


def test_expert_capacity_formula():
    assert expert_capacity(10, 1.0, 4) == math.ceil(10 / 4) == 3
    assert expert_capacity(10, 1.5, 4) == math.ceil(1.5 * 10 / 4) == 4
    assert expert_capacity(8, 2.0, 4, top_k=2) == 8
    assert expert_capacity(3, 0.01, 4) == 1  # at least one
    assert expert_capacity(3, 100.0, 4) == 3  # at most every token


def test_switch_drops_exactly_the_tokens_over_capacity_in_token_order():
    preferred = [0, 0, 1, 0, 2, 0, 0, 1, 3, 0]  # expert 0 wanted by 6 tokens, capacity ceil(1.0 * 10 / 4) = 3
    router, config = _identity_router("switch", capacity_factor=1.0)
    _, weights, index = router(_hand_logits(preferred))
    capacity = 3
    expected, seen = [], {}
    for e in preferred:
        seen[e] = seen.get(e, 0) + 1
        expected.append(e if seen[e] <= capacity else config.num_experts)
    assert (
        index[:, 0].tolist() == expected == [0, 0, 1, 0, 2, config.num_experts, config.num_experts, 1, 3, 4]
    )
    dropped = index[:, 0] == config.num_experts
    assert (weights[dropped] == 0).all() and (weights[~dropped] > 0).all()
    # A larger capacity factor keeps everyone.
    router.capacity_factor = 2.0  # capacity ceil(2 * 10 / 4) = 5 < 6: still drops the 6th
    assert (router(_hand_logits(preferred))[2][:, 0] == config.num_experts).sum() == 1
    router.capacity_factor = 2.4  # capacity 6
    assert (router(_hand_logits(preferred))[2][:, 0] < config.num_experts).all()


def test_switch_dropped_tokens_get_zero_block_output():
    config = tiny_router_config("switch", capacity_factor=1.0)
    torch.manual_seed(0)
    block = HfMoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        block.experts.gate_up_proj.normal_(0.0, 0.5)
        block.experts.down_proj.normal_(0.0, 0.5)
        block.gate.weight.zero_()
        block.gate.weight[:, :4] = torch.eye(4)
    preferred = [0, 0, 1, 0, 2, 0, 0, 1, 3, 0]
    h = _hand_logits(preferred) + 0.01 * torch.randn(10, 32)
    with torch.no_grad():
        out = block(h.unsqueeze(0))[0]  # (T, H)
    dropped = torch.tensor([False] * 5 + [True, True] + [False] * 2 + [True])
    assert (out[dropped] == 0).all()
    assert (out[~dropped].abs().sum(dim=-1) > 0).all()


def test_switch_dropped_tokens_pass_through_the_residual_in_the_model():
    model = tiny_model(seed=0, **{**ROUTER_CASES["switch"], "router_type": "switch", "capacity_factor": 0.5})
    layer = model.model.layers[0]
    captured = {}
    layer.post_attention_layernorm.register_forward_hook(
        lambda m, args, out: captured.update(residual=args[0])
    )
    layer.register_forward_hook(lambda m, args, out: captured.update(output=out))
    with torch.no_grad():
        out = model(torch.randint(3, 99, (1, 12)), output_router_logits=True)
    dropped = out.router_indices[0][:, 0] == model.config.num_experts  # (T,)
    assert dropped.sum() >= 12 - 4 * expert_capacity(12, 0.5, 4)  # capacity 2 per expert: >= 4 dropped
    residual, output = captured["residual"][0], captured["output"][0]
    assert torch.equal(output[dropped], residual[dropped])
    assert not torch.equal(output[~dropped], residual[~dropped])


@pytest.mark.parametrize("capacity_factor, tokens", [(None, 12), (0.5, 12), (1.0, 7), (3.0, 5)])
def test_expert_choice_gives_every_expert_exactly_its_capacity(capacity_factor, tokens):
    router, config = _router("expert_choice", capacity_factor=capacity_factor)
    _, weights, index = router(_hidden(tokens=tokens))
    capacity = expert_capacity(tokens, capacity_factor or config.num_experts_per_tok, config.num_experts)
    for e in range(config.num_experts):
        assert int((index == e).sum()) == capacity
        assert (index[:, e] == e).sum() == capacity  # slot e belongs to expert e
    # The chosen tokens of each expert are its highest-probability ones.
    probs = F.softmax(router.logits(_hidden(tokens=tokens)), dim=-1)
    for e in range(config.num_experts):
        chosen = set((index[:, e] == e).nonzero().flatten().tolist())
        assert chosen == set(probs[:, e].topk(capacity).indices.tolist())
        torch.testing.assert_close(weights[sorted(chosen), e], probs[sorted(chosen), e])


def test_noisy_topk_noise_only_in_training():
    router, config = _router("noisy_topk")
    with torch.no_grad():
        router.noise_weight.normal_(0.0, 0.5)
    h = _hidden()
    reference = TopKSoftmaxRouter(config).eval()
    reference.weight.data.copy_(router.weight.data)
    eval_a, eval_b = router(h), router(h)
    for a, b, ref in zip(eval_a, eval_b, reference(h)):
        assert torch.equal(a, b)
        assert torch.equal(a, ref)
    router.train()
    train_a, train_b = router(h)[0], router(h)[0]
    assert not torch.equal(train_a, train_b)
    assert not torch.equal(train_a, eval_a[0])


@pytest.mark.parametrize("router_type", ["topk_softmax", "softmax_topk", "switch", "sigmoid_topk"])
def test_jitter_only_in_training(router_type):
    router, _ = _router(router_type, router_jitter_noise=0.2)
    h = _hidden()
    clean = F.linear(h, router.weight)
    torch.testing.assert_close(router(h)[0].float(), clean)
    router.train()
    jittered_a, jittered_b = router(h)[0], router(h)[0]
    assert not torch.allclose(jittered_a.float(), clean)
    assert not torch.equal(jittered_a, jittered_b)


def test_group_limited_routing_stays_in_the_chosen_groups():
    overrides = dict(num_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True)
    router, config = _router("sigmoid_topk", **overrides)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0.0, 0.2)
    h = _hidden(tokens=64)
    logits, _, index = router(h)
    per_group = config.num_experts // config.n_group
    scores = logits.sigmoid() + router.e_score_correction_bias  # (T, E)
    group_scores = scores.view(-1, config.n_group, per_group).topk(2, dim=-1).values.sum(-1)  # (T, G)
    best_groups = group_scores.topk(config.topk_group, dim=-1).indices  # (T, topk_group)
    ungrouped_differs = 0
    for t in range(h.shape[0]):
        groups = {e // per_group for e in index[t].tolist()}
        assert groups <= set(best_groups[t].tolist())
        ungrouped_differs += set(index[t].tolist()) != set(
            scores[t].topk(config.num_experts_per_tok).indices.tolist()
        )
    assert ungrouped_differs > 0  # the group limit changed some choices: the check above is not vacuous


def _skewed_sigmoid_model(**overrides):
    model = tiny_model(
        seed=0,
        router_type="sigmoid_topk",
        num_experts=4,
        num_experts_per_tok=1,
        router_bias_update_rate=0.02,
        **overrides,
    )
    with torch.no_grad():
        for layer in model.model.layers:
            # Skewed toward experts 0 and 1.
            layer.mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.6, 0.3, 0.0, 0.0]))
    return model


def _load_std(model, ids) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    model.train(was_training)
    loads = [torch.bincount(idx.flatten(), minlength=5)[:4].float() for idx in out.router_indices]
    return torch.stack(loads).std(dim=-1).mean().item()


def test_bias_update_moves_load_toward_balance():
    model = _skewed_sigmoid_model()
    ids = torch.randint(3, 99, (4, 16), generator=torch.Generator().manual_seed(0))
    before = _load_std(model, ids)
    biases_before = [layer.mlp.gate.e_score_correction_bias.clone() for layer in model.model.layers]
    model.train()
    for _ in range(30):
        with torch.no_grad():
            model(ids)
    after = _load_std(model, ids)
    assert after < 0.5 * before
    for layer, bias in zip(model.model.layers, biases_before):
        delta = layer.mlp.gate.e_score_correction_bias - bias
        assert delta[0] < 0 < delta[3]  # over-loaded expert pushed down, under-loaded pulled up


def test_bias_does_not_move_in_eval():
    model = _skewed_sigmoid_model()
    bias = model.model.layers[0].mlp.gate.e_score_correction_bias.clone()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(3, 99, (2, 8)))
    assert torch.equal(model.model.layers[0].mlp.gate.e_score_correction_bias, bias)
    assert model.model.layers[0].mlp.gate.load_since_update.sum() == 0


def test_manual_bias_update_only_on_request():
    model = _skewed_sigmoid_model(router_bias_update="manual")
    gate = model.model.layers[0].mlp.gate
    assert isinstance(gate, SigmoidTopKRouter)
    bias = gate.e_score_correction_bias.clone()
    model.train()
    ids = torch.randint(3, 99, (2, 8))
    with torch.no_grad():
        model(ids)
        model(ids)
    assert torch.equal(gate.e_score_correction_bias, bias)
    assert gate.load_since_update.sum() == 2 * ids.numel()  # two forwards, top-1
    model.update_router_biases()
    assert not torch.equal(gate.e_score_correction_bias, bias)
    assert gate.load_since_update.sum() == 0
    moved = (gate.e_score_correction_bias - bias).abs()
    torch.testing.assert_close(moved[moved > 0], torch.full_like(moved[moved > 0], 0.02))


def test_bias_update_rate_zero_never_moves():
    model = tiny_model(seed=0, router_type="sigmoid_topk", **ROUTER_CASES["sigmoid_topk"])
    model.train()
    with torch.no_grad():
        model(torch.randint(3, 99, (2, 8)))
    for layer in model.model.layers:
        assert layer.mlp.gate.e_score_correction_bias.abs().sum() == 0
