"""Normalised routers' weights sum to one exactly, which is what makes copy-upcycled experts reproduce the MLP."""

import pytest
import torch

from hf_moe.modeling.modeling_hf_moe import ROUTERS, softmax_of_top, sum_to_one
from tests.helpers.tiny import tiny_router_config


@pytest.mark.parametrize("k", [2, 4, 8])
def test_sum_to_one_is_exact_for_two_and_within_one_rounding_beyond(k):
    torch.manual_seed(0)
    weights = torch.rand(1000, k) + 1e-3
    exact = sum_to_one(weights)
    plain = weights / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(exact, plain)  # the same function
    exact_err = (exact.double().sum(-1) - 1.0).abs()
    plain_err = (plain.double().sum(-1) - 1.0).abs()
    if k == 2:
        assert torch.all(exact_err == 0.0)  # 1 - w is exact in float32 for w >= 1/2
    assert exact_err.max() <= 2.0**-25  # at most one rounding of the smallest weight (<= 1/k)
    assert exact_err.mean() < plain_err.mean()


@pytest.mark.parametrize("router_type", ["topk_softmax", "softmax_topk", "sigmoid_topk"])
def test_normalised_routers_sum_to_one_exactly_for_top_2(router_type):
    torch.manual_seed(0)
    config = tiny_router_config(router_type, norm_topk_prob=True, num_experts_per_tok=2)
    router = ROUTERS[router_type](config).eval()
    torch.nn.init.normal_(router.weight, std=1.0)
    _, weights, _ = router(torch.randn(257, config.hidden_size))
    assert torch.all(weights.double().sum(-1) == 1.0)


@pytest.mark.parametrize("k", [2, 3, 8])
def test_sorted_rows_take_the_short_way_to_the_same_weights(k):
    """`descending=True` (rows sorted as topk returns them) gives what the argmin form gives, and `softmax_of_top`
    is the softmax of the kept logits with that renormalisation (for k=2 a sigmoid of the gap)."""
    torch.manual_seed(0)
    logits = (torch.randn(1000, k) * 4).sort(dim=-1, descending=True).values
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(sum_to_one(probs, descending=True), sum_to_one(probs))
    weights = softmax_of_top(logits)
    # Against the float64 softmax: float32's exp, the k-term sum, the division and the renormalisation round values
    # <= 1, each by at most 2**-24 (vectorised exp kernels differ between CPUs by an ulp or two).
    exact = torch.softmax(logits.double(), dim=-1)
    torch.testing.assert_close(weights.double(), exact, rtol=0, atol=(k + 3) * 2.0**-24)
    err = (weights.double().sum(-1) - 1.0).abs()
    assert err.max() <= (0.0 if k == 2 else 2.0**-25)
    # Gradients flow as through the softmax.
    logits.requires_grad_(True)
    (softmax_of_top(logits) * torch.arange(k)).sum().backward()
    reference = logits.detach().clone().requires_grad_(True)
    (torch.softmax(reference, dim=-1) * torch.arange(k)).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad, rtol=0, atol=1e-6)
