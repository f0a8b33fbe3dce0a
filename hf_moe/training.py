"""Router-aware training: a monitor of router behaviour for any training loop, and a `transformers.Trainer`
callback that logs it and runs the aux-loss-free bias update of `sigmoid_topk` routers once per optimizer step.

Plain PyTorch loop:

```python
from hf_moe.training import RouterMonitor
monitor = RouterMonitor(model)            # hooks on every router; no global state
for batch in loader:
    loss = model(**batch, output_router_logits=True).loss   # LM loss + aux + z losses
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    model.update_router_biases()          # with config.router_bias_update == "manual"
    print(monitor.summary())              # expert load, dropped fraction, entropy, aux/z loss since last call
monitor.remove()
```

With `Trainer`: `Trainer(..., callbacks=[MoeTrainerCallback()])`. With TRL: `trl.SFTTrainer(...,
callbacks=[MoeTrainerCallback()])` (the callback also puts hf_moe's router losses into the loss TRL's fused LM
head computes; see `install_router_losses_for_trl` and `examples/trl_sft.py`).
"""

import math
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .modeling.modeling_hf_moe import (
    HfMoeRouter,
    RoutingSummary,
    SigmoidTopKRouter,
    router_probabilities,
    routing_summary,
)


class RouterMonitor:
    """Accumulates router statistics over the forwards of a model until `summary()` is called.

    Forward hooks on every hf_moe router add each forward's `hf_moe.stats.routing_summary` (the same sums the
    balancing loss and `router_statistics` use) per MoE layer: tokens per expert, routing probability mass,
    dropped assignments (expert choice: tokens no expert picked), entropy and the z-loss term. Padding tokens are
    excluded when the model is called with an `attention_mask` (captured by a pre-hook on the model). State lives
    in this object only.

    Args:
        model: an hf_moe model (possibly wrapped by DDP/FSDP/PEFT: routers are found by walking the modules).
        router_type: defaults to the model config's `router_type`.
    """

    def __init__(self, model: nn.Module, *, router_type: str | None = None):
        routers = [m for m in model.modules() if isinstance(m, HfMoeRouter)]
        if not routers:
            raise ValueError(
                "RouterMonitor: the model has no hf_moe router (is it an hf_moe model with MoE layers?)"
            )
        config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
        self.router_type = router_type or getattr(config, "router_type", "softmax_topk")
        self.num_experts = routers[0].num_experts
        self._probabilities = partial(router_probabilities, router_type=self.router_type)
        self._layers: list[RoutingSummary | None] = [None] * len(routers)
        self._mask: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        for i, router in enumerate(routers):
            self._handles.append(router.register_forward_hook(self._make_hook(i, router.num_experts)))

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _make_hook(self, layer: int, num_experts: int):
        @torch.no_grad()
        def hook(module: nn.Module, inputs: tuple, output: tuple) -> None:
            logits, _, index = output  # (T, E), _, (T, K)
            mask = self._mask
            if mask is not None and logits.shape[0] % mask.shape[0] != 0:
                mask = None  # a forward this mask does not describe (e.g. a packed batch): count every row
            summary = routing_summary(
                logits,
                index,
                num_experts,
                self._probabilities,
                mask,
                expert_choice=self.router_type == "expert_choice",
            ).detached()
            previous = self._layers[layer]
            self._layers[layer] = summary if previous is None else previous + summary

        return hook

    def expert_load(self) -> torch.Tensor:
        """(num_moe_layers, E) fraction of routed assignments per expert since the last reset."""
        return torch.stack(
            [
                s.expert_load if s is not None else torch.zeros(self.num_experts, dtype=torch.float64)
                for s in self._layers
            ]
        )

    def summary(self, *, reset: bool = True, per_layer: bool = True) -> dict[str, float]:
        """Scalar metrics since the last reset: `moe/aux_loss` (Switch/GShard, as the model computes it),
        `moe/z_loss`, `moe/load_cv` (coefficient of variation of expert load, 0 = balanced), `moe/load_max`
        (max load / mean load), `moe/dropped` (fraction of dropped assignments; for expert choice the fraction of
        tokens no expert picked), `moe/entropy` (mean routing entropy, nats); per layer too with `per_layer=True`
        (keys `moe/layer_{i}/...`). Empty if nothing ran."""
        rows = []
        for acc in self._layers:
            if acc is None or acc.num_tokens == 0:
                continue
            load = acc.expert_load
            routed = bool(load.sum() > 0)
            rows.append(
                {
                    "aux_loss": float(acc.aux_loss),
                    "z_loss": float(acc.z_loss),
                    "load_cv": float(load.std(unbiased=False) / load.mean()) if routed else 0.0,
                    "load_max": float(load.max() / load.mean()) if routed else 0.0,
                    "dropped": float(acc.dropped_fraction),
                    "entropy": float(acc.entropy),
                }
            )
        out: dict[str, float] = {}
        if rows:
            for key in rows[0]:
                out[f"moe/{key}"] = sum(r[key] for r in rows) / len(rows)
            if per_layer:
                for i, row in enumerate(rows):
                    out.update({f"moe/layer_{i}/{k}": v for k, v in row.items()})
        if reset:
            self.reset()
        return out

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._layers = [None] * len(self._layers)

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "RouterMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def update_router_biases(model: nn.Module) -> int:
    """Apply the aux-loss-free bias update of every `sigmoid_topk` router in `model` (wrapped or not); under
    `torch.distributed` the load counted on every rank is summed first so all ranks move their biases alike.
    Works on wrapped models (DDP, FSDP, PEFT), unlike `HfMoeForCausalLM.update_router_biases`.

    Returns:
        The number of routers updated.
    """
    routers = [m for m in model.modules() if isinstance(m, SigmoidTopKRouter) and m.bias_update_rate > 0]
    for router in routers:
        router.update_bias()
    return len(routers)


