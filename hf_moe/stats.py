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

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from .modeling import HfMoeConfig
from .modeling.modeling_hf_moe import router_probabilities


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


def token_mask(attention_mask: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
    """(B, S_total) padding mask -> (num_rows,) bool over the routed rows of this forward (its last S columns,
    so a decoding step with a KV cache keeps its own tokens). None when there is no 2-D mask (every row counts).

    Raises:
        ValueError: a 2-D mask whose batch size does not divide the routed rows.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    if num_rows % attention_mask.shape[0] != 0 or num_rows // attention_mask.shape[0] > attention_mask.shape[1]:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not match {num_rows} routed tokens; "
            "pass the (batch, seq_len) mask used for the forward pass"
        )
    seq_len = num_rows // attention_mask.shape[0]
    return attention_mask[:, -seq_len:].reshape(-1).bool()


@dataclass(frozen=True)
class RoutingSummary:
    """Sums over the non-padding tokens of one MoE layer (or of several forwards, added with `+`).

    Sums rather than means, so forwards accumulate exactly; the properties turn them into the reported figures.
    `prob_sum` and `z_sum` keep their autograd graph when the inputs have one (the balancing and z losses are
    built from them); every other field is a count.

    Attributes:
        num_tokens: () non-padding tokens.
        tokens_per_expert: (E,) routed assignments per expert (sentinel slots excluded).
        prob_sum: (E,) summed routing probabilities.
        dropped: () dropped assignments (top-k routers) or tokens that no expert picked (expert choice).
        dropped_of: () what `dropped` is a part of: assignment slots (tokens * K), or tokens for expert choice.
        entropy_sum: () summed per-token entropy (nats) of the routing distribution.
        z_sum: () summed logsumexp(logits)^2 (the router z-loss term).
    """

    num_tokens: torch.Tensor
    tokens_per_expert: torch.Tensor
    prob_sum: torch.Tensor
    dropped: torch.Tensor
    dropped_of: torch.Tensor
    entropy_sum: torch.Tensor
    z_sum: torch.Tensor

    def __add__(self, other: "RoutingSummary") -> "RoutingSummary":
        return RoutingSummary(*(a + b.to(a.device) for a, b in zip(self._fields(), other._fields())))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return (self.num_tokens, self.tokens_per_expert, self.prob_sum, self.dropped, self.dropped_of,
                self.entropy_sum, self.z_sum)

    def detached(self) -> "RoutingSummary":
        """float64 CPU copies without autograd history (for accumulating over many forwards)."""
        return RoutingSummary(*(t.detach().double().cpu() for t in self._fields()))

    @property
    def aux_loss(self) -> torch.Tensor:
        """Switch / GShard balancing loss E * sum_i f_i P_i (Fedus et al. 2021, eq. 4-6): f_i assignments and
        P_i probability mass per token; with top-k routing sum_i f_i = k, as in transformers' Mixtral/Qwen loss."""
        tokens = self.num_tokens.clamp_min(1)
        f = self.tokens_per_expert.to(self.prob_sum.dtype) / tokens  # (E,)
        return self.prob_sum.shape[-1] * (f * (self.prob_sum / tokens)).sum()

    @property
    def z_loss(self) -> torch.Tensor:
        """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
        return self.z_sum / self.num_tokens.clamp_min(1)

    @property
    def expert_load(self) -> torch.Tensor:
        """(E,) share of the routed assignments per expert (sums to 1; zeros when nothing was routed)."""
        counts = self.tokens_per_expert.double()
        return counts / counts.sum().clamp_min(1)

    @property
    def dropped_fraction(self) -> torch.Tensor:
        """Dropped assignments over all slots; for expert choice, the fraction of tokens no expert picked."""
        return self.dropped.double() / self.dropped_of.double().clamp_min(1)

    @property
    def entropy(self) -> torch.Tensor:
        """Mean per-token routing entropy (nats); log(E) is uniform routing."""
        return self.entropy_sum / self.num_tokens.clamp_min(1)


def routing_summary(
    router_logits: torch.Tensor,
    router_indices: torch.Tensor,
    num_experts: int,
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    *,
    expert_choice: bool = False,
) -> RoutingSummary:
    """Summarise how one MoE layer routed the non-padding tokens of one forward pass.

    Args:
        router_logits: (T, E) router logits.
        router_indices: (T, K) chosen experts, sentinel `num_experts` for a dropped assignment (expert choice:
            K = E, slot e holds e when expert e picked the token).
        num_experts: E.
        probabilities: (T, E) logits -> (T, E) routing distribution (rows sum to one), e.g.
            `partial(router_probabilities, router_type=config.router_type)`.
        attention_mask: (B, S_total) padding mask, 0 = padding; rows of this forward are its last S columns.
        expert_choice: count dropped *tokens* (no expert picked them) instead of dropped assignments: with expert
            choice most slots are empty by design (a token gets 0..E experts), so the slot fraction would be
            about 1 - capacity/E and say nothing about lost tokens.
    Returns:
        A `RoutingSummary`; `prob_sum` and `z_sum` carry gradients to the logits.
    """
    keep = token_mask(attention_mask, router_logits.shape[0])  # (T,) or None
    if keep is not None:
        keep = keep.to(router_logits.device)
        router_logits, router_indices = router_logits[keep], router_indices[keep.to(router_indices.device)]
    device = router_logits.device
    router_indices = router_indices.to(device)
    probs = probabilities(router_logits)  # (T', E)
    counts = torch.bincount(router_indices.reshape(-1), minlength=num_experts + 1)  # (E + 1,), last = sentinel
    num_tokens = torch.tensor(router_logits.shape[0], device=device)
    if expert_choice:
        dropped = (router_indices == num_experts).all(dim=-1).sum()
        dropped_of = num_tokens
    else:
        dropped = counts[num_experts:].sum()
        dropped_of = torch.tensor(router_indices.numel(), device=device)
    return RoutingSummary(
        num_tokens=num_tokens,
        tokens_per_expert=counts[:num_experts],
        prob_sum=probs.sum(dim=0),
        dropped=dropped,
        dropped_of=dropped_of,
        entropy_sum=-torch.special.xlogy(probs, probs).sum(),
        z_sum=torch.logsumexp(router_logits.float(), dim=-1).square().sum(),
    )


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
        routing_summary(logits.detach().float().cpu(), indices.detach().cpu(), num_experts, probabilities,
                        attention_mask, expert_choice=expert_choice)
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
