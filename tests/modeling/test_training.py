"""Training-mode behaviour: gradient checkpointing changes nothing, the noisy router learns its noise, and the
aux-loss-free bias counts each training forward once."""

import pytest
import torch

from tests.helpers.tiny import tiny_model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("router_type", ["softmax_topk", "sigmoid_topk"])
def test_gradient_checkpointing_gives_the_same_gradients(router_type):
    model = tiny_model(seed=0, router_type=router_type, num_shared_experts=1, router_z_loss_coef=0.01)
    model.train()
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, ids)
    # transformers 5.2x renamed it activation_checkpointing_enable; 5.19 (vLLM venv) has only the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    loss_gc, grads_gc = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss_gc, loss)
    assert grads_gc.keys() == grads.keys()
    assert any("experts.gate_up_proj" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_gc[name], grad, msg=name)


def test_noisy_router_trains_its_noise_projection():
    model = tiny_model(seed=0, router_type="noisy_topk")
    model.train()
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    _, grads = _loss_and_grads(model, ids)
    for layer in (0, 1):
        grad = grads[f"model.layers.{layer}.mlp.gate.noise_weight"]
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bias_update_counts_each_training_forward_once():
    model = tiny_model(
        seed=0, router_type="sigmoid_topk", router_bias_update_rate=0.01, router_bias_update="manual"
    )
    model.train()
    ids = torch.randint(3, 99, (2, 5))
    with torch.no_grad():
        model(ids)
    gate = model.model.layers[0].mlp.gate
    # k assignments per token, counted once per forward.
    assert gate.load_since_update.sum() == ids.numel() * model.config.num_experts_per_tok


def test_logits_to_keep():
    model = tiny_model(seed=0)
    ids = torch.randint(3, 99, (2, 6))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1])
