"""Normalised routers' weights sum to one exactly, which is what makes copy-upcycled experts reproduce the MLP."""

import pytest
import torch

from hf_moe.modeling.modeling_hf_moe import ROUTERS, sum_to_one
from tests.helpers.tiny import tiny_router_config


def test_sum_to_one_is_exact_and_the_same_function():
    torch.manual_seed(0)
    weights = torch.rand(1000, 4) + 1e-3
    exact = sum_to_one(weights)
    # Summed in float64, the float32 rows add up to exactly 1 (plain division leaves rounding residue).
    assert torch.all(exact.double().sum(-1) == 1.0)
    plain = weights / weights.sum(-1, keepdim=True)
    assert (plain.double().sum(-1) != 1.0).any()
    torch.testing.assert_close(exact, plain)


@pytest.mark.parametrize("router_type", ["topk_softmax", "softmax_topk", "sigmoid_topk"])
def test_copied_experts_reproduce_the_mlp_output_bit_for_bit_rows(router_type):
    torch.manual_seed(0)
    config = tiny_router_config(router_type, norm_topk_prob=True)
    router = ROUTERS[router_type](config).eval()
    torch.nn.init.normal_(router.weight, std=1.0)
    _, weights, _ = router(torch.randn(257, config.hidden_size))
    assert torch.all(weights.double().sum(-1) == 1.0)
