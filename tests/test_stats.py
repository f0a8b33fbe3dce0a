"""router_statistics against a hand computation (Python loops over tokens) on a tiny model."""

import json
import math

import pytest
import torch

from hf_moe import HfMoeForCausalLM, RouterStatistics, router_statistics
from tests.helpers.tiny import tiny_model, tiny_router_config


def _hand_stats(outputs, config, attention_mask=None) -> dict:
    """Per layer: counts, load, dropped fraction and mean entropy, from plain Python over the tokens."""
    num_experts = config.num_experts
    keep = None if attention_mask is None else attention_mask.reshape(-1).tolist()
    result = {"counts": [], "load": [], "dropped": [], "entropy": []}
    for logits, indices in zip(outputs.router_logits, outputs.router_indices):
        counts = [0] * num_experts
        dropped = slots = unpicked = tokens = 0
        entropies = []
        for t in range(logits.shape[0]):
            if keep is not None and not keep[t]:
                continue
            tokens += 1
            row = indices[t].tolist()
            for e in row:
                slots += 1
                if e == num_experts:
                    dropped += 1
                else:
                    counts[e] += 1
            unpicked += all(e == num_experts for e in row)
            if config.router_type == "sigmoid_topk":
                scores = [1 / (1 + math.exp(-x)) for x in logits[t].tolist()]
            else:
                scores = [math.exp(x) for x in logits[t].tolist()]
            probs = [s / sum(scores) for s in scores]
            entropies.append(-sum(p * math.log(p) for p in probs if p > 0))
        result["counts"].append(counts)
        result["load"].append([c / sum(counts) for c in counts])
        frac = unpicked / tokens if config.router_type == "expert_choice" else dropped / slots
        result["dropped"].append(frac)
        result["entropy"].append(sum(entropies) / len(entropies))
    return result


def _assert_matches(stats: RouterStatistics, hand: dict) -> None:
    assert stats.tokens_per_expert == hand["counts"]
    for got, want in zip(stats.expert_load, hand["load"], strict=True):
        assert got == pytest.approx(want, abs=1e-9)
    assert stats.dropped_fraction == pytest.approx(hand["dropped"], abs=1e-9)
    assert stats.entropy == pytest.approx(hand["entropy"], abs=1e-5)


@pytest.mark.parametrize(
    "router_type, overrides",
    [
        ("softmax_topk", {}),
        ("sigmoid_topk", {}),
        # capacity 0.5 -> ceil(0.5 * 16 / 4) = 2 tokens per expert: 16 tokens, at most 8 kept, so drops
        # happen.
        ("switch", {"capacity_factor": 0.5}),
        # capacity 0.5 -> each expert picks 2 of 16 tokens: at least 8 tokens get no expert.
        ("expert_choice", {"capacity_factor": 0.5}),
    ],
)
def test_statistics_match_hand_computation(router_type, overrides):
    torch.manual_seed(0)
    config = tiny_router_config(router_type, **overrides)
    model = HfMoeForCausalLM(config).eval()
    input_ids = torch.randint(3, 99, (2, 8))
    with torch.no_grad():
        out = model(input_ids, output_router_logits=True)
    stats = router_statistics(out, config=config)
    hand = _hand_stats(out, config)
    _assert_matches(stats, hand)
    assert stats.layers == config.moe_layers == [0, 1]
    assert stats.num_tokens == 16
    for load in stats.expert_load:
        assert sum(load) == pytest.approx(1.0)
    if router_type in ("switch", "expert_choice"):
        assert all(d >= 0.5 for d in stats.dropped_fraction)  # the capacity forces drops
    else:
        assert stats.dropped_fraction == [0.0, 0.0]
    for h in stats.entropy:
        assert 0.0 < h <= math.log(config.num_experts) + 1e-6


def test_padding_is_excluded():
    model = tiny_model(seed=1)
    input_ids = torch.randint(3, 99, (2, 6))
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    stats = router_statistics(out, attention_mask=attention_mask, config=model.config)
    _assert_matches(stats, _hand_stats(out, model.config, attention_mask))
    assert stats.num_tokens == 10
    assert sum(stats.tokens_per_expert[0]) == 10 * model.config.num_experts_per_tok
    # The padded positions do count when no mask is given: the figures differ.
    unmasked = router_statistics(out, config=model.config)
    assert unmasked.num_tokens == 12
    assert unmasked.tokens_per_expert != stats.tokens_per_expert


def test_model_and_inputs_equals_outputs():
    model = tiny_model(seed=2, first_k_dense_replace=1)
    input_ids = torch.randint(3, 99, (1, 9))
    from_model = router_statistics(model, input_ids)
    with torch.no_grad():
        out = model(input_ids, output_router_logits=True)
    assert from_model == router_statistics(out, config=model.config)
    assert from_model.layers == [1]  # layer 0 is dense


