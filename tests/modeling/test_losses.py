"""Router losses: the load-balancing loss ignores padding and equals transformers' Mixtral loss, the z-loss
equals a hand computation, and both enter the LM loss with their coefficients."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from hf_moe.modeling.modeling_hf_moe import load_balancing_loss, router_z_loss
from tests.helpers.tiny import tiny_model

SEQ, PAD = 7, 3


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 99, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _pad(ids: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add PAD padding tokens (id 0) to every row; returns ids, attention_mask, position_ids."""
    batch, seq = ids.shape
    pad = torch.zeros(batch, PAD, dtype=ids.dtype)
    real = torch.ones(batch, seq, dtype=torch.long)
    if side == "left":
        padded, mask = torch.cat([pad, ids], 1), torch.cat([torch.zeros_like(pad), real], 1)
    else:
        padded, mask = torch.cat([ids, pad], 1), torch.cat([real, torch.zeros_like(pad)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return padded, mask, position_ids


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("router_type", ["softmax_topk", "topk_softmax", "sigmoid_topk"])
def test_router_losses_unchanged_by_padding(side, router_type):
    model = tiny_model(seed=0, router_type=router_type)
    ids = _ids()
    padded, mask, position_ids = _pad(ids, side)
    with torch.no_grad():
        plain = model(ids, output_router_logits=True)
        masked = model(padded, attention_mask=mask, position_ids=position_ids, output_router_logits=True)
        unmasked = model(padded, position_ids=position_ids, output_router_logits=True)
    torch.testing.assert_close(masked.aux_loss, plain.aux_loss)
    torch.testing.assert_close(masked.z_loss, plain.z_loss)
    # Without the mask the padding tokens are counted and the loss moves: the check above is not vacuous.
    assert not torch.allclose(unmasked.aux_loss, plain.aux_loss)


def test_z_loss_matches_hand_computation():
    model = tiny_model(seed=1)
    ids = _ids()
    padded, mask, position_ids = _pad(ids, "left")
    with torch.no_grad():
        out = model(padded, attention_mask=mask, position_ids=position_ids, output_router_logits=True)
    keep = mask.reshape(-1).tolist()
    per_layer = []
    for logits in out.router_logits:
        values = [
            math.log(sum(math.exp(x) for x in row)) ** 2 for row, k in zip(logits.tolist(), keep) if k
        ]  # ST-MoE eq. 5: logsumexp(x)^2 per token, padding left out
        per_layer.append(sum(values) / len(values))
    assert out.z_loss.item() == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-5)
    assert router_z_loss(out.router_logits, mask).item() == pytest.approx(out.z_loss.item())


@pytest.mark.parametrize("padded", [False, True])
def test_aux_loss_equals_transformers_mixtral_loss(padded):
    # One MoE layer: transformers pools all layers' tokens before the product, hf_moe averages per-layer
    # losses (see the multi-layer test below); with one layer both are the same formula.
    model = tiny_model(seed=2, router_type="topk_softmax", first_k_dense_replace=1)
    assert model.config.moe_layers == [1]
    ids = _ids()
    kwargs = {}
    if padded:
        ids, mask, position_ids = _pad(ids, "left")
        kwargs = dict(attention_mask=mask, position_ids=position_ids)
    with torch.no_grad():
        out = model(ids, output_router_logits=True, **kwargs)
    expected = load_balancing_loss_func(
        out.router_logits,
        model.config.num_experts,
        model.config.num_experts_per_tok,
        kwargs.get("attention_mask"),
    )
    torch.testing.assert_close(out.aux_loss, expected)


def test_aux_loss_is_the_mean_of_per_layer_transformers_losses():
    model = tiny_model(seed=3, router_type="softmax_topk")
    assert len(model.config.moe_layers) == 2
    with torch.no_grad():
        out = model(_ids(), output_router_logits=True)
    per_layer = [load_balancing_loss_func((logits,), 4, 2) for logits in out.router_logits]
    torch.testing.assert_close(out.aux_loss, torch.stack(per_layer).mean())


def test_aux_loss_hand_computation_with_dropped_tokens():
    """Switch form E * sum_i f_i P_i with f_i from the kept assignments only (dropped ones count for no
    expert)."""
    model = tiny_model(seed=4, router_type="switch", num_experts_per_tok=1, capacity_factor=0.5)
    with torch.no_grad():
        out = model(_ids(), output_router_logits=True)
    num_experts = model.config.num_experts
    losses = []
    for logits, index in zip(out.router_logits, out.router_indices):
        assert (index == num_experts).any()  # capacity 0.5 drops tokens
        tokens = logits.shape[0]
        f = [sum(1 for e in index.flatten().tolist() if e == i) / tokens for i in range(num_experts)]
        probs = F.softmax(logits.double(), dim=-1)
        p = probs.mean(dim=0).tolist()
        losses.append(num_experts * sum(fi * pi for fi, pi in zip(f, p)))
    assert out.aux_loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    direct = load_balancing_loss(out.router_logits, out.router_indices, num_experts, "switch")
    assert direct.item() == pytest.approx(out.aux_loss.item())


def test_balanced_routing_gives_aux_loss_k():
    """A uniform router (zero weights) gives P_i = 1/E and, summed over experts, f_i = k: loss = k."""
    model = tiny_model(seed=5, router_type="softmax_topk")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
        out = model(_ids(), output_router_logits=True)
    torch.testing.assert_close(out.aux_loss, torch.tensor(float(model.config.num_experts_per_tok)))
    torch.testing.assert_close(out.z_loss, torch.tensor(math.log(model.config.num_experts) ** 2))


@pytest.mark.parametrize("padded", [False, True])
def test_router_losses_are_added_to_the_lm_loss_with_their_coefficients(padded):
    aux_coef, z_coef = 0.3, 0.05
    model = tiny_model(seed=6, router_aux_loss_coef=aux_coef, router_z_loss_coef=z_coef)
    ids = _ids()
    kwargs = {}
    labels = ids.clone()
    if padded:
        ids, mask, position_ids = _pad(ids, "left")
        labels = ids.masked_fill(mask == 0, -100)
        kwargs = dict(attention_mask=mask, position_ids=position_ids)
    with torch.no_grad():
        out = model(ids, labels=labels, output_router_logits=True, **kwargs)
        lm_only = model(ids, labels=labels, **kwargs)
    assert lm_only.aux_loss is None and lm_only.z_loss is None
    shift_logits = out.logits[:, :-1].reshape(-1, model.config.vocab_size)
    ce = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(lm_only.loss, ce)
    torch.testing.assert_close(out.loss, ce + aux_coef * out.aux_loss + z_coef * out.z_loss)
    assert out.aux_loss > 0 and out.z_loss > 0


def test_output_router_logits_from_the_config():
    model = tiny_model(seed=7, output_router_logits=True, router_aux_loss_coef=0.5)
    ids = _ids()
    with torch.no_grad():
        out = model(ids, labels=ids)
        off = model(ids, labels=ids, output_router_logits=False)
    assert out.aux_loss is not None and off.aux_loss is None
    torch.testing.assert_close(out.loss, off.loss + 0.5 * out.aux_loss + 0.0 * out.z_loss)


def test_router_losses_have_gradients_into_the_router():
    model = tiny_model(seed=8)
    out = model(_ids(), output_router_logits=True)
    (out.aux_loss + out.z_loss).backward()
    for layer in model.model.layers:
        assert layer.mlp.gate.weight.grad.abs().sum() > 0
    # The last layer's experts act after every router: the router losses cannot reach them. (Earlier experts
    # do get gradient, through the hidden states that later routers read.)
    assert model.model.layers[-1].mlp.experts.gate_up_proj.grad is None
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad.abs().sum() > 0