def _trl_fused_forward(model: nn.Module):
    """TRL's fused-LM-head forward if `trl.trainer.utils.add_fused_lm_head` patched `model`, else None. TRL sets it
    as an instance attribute whose function takes a `fused_lm_head` keyword."""
    forward = vars(model).get("forward")
    func = getattr(forward, "__func__", None)
    code = getattr(func, "__code__", None)
    return forward if code is not None and "fused_lm_head" in code.co_varnames else None


def install_router_losses_for_trl(model: nn.Module) -> bool:
    """Make TRL's fused LM head (`trl.SFTTrainer` >= 1.x patches the model's forward with it) train an hf_moe model
    with hf_moe's router losses.

    TRL's fused forward adds Mixtral's load-balancing loss, recomputed from the router logits with a softmax top-k,
    and no z-loss: wrong for `sigmoid_topk`, `switch` with capacity and `expert_choice` routers, and the z-loss
    (`router_z_loss_coef`) is lost. This wraps that forward: router forward hooks keep the experts each layer
    actually chose, and the output's `aux_loss` becomes `aux + (z_coef / aux_coef) * z` (from
    `hf_moe.stats.routing_summary`, as the model's own loss computes them), so the term TRL adds to the loss,
    `router_aux_loss_coef * aux_loss`, is exactly `aux_coef * aux + z_coef * z`. Without `fused_lm_head` the forward
    is untouched (generation, evaluation with logits). Idempotent.

    Args:
        model: the model given to the trainer (a PeftModel is unwrapped to its base model).
    Returns:
        True when the forward was wrapped (or already was), False when `model` has no TRL fused forward or is not
        an hf_moe model.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    fused = _trl_fused_forward(base)
    if fused is None or getattr(config, "model_type", None) != "hf_moe":
        return False
    if getattr(fused, "_hf_moe_router_losses", False):
        return True
    routers = [m for m in base.modules() if isinstance(m, HfMoeRouter)]
    probabilities = partial(router_probabilities, router_type=config.router_type)
    expert_choice = config.router_type == "expert_choice"
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    capturing = [False]

    def capture(module: nn.Module, inputs: tuple, output: tuple) -> None:
        if capturing[0]:  # only inside the wrapped call: gradient checkpointing re-runs routers in backward
            captured.append((output[0], output[2]))  # (T, E) logits, (T, K) indices

    for router in routers:
        router.register_forward_hook(capture)

    def forward(*args: Any, fused_lm_head: bool = False, **kwargs: Any):
        if not fused_lm_head:
            return fused(*args, **kwargs)
        captured.clear()
        capturing[0] = True
        try:
            out = fused(*args, fused_lm_head=True, **kwargs)
        finally:
            capturing[0] = False
        if getattr(out, "aux_loss", None) is None or not captured:
            return out  # TRL did not ask for router logits (router_aux_loss_coef=0): no router loss at all
        mask = kwargs.get("attention_mask")
        summaries = [
            routing_summary(
                logits, index, config.num_experts, probabilities, mask, expert_choice=expert_choice
            )
            for logits, index in captured
        ]
        captured.clear()
        aux = torch.stack([s.aux_loss for s in summaries]).mean()
        z = torch.stack([s.z_loss for s in summaries]).mean()
        aux_coef, z_coef = config.router_aux_loss_coef, config.router_z_loss_coef
        router_term = aux + (z_coef / aux_coef) * z if aux_coef else aux
        if out.loss is not None:
            out.loss = out.loss - aux_coef * out.aux_loss + aux_coef * router_term.to(out.loss.dtype)
        out.aux_loss = router_term
        return out

    forward._hf_moe_router_losses = True  # type: ignore[attr-defined]
    base.forward = forward
    return True


class MoeTrainerCallback(TrainerCallback):
    """`transformers.Trainer` callback for hf_moe models.

    - logs the `RouterMonitor` metrics (expert load balance, dropped fraction, routing entropy, aux and z loss)
      at every logging step;
    - switches `sigmoid_topk` aux-loss-free balancing to once per optimizer step (`router_bias_update="manual"`),
      so gradient accumulation does not multiply the update;
    - under `trl.SFTTrainer`, puts hf_moe's own router losses into the training loss (see
      `install_router_losses_for_trl`).

    Args:
        per_layer: also log per-layer metrics.
    """

    def __init__(self, *, per_layer: bool = False):
        self.per_layer = per_layer
        self.monitor: RouterMonitor | None = None
        self.bias_updates = 0
        self.router_losses_installed = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        self.monitor = RouterMonitor(model)
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and getattr(config, "model_type", None) == "hf_moe":
                config.router_bias_update = "manual"
        self.router_losses_installed = install_router_losses_for_trl(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None and update_router_biases(model):
            self.bias_updates += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is not None and logs is not None:
            stats = {
                k: round(v, 6)
                for k, v in self.monitor.summary(per_layer=self.per_layer).items()
                if math.isfinite(v)
            }
            logs.update(stats)  # seen by the reporting callbacks (console, TensorBoard, W&B, ...)
            # Trainer has already appended a copy of `logs` to the history; keep the history complete too.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(stats)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.remove()
            self.monitor = None
