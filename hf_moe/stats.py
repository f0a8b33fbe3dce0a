"""Router statistics of an hf_moe model: per MoE layer, how the routed assignments spread over the experts,
how many were dropped, and how confident the router is. Computed from one forward pass; no global state.

Example:
```python
>>> from hf_moe import router_statistics
>>> stats = router_statistics(model, input_ids, attention_mask)      # runs the forward for you
>>> print(stats.format_table())
>>> out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
>>> stats = router_statistics(out, attention_mask=attention_mask, config=model.config)  # or reuse an output
```
"""

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from .modeling import HfMoeConfig
from .modeling.modeling_hf_moe import RoutingSummary, router_probabilities, routing_summary, token_mask


@dataclass(frozen=True)
class RouterStatistics:
    """Routing figures of one forward pass, one entry per MoE layer (padding tokens excluded).

    Attributes:
        layers: decoder-layer index of each MoE layer.
        router_type: `config.router_type`.
        num_experts: routed experts per layer.
        top_k: assignment slots per token (`num_experts_per_tok`; `num_experts` for expert choice).
        num_tokens: tokens counted (attention_mask == 1).
        tokens_per_expert: per layer, the assignments each expert received.
        expert_load: per layer, `tokens_per_expert` as a fraction of all kept assignments (sums to 1, or all
            zeros when nothing was routed).
        dropped_fraction: per layer, dropped assignments / (top_k * num_tokens); for expert choice the
            fraction of tokens that no expert picked.
        entropy: per layer, mean per-token entropy (nats) of the routing distribution `router_probabilities`;
            log(num_experts) is uniform routing.
    """

    layers: list[int]
    router_type: str
    num_experts: int
    top_k: int
    num_tokens: int
    tokens_per_expert: list[list[int]]
    expert_load: list[list[float]]
    dropped_fraction: list[float]
    entropy: list[float]

    def load_imbalance(self) -> list[float]:
        """Per layer, the largest expert load over the mean load (1.0 = perfectly balanced)."""
        return [max(load) * self.num_experts if sum(load) > 0 else 0.0 for load in self.expert_load]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field plus `load_imbalance`."""
        return {**asdict(self), "load_imbalance": self.load_imbalance()}

    def format_table(self) -> str:
        """A plain-text table: one row per MoE layer."""
        header = f"{'layer':>5}  {'dropped':>8}  {'entropy':>8}  {'max/mean':>8}  expert load"
        rows = [header, "-" * len(header)]
        for layer, dropped, entropy, imbalance, load in zip(
            self.layers, self.dropped_fraction, self.entropy, self.load_imbalance(), self.expert_load
        ):
            loads = " ".join(f"{x:.3f}" for x in load)
            rows.append(f"{layer:>5}  {dropped:>8.3f}  {entropy:>8.3f}  {imbalance:>8.2f}  {loads}")
        rows.append(
            f"{self.num_tokens} tokens, {self.num_experts} experts, top_k={self.top_k}, "
            f"router={self.router_type}, "
            f"uniform entropy={torch.log(torch.tensor(float(self.num_experts))).item():.3f}"
        )
        return "\n".join(rows)


# ================================================================================================================
# The one routing summary: the balancing loss, `router_statistics` and `RouterMonitor` all read these sums.
# A pure function of tensors (no config, no model), so it can live next to the routers in the modeling file.
# ================================================================================================================


def router_statistics(
    outputs_or_model: Any,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    config: HfMoeConfig | None = None,
) -> RouterStatistics:
    """Per-layer expert load, tokens per expert, dropped-token fraction and routing entropy.

    Args:
        outputs_or_model: an `HfMoeForCausalLM` output computed with `output_router_logits=True` (it holds
            `router_logits` and `router_indices`), or an hf_moe model, which is then run once on `input_ids`
            under `torch.no_grad()` with `output_router_logits=True`.
        input_ids: (B, S) token ids; required with a model, ignored with outputs.
        attention_mask: (B, S) mask; tokens where it is 0 (padding) are left out of every figure.
        config: the model's config; required with outputs, taken from the model otherwise.

    Returns:
        A frozen `RouterStatistics`.
    """
    if isinstance(outputs_or_model, torch.nn.Module):
        model = outputs_or_model
        if input_ids is None:
            raise ValueError(
                "router_statistics: pass input_ids when giving a model (it runs one forward pass)"
            )
        config = config or model.config
        with torch.no_grad():
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    else:
        outputs = outputs_or_model
        if config is None:
            raise ValueError(
                "router_statistics: pass config=model.config with a model output (the router type and the "
                "layer layout are not stored in the output)"
            )
    router_logits = getattr(outputs, "router_logits", None)
    router_indices = getattr(outputs, "router_indices", None)
    if not router_logits or not router_indices:
        raise ValueError(
            "router_statistics: the output has no router_logits/router_indices; run the model with "
            "output_router_logits=True (or pass the model and input_ids)"
        )
    if len(router_logits) != len(config.moe_layers):
        raise ValueError(
            f"router_statistics: {len(router_logits)} router outputs but the config has "
            f"{len(config.moe_layers)} MoE layers; pass the config of the model that produced the output"
        )

    num_experts = config.num_experts
    expert_choice = config.router_type == "expert_choice"
    probabilities = partial(router_probabilities, router_type=config.router_type)
    if attention_mask is not None:
        attention_mask = attention_mask.cpu()
    summaries = [
        routing_summary(
            logits.detach().float().cpu(),
            indices.detach().cpu(),
            num_experts,
            probabilities,
            attention_mask,
            expert_choice=expert_choice,
        )
        for logits, indices in zip(router_logits, router_indices)
    ]
    tokens_per_expert = [s.tokens_per_expert.tolist() for s in summaries]
    expert_load = [s.expert_load.tolist() for s in summaries]
    dropped_fraction = [s.dropped_fraction.item() for s in summaries]
    entropy = [s.entropy.double().item() for s in summaries]
    num_tokens = int(summaries[-1].num_tokens)

    return RouterStatistics(
        layers=list(config.moe_layers),
        router_type=config.router_type,
        num_experts=num_experts,
        top_k=num_experts if expert_choice else config.num_experts_per_tok,
        num_tokens=num_tokens,
        tokens_per_expert=tokens_per_expert,
        expert_load=expert_load,
        dropped_fraction=dropped_fraction,
        entropy=entropy,
    )


__all__ = ["RouterStatistics", "RoutingSummary", "router_statistics", "routing_summary", "token_mask"]
