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

With `Trainer`: `Trainer(..., callbacks=[MoeTrainerCallback()])`.
"""

import math
from functools import partial

import torch
from torch import nn
from transformers import TrainerCallback

from .modeling.modeling_hf_moe import HfMoeRouter, SigmoidTopKRouter, router_probabilities
from .stats import RoutingSummary, routing_summary


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
            raise ValueError("RouterMonitor: the model has no hf_moe router (is it an hf_moe model with MoE layers?)")
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
                logits, index, num_experts, self._probabilities, mask,
                expert_choice=self.router_type == "expert_choice",
            ).detached()
            previous = self._layers[layer]
            self._layers[layer] = summary if previous is None else previous + summary

        return hook

    def expert_load(self) -> torch.Tensor:
        """(num_moe_layers, E) fraction of routed assignments per expert since the last reset."""
        return torch.stack(
            [s.expert_load if s is not None else torch.zeros(self.num_experts, dtype=torch.float64)
             for s in self._layers]
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


class MoeTrainerCallback(TrainerCallback):
    """`transformers.Trainer` callback for hf_moe models.

    - logs the `RouterMonitor` metrics (expert load balance, dropped fraction, routing entropy, aux and z loss)
      at every logging step;
    - switches `sigmoid_topk` aux-loss-free balancing to once per optimizer step (`router_bias_update="manual"`),
      so gradient accumulation does not multiply the update.

    Args:
        per_layer: also log per-layer metrics.
    """

    def __init__(self, *, per_layer: bool = False):
        self.per_layer = per_layer
        self.monitor: RouterMonitor | None = None
        self.bias_updates = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        self.monitor = RouterMonitor(model)
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and getattr(config, "model_type", None) == "hf_moe":
                config.router_bias_update = "manual"

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None and update_router_biases(model):
            self.bias_updates += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is not None and logs is not None:
            stats = {k: round(v, 6) for k, v in self.monitor.summary(per_layer=self.per_layer).items() if math.isfinite(v)}
            logs.update(stats)  # seen by the reporting callbacks (console, TensorBoard, W&B, ...)
            # Trainer has already appended a copy of `logs` to the history; keep the history complete too.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(stats)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.remove()
            self.monitor = None