def test_to_dict_and_table():
    model = tiny_model(seed=3)
    stats = router_statistics(model, torch.randint(3, 99, (1, 5)))
    data = stats.to_dict()
    json.dumps(data)
    assert data["tokens_per_expert"] == stats.tokens_per_expert
    assert data["load_imbalance"] == pytest.approx([max(x) * 4 for x in stats.expert_load])
    table = stats.format_table()
    assert len(table.splitlines()) == 2 + len(stats.layers) + 1
    assert f"{stats.expert_load[1][0]:.3f}" in table.splitlines()[3]
    with pytest.raises(AttributeError):
        stats.num_tokens = 0  # frozen


def test_errors_name_the_fix():
    model = tiny_model(seed=4)
    with torch.no_grad():
        out = model(torch.randint(3, 99, (1, 4)), output_router_logits=True)
        plain = model(torch.randint(3, 99, (1, 4)))
    with pytest.raises(ValueError, match="config"):
        router_statistics(out)
    with pytest.raises(ValueError, match="output_router_logits=True"):
        router_statistics(plain, config=model.config)
    with pytest.raises(ValueError, match="input_ids"):
        router_statistics(model)
    with pytest.raises(ValueError, match="attention_mask"):
        router_statistics(out, attention_mask=torch.ones(3, 4), config=model.config)


# ---- the one routing summary (issue 14): stats, RouterMonitor and the balancing loss agree ---------------------


def test_expert_choice_dropped_is_fraction_of_tokens_no_expert_picked():
    # capacity factor 0.5 -> each of the 4 experts picks 2 of the 12 rows (padding competes too), so some real
    # tokens get no expert. The old monitor reported the share of empty slots, about 1 - capacity/E, whatever the
    # tokens got.
    from hf_moe.training import RouterMonitor

    torch.manual_seed(5)
    config = tiny_router_config("expert_choice", capacity_factor=0.5)
    model = HfMoeForCausalLM(config).eval()
    input_ids = torch.randint(3, 99, (2, 6))
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with RouterMonitor(model) as monitor, torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
        logged = monitor.summary()
    stats = router_statistics(out, attention_mask=attention_mask, config=config)
    keep = attention_mask.reshape(-1).bool()
    want = []
    for indices in out.router_indices:
        real = indices[keep]  # (10, E): slot e holds e when expert e picked the token, else the sentinel E
        unpicked = sum(all(e == config.num_experts for e in row.tolist()) for row in real)
        want.append(unpicked / 10)
        slot_share = (real == config.num_experts).float().mean().item()
        assert unpicked / 10 != pytest.approx(slot_share)  # the two definitions differ on this input
    assert stats.dropped_fraction == pytest.approx(want, abs=1e-12)
    assert logged["moe/dropped"] == pytest.approx(sum(want) / len(want), abs=1e-12)
    assert [logged[f"moe/layer_{i}/dropped"] for i in range(2)] == pytest.approx(want, abs=1e-12)
    assert 0 < min(want)


@pytest.mark.parametrize("router_type", ["softmax_topk", "sigmoid_topk", "switch"])
def test_routing_summary_reproduces_the_model_losses(router_type):
    from functools import partial

    from hf_moe.modeling.modeling_hf_moe import router_probabilities
    from hf_moe.stats import routing_summary

    torch.manual_seed(6)
    overrides = {"capacity_factor": 0.5} if router_type == "switch" else {}
    config = tiny_router_config(router_type, **overrides)
    model = HfMoeForCausalLM(config).eval()
    input_ids = torch.randint(3, 99, (2, 7))
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    probabilities = partial(router_probabilities, router_type=router_type)
    summaries = [
        routing_summary(logits, indices, config.num_experts, probabilities, attention_mask)
        for logits, indices in zip(out.router_logits, out.router_indices)
    ]
    aux = torch.stack([s.aux_loss for s in summaries]).mean()
    z = torch.stack([s.z_loss for s in summaries]).mean()
    torch.testing.assert_close(aux, out.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z, out.z_loss, rtol=1e-5, atol=1e-6)
    # the gradients flow to the router as the model's loss does
    (grad_summary,) = torch.autograd.grad(aux + z, out.router_logits[0], retain_graph=True)
    (grad_model,) = torch.autograd.grad(out.aux_loss + out.z_loss, out.router_logits[0])
    torch.testing.assert_close(grad_summary, grad_model, rtol=1e-5, atol=1e-7)
    # and adding two forwards' sums equals one summary of both
    both = summaries[0] + summaries[0]
    assert int(both.num_tokens) == 2 * 13
    torch.testing.assert_close(both.entropy, summaries[0].entropy)
