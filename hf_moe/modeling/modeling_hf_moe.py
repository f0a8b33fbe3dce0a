"""The hf_moe model, read top to bottom in data-flow order:
config -> router -> experts -> sparse MoE block -> the base family's decoder -> model -> causal-LM head.

hf_moe owns the MoE block; transformers owns the rest. The decoder (attention with every backend the base supports,
norms, rotary, caches, generation, gradient checkpointing) is the base family's own model, built by transformers
from `config.text_config`, with the `mlp` of each MoE layer replaced by `HfMoeSparseMoeBlock`. Tensor names outside
the MLPs are the base's own.

This file ships as Hub remote code: it imports only torch, transformers and its sibling config module.
"""

import json
import math
import os
import struct
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from packaging import version
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.nn.utils.parametrize import is_parametrized
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING
from transformers.utils import can_return_tuple

from .configuration_hf_moe import HfMoeConfig, expert_activation
from .cpu_kernel import fused_experts
from .experts import (
    DEFAULT_EXPERTS_IMPLEMENTATION,
    SENTINEL_AWARE_IMPLEMENTATIONS,
    HfMoeExperts,
    fused_fits,
    fused_max_rows_per_expert,
    one_token_experts,
)

# A CPU decoding batch routes on the host up to this many router logits (tokens x experts): above it the tensor
# ops' cost no longer exceeds the Python loop's (BENCHMARKS.md, router cost in a decoding step).
HOST_ROUTING_MAX_ROUTER_LOGITS = 256

# The transformers releases this code is tested on (the remote-code contract): older or newer ones are refused with
# a message rather than risk wrong outputs. Keep in sync with pyproject.toml.
SUPPORTED_TRANSFORMERS = (version.Version("5.19.0"), version.Version("5.25.0"))


def check_transformers_version(installed: str = transformers.__version__) -> None:
    """Raise if the installed transformers is outside the tested range (override: HF_MOE_ALLOW_ANY_TRANSFORMERS=1)."""
    current = version.Version(version.Version(installed).base_version)
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= current < high and os.environ.get("HF_MOE_ALLOW_ANY_TRANSFORMERS") != "1":
        raise RuntimeError(
            f"hf_moe supports transformers >={low},<{high}; this environment has {installed}. Install a supported "
            f"release (pip install 'transformers>={low},<{high}') or set HF_MOE_ALLOW_ANY_TRANSFORMERS=1 to try anyway."
        )


# ================================================================================================================
# Routers. Contract: router(h (T, H)) -> (router_logits (T, E), top_k_weights (T, K), top_k_index (T, K)).
# An assignment that is dropped (over capacity) or absent (expert choice) has index E (a sentinel, one past the
# last expert) and weight 0: the experts skip it and the token passes through the residual connection.
# ================================================================================================================


class HfMoeRouter(nn.Module):
    """Base router: a bias-free linear map from the hidden state to one logit per expert.

    A router class also carries its policy, so that a new router is one class: what it means for the losses and
    statistics (`probabilities`), for exact upcycling (`weights_sum_to_one`), for model cards (`description`), for
    export to native architectures (`routing_family`) and for serving (`batch_dependence`)."""

    description: str = ""
    # Whether `capacity_factor` applies (tokens beyond an expert's capacity are dropped).
    uses_capacity: bool = False

    @staticmethod
    def probabilities(router_logits: torch.Tensor) -> torch.Tensor:
        """(T, E) routing distribution (rows sum to one) used by the balancing loss and the statistics."""
        return F.softmax(router_logits.float(), dim=-1)

    @classmethod
    def weights_sum_to_one(cls, config: HfMoeConfig) -> str | None:
        """None if the top-k weights sum to one for every token in eval (so copied experts reproduce the dense
        MLP), else why not."""
        return None

    @classmethod
    def routing_family(cls, config: HfMoeConfig) -> str:
        """The inference-time routing as native architectures distinguish it: "softmax_renorm" (softmax over the
        top-k logits: Mixtral, Qwen with norm_topk_prob), "softmax" (top-k of the full softmax), "sigmoid"
        (DeepSeek-V3 / GLM-4.5), or "unexportable: <why>"."""
        raise NotImplementedError

    @classmethod
    def batch_dependence(cls, config: HfMoeConfig) -> str | None:
        """None if a token's routing depends on that token alone (servable by vLLM), else why not."""
        return None

    def __init__(self, config: HfMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.hidden_dim = config.get_text_config().hidden_size
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))

    def jitter(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            # Switch Transformer's multiplicative input jitter, training only.
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            return hidden_states * noise
        return hidden_states

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(self.jitter(hidden_states), self.weight)  # (T, E)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # Whether `route_one` has a host form: CPU decoding (a token or a small batch) then reads the logits once and
    # routes in Python, instead of some ten small tensor ops (HfMoeSparseMoeBlock._decode_on_host).
    host_routing: bool = False

    def route_one(self, logits: list[float]) -> tuple[list[int], list[float]]:
        """One token's routing from its E logits, on the host: (experts, weights) as `forward` gives them in
        eval, to within one float32 rounding of each weight (ties may be taken in another order)."""
        raise NotImplementedError


def _f32(value: float) -> float:
    """`value` rounded to float32, as the tensor path stores routing weights."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _host_top_k(logits: list[float], top_k: int) -> list[int]:
    return sorted(range(len(logits)), key=logits.__getitem__, reverse=True)[:top_k]


def _host_sum_to_one(weights: list[float]) -> list[float]:
    """`sum_to_one(..., descending=True)` on the host: float32 weights, the last one minus the others."""
    total = sum(weights)
    head = [_f32(w / total) for w in weights[:-1]]
    return [*head, _f32(1.0 - sum(head))]


def sum_to_one(weights: torch.Tensor, *, descending: bool = False) -> torch.Tensor:
    """Rows of non-negative (T, K) weights scaled to sum to one, with the smallest weight replaced by one minus the
    others. The same function, but the float row then sums to one exactly for k=2 (1 - w is exact for w >= 1/2)
    and to within half an ulp of the smallest weight beyond, instead of drifting by ulps of the largest. An upcycled
    model whose experts are copies of one MLP then reproduces that MLP (sum_k w_k y = y) to rounding.

    `descending=True` promises rows sorted largest first (as `topk` returns them): the smallest is then the last
    column, and no argmin and scatter are needed (decoding runs this once per layer and token)."""
    weights = weights / weights.sum(dim=-1, keepdim=True)
    top_k = weights.shape[-1]
    if top_k == 1:
        return weights
    if descending:
        head = weights[..., :-1]  # (T, K-1)
        rest = head if top_k == 2 else head.sum(dim=-1, keepdim=True, dtype=torch.float64)  # (T, 1)
        return torch.cat([head, (1.0 - rest).to(weights.dtype)], dim=-1)
    smallest = weights.argmin(dim=-1, keepdim=True)  # (T, 1)
    rest = weights.scatter(-1, smallest, 0.0).sum(dim=-1, keepdim=True, dtype=torch.float64)
    return weights.scatter(-1, smallest, (1.0 - rest).to(weights.dtype))


def softmax_of_top(top_logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the k logits `topk` kept, (T, K) sorted largest first, in float32; rows sum to one as
    `sum_to_one` makes them. For k=2 the softmax is a sigmoid of the logit gap, 1/(1 + exp(l2 - l1)): three small
    ops instead of the softmax and the renormalisation."""
    if top_logits.shape[-1] == 2:
        first = torch.sigmoid((top_logits[..., :1] - top_logits[..., 1:]).float())  # (T, 1), >= 1/2
        return torch.cat([first, 1.0 - first], dim=-1)
    return sum_to_one(F.softmax(top_logits, dim=-1, dtype=torch.float32), descending=True)


class TopKSoftmaxRouter(HfMoeRouter):
    """Mixtral: top-k over the logits, then softmax over the k selected logits (weights sum to one)."""

    description = "Mixtral: top-k of the router logits, softmax over the k kept (weights sum to one)"

    @classmethod
    def routing_family(cls, config: HfMoeConfig) -> str:
        return "softmax_renorm"

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.logits(hidden_states)  # (T, E)
        top_logits, top_k_index = torch.topk(router_logits, self.top_k, dim=-1)  # (T, K)
        top_k_weights = softmax_of_top(top_logits).to(router_logits.dtype)
        return router_logits, top_k_weights, top_k_index

    host_routing = True

    def route_one(self, logits: list[float]) -> tuple[list[int], list[float]]:
        experts = _host_top_k(logits, self.top_k)
        top = [logits[e] for e in experts]
        if len(top) == 2:  # softmax_of_top's sigmoid of the gap; 1 - w is exact for w >= 1/2
            first = _f32(1.0 / (1.0 + math.exp(top[1] - top[0])))
            return experts, [first, _f32(1.0 - first)]
        return experts, _host_sum_to_one([math.exp(v - top[0]) for v in top])


class SoftmaxTopKRouter(HfMoeRouter):
    """Qwen-MoE: softmax over all experts, then top-k; renormalised iff `norm_topk_prob`."""

    description = "Qwen-MoE: softmax over all experts, then top-k"

    @classmethod
    def weights_sum_to_one(cls, config: HfMoeConfig) -> str | None:
        return None if config.norm_topk_prob else "softmax_topk without norm_topk_prob: weights sum to < 1"

    @classmethod
    def routing_family(cls, config: HfMoeConfig) -> str:
        return "softmax_renorm" if config.norm_topk_prob else "softmax"

    def __init__(self, config: HfMoeConfig):
        super().__init__(config)
        self.norm_topk_prob = config.norm_topk_prob

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.logits(hidden_states)  # (T, E)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)  # (T, K)
        if self.norm_topk_prob:
            top_k_weights = sum_to_one(top_k_weights, descending=True)
        return router_logits, top_k_weights.to(router_logits.dtype), top_k_index

    host_routing = True

    def route_one(self, logits: list[float]) -> tuple[list[int], list[float]]:
        experts = _host_top_k(logits, self.top_k)
        peak = logits[experts[0]]
        top = [math.exp(logits[e] - peak) for e in experts]
        if self.norm_topk_prob:
            return experts, _host_sum_to_one(top)
        total = sum(math.exp(v - peak) for v in logits)
        return experts, [_f32(w / total) for w in top]


class SigmoidTopKRouter(HfMoeRouter):
    """DeepSeek-V3: sigmoid scores; selection uses `scores + e_score_correction_bias` restricted to the best
    `topk_group` of `n_group` expert groups; weights are the unbiased scores, renormalised iff `norm_topk_prob`,
    times `routed_scaling_factor`. The bias is moved toward balanced load without an auxiliary loss
    (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing"): +rate for under-loaded experts, -rate for
    over-loaded ones, from the load counted in training forwards."""

    description = "DeepSeek-V3: sigmoid scores, bias-corrected selection (aux-loss-free balancing)"

    @staticmethod
    def probabilities(router_logits: torch.Tensor) -> torch.Tensor:
        # Normalised sigmoid scores: DeepSeek-V3's sequence-wise balance loss form.
        scores = router_logits.float().sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True)

    @classmethod
    def weights_sum_to_one(cls, config: HfMoeConfig) -> str | None:
        if not config.norm_topk_prob:
            return "sigmoid_topk without norm_topk_prob: weights do not sum to one"
        if config.routed_scaling_factor != 1.0:
            return f"sigmoid_topk with routed_scaling_factor={config.routed_scaling_factor}: weights sum to that factor"
        return None

    @classmethod
    def routing_family(cls, config: HfMoeConfig) -> str:
        return "sigmoid"

    def __init__(self, config: HfMoeConfig):
        super().__init__(config)
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.bias_update_rate = config.router_bias_update_rate
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))
        # Load counted since the last bias update; not part of the checkpoint.
        self.load_since_update = nn.Buffer(
            torch.zeros(self.num_experts, dtype=torch.float32), persistent=False
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The gate runs in float32, as DeepSeek-V3 does: sigmoid scores of nearby experts are close.
        router_logits = F.linear(self.jitter(hidden_states).float(), self.weight.float())  # (T, E)
        scores = router_logits.sigmoid()
        scores_for_choice = scores + self.e_score_correction_bias  # (T, E)
        if self.n_group > 1:
            grouped = scores_for_choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, G)
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.num_experts)
            scores_for_choice = scores_for_choice.masked_fill(~expert_mask, float("-inf"))
        top_k_index = scores_for_choice.topk(self.top_k, dim=-1, sorted=False).indices  # (T, K)
        top_k_weights = scores.gather(1, top_k_index)
        if self.norm_topk_prob:
            top_k_weights = sum_to_one(
                top_k_weights + 1e-20 / self.top_k
            )  # sigmoid scores are > 0; eps as DeepSeek
        top_k_weights = top_k_weights * self.routed_scaling_factor
        if self.training and self.bias_update_rate > 0:
            with torch.no_grad():
                self.load_since_update += torch.bincount(
                    top_k_index.reshape(-1), minlength=self.num_experts
                ).float()
        return router_logits, top_k_weights, top_k_index

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply the aux-loss-free update from the load counted since the last call, then reset the count. Under
        torch.distributed the counts of all ranks are summed first, so every rank moves its bias alike."""
        load = self.load_since_update
        if (
            self.bias_update_rate > 0
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            torch.distributed.all_reduce(load)
        if self.bias_update_rate > 0 and load.sum() > 0:
            self.e_score_correction_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


class NoisyTopKRouter(HfMoeRouter):
    """Shazeer et al. 2017 noisy top-k gating: in training, logits + N(0, 1) * softplus(h W_noise^T); top-k of
    the noisy logits, softmax over the k kept. Without noise (eval) it equals `topk_softmax`."""

    description = "Shazeer et al. 2017: noisy top-k gating (noise in training only)"

    @classmethod
    def routing_family(cls, config: HfMoeConfig) -> str:
        return "softmax_renorm"  # the noise is training-only

    def __init__(self, config: HfMoeConfig):
        super().__init__(config)
        self.noise_weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.logits(hidden_states)  # (T, E)
        if self.training:
            noise_std = F.softplus(F.linear(hidden_states, self.noise_weight))  # (T, E)
            router_logits = router_logits + torch.randn_like(router_logits) * noise_std
        top_logits, top_k_index = torch.topk(router_logits, self.top_k, dim=-1)
        top_k_weights = softmax_of_top(top_logits).to(router_logits.dtype)
        return router_logits, top_k_weights, top_k_index


def expert_capacity(num_tokens: int, capacity_factor: float, num_experts: int, top_k: int = 1) -> int:
    """Tokens one expert may take: ceil(capacity_factor * num_tokens * top_k / num_experts), at most num_tokens."""
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


class SwitchRouter(HfMoeRouter):
    """Switch Transformer (Fedus et al. 2021): top-1 expert weighted by its softmax probability. With a
    `capacity_factor`, each expert takes at most `expert_capacity(T, factor, E)` tokens in token order; the rest
    are dropped (sentinel index E, weight 0) and pass through the residual connection."""

    description = "Switch Transformer: top-1, softmax probability as weight"
    uses_capacity = True

    @classmethod
    def weights_sum_to_one(cls, config: HfMoeConfig) -> str | None:
        return "switch weights a token by its top-1 softmax probability (< 1) and may drop tokens"

    @classmethod
    def routing_family(cls, config: HfMoeConfig) -> str:
        if config.capacity_factor is not None:
            return (
                f"unexportable: router_type='switch' with capacity_factor={config.capacity_factor} drops tokens; "
                "native architectures are dropless (set capacity_factor=None to keep every token)"
            )
        return "softmax"

    @classmethod
    def batch_dependence(cls, config: HfMoeConfig) -> str | None:
        if config.capacity_factor is None:
            return None
        return (
            f"router_type='switch' with capacity_factor={config.capacity_factor}: which tokens are dropped depends on "
            "the other tokens in the batch; set capacity_factor=None (dropless) to serve it"
        )

    def __init__(self, config: HfMoeConfig):
        super().__init__(config)
        self.capacity_factor = config.capacity_factor

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.logits(hidden_states)  # (T, E)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_k_weights, top_k_index = probs.max(dim=-1, keepdim=True)  # (T, 1)
        if self.capacity_factor is not None:
            capacity = expert_capacity(hidden_states.shape[0], self.capacity_factor, self.num_experts)
            one_hot = F.one_hot(top_k_index[:, 0], self.num_experts)  # (T, E)
            position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1, keepdim=True) - 1  # (T, 1) rank in queue
            dropped = position >= capacity
            top_k_index = top_k_index.masked_fill(dropped, self.num_experts)
            top_k_weights = top_k_weights.masked_fill(dropped, 0.0)
        return router_logits, top_k_weights.to(router_logits.dtype), top_k_index


class ExpertChoiceRouter(HfMoeRouter):
    """Expert choice (Zhou et al. 2022): each expert picks its `expert_capacity(T, c, E)` highest-probability
    tokens, with c = `capacity_factor` (default `num_experts_per_tok`), so every expert gets exactly its
    capacity and a token may get 0..E experts. Returns (T, E) index/weight tensors where slot e holds e if
    expert e chose the token, else the sentinel E with weight 0.

    Decoding limit: the choice is made among the tokens of one forward pass, so it is not causal and a
    one-token decoding step would route differently; the config therefore requires `use_cache=False`.
    Padding tokens compete for capacity like any other token."""

    description = "Expert choice (Zhou et al. 2022): each expert picks its tokens"
    uses_capacity = True

    @classmethod
    def weights_sum_to_one(cls, config: HfMoeConfig) -> str | None:
        return "expert_choice routing gives each token a variable number of experts with weights that do not sum to one"

    @classmethod
    def routing_family(cls, config: HfMoeConfig) -> str:
        return (
            "unexportable: router_type='expert_choice' (experts pick tokens; every native architecture is "
            "token-choice)"
        )

    @classmethod
    def batch_dependence(cls, config: HfMoeConfig) -> str | None:
        return (
            "router_type='expert_choice': each expert picks its top tokens among all tokens of a forward pass, which "
            "is not causal and changes with whatever other requests vLLM batches alongside"
        )

    def __init__(self, config: HfMoeConfig):
        super().__init__(config)
        self.capacity_factor = config.capacity_factor or float(config.num_experts_per_tok)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.logits(hidden_states)  # (T, E)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # (T, E)
        num_tokens = hidden_states.shape[0]
        capacity = expert_capacity(num_tokens, self.capacity_factor, self.num_experts)
        chosen_probs, chosen_tokens = probs.t().topk(capacity, dim=-1)  # (E, C)
        experts = torch.arange(self.num_experts, device=probs.device).unsqueeze(-1).expand_as(chosen_tokens)
        top_k_index = torch.full_like(probs, self.num_experts, dtype=torch.long)  # (T, E)
        top_k_index[chosen_tokens, experts] = experts
        top_k_weights = torch.zeros_like(probs)
        top_k_weights[chosen_tokens, experts] = chosen_probs
        return router_logits, top_k_weights.to(router_logits.dtype), top_k_index


ROUTERS: dict[str, type[HfMoeRouter]] = {
    "topk_softmax": TopKSoftmaxRouter,
    "softmax_topk": SoftmaxTopKRouter,
    "sigmoid_topk": SigmoidTopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "expert_choice": ExpertChoiceRouter,
}


def router_probabilities(router_logits: torch.Tensor, router_type: str) -> torch.Tensor:
    """Per-token routing distribution over experts (rows sum to one) of router `router_type` (its policy)."""
    return ROUTERS[router_type].probabilities(router_logits)


# ================================================================================================================
# Experts: fused gated weights gate_up_proj (E, 2I, H), down_proj (E, H, I) -- `experts.py`, with its reference
# forward and the named kernels beside it. Then the shared experts and the sparse MoE block.
# ================================================================================================================


class HfMoeMLP(nn.Module):
    """Gated MLP with the base's activation: the (fused) shared experts."""

    def __init__(self, config: HfMoeConfig, intermediate_size: int):
        super().__init__()
        hidden_size = config.get_text_config().hidden_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[expert_activation(config.get_text_config())]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class HfMoeSparseMoeBlock(nn.Module):
    """router -> routed experts (+ shared experts, optionally sigmoid-gated as in Qwen2-MoE). Takes the place of
    the base decoder layer's `mlp`: (B, S, H) in, (B, S, H) out."""

    def __init__(self, config: HfMoeConfig):
        super().__init__()
        self.config = config
        hidden_size = config.get_text_config().hidden_size
        self.gate = ROUTERS[config.router_type](config)
        self.experts = HfMoeExperts(config)
        self.shared_experts = (
            HfMoeMLP(config, config.shared_expert_intermediate_size)
            if config.num_shared_experts > 0
            else None
        )
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def _host_decodable(self, flat: torch.Tensor) -> bool:
        """Whether this call may route on the host (`_decode_on_host`): eager CPU inference on one token, or on a
        decoding batch (at most `HOST_ROUTING_MAX_ROUTER_LOGITS` router logits) that the fused experts kernel then
        computes; a router with a host form, the default experts kernels, and nothing that watches or rewrites the
        router or the experts (hooks, parametrizations, PEFT layers): those see the general path."""
        gate, experts = self.gate, self.experts
        num_tokens = flat.shape[0]
        return (
            (
                num_tokens == 1
                or (
                    num_tokens * self.config.num_experts <= HOST_ROUTING_MAX_ROUTER_LOGITS
                    and num_tokens * self.config.num_experts_per_tok
                    <= fused_max_rows_per_expert() * self.config.num_experts
                )
            )
            and getattr(gate, "host_routing", False)  # a replaced gate (PEFT, a user module) has none
            and not self.training
            and not torch.is_grad_enabled()
            and flat.device.type == "cpu"
            and gate.weight.dtype == torch.float32  # host weights are float32-rounded, as that path's are
            and self.config._experts_implementation in ("hf_moe", "hf_moe_cpu")
            and type(experts) is HfMoeExperts
            and not torch.compiler.is_compiling()
            and not (gate._forward_hooks or gate._forward_pre_hooks)
            and not (experts._forward_hooks or experts._forward_pre_hooks)
            and not (_global_forward_hooks or _global_forward_pre_hooks)
            and not (is_parametrized(gate) or is_parametrized(experts))
            and (
                num_tokens == 1
                or fused_fits(flat, experts.gate_up_proj, experts.down_proj, experts.activation)
            )
        )

    def _decode_on_host(self, flat: torch.Tensor) -> torch.Tensor:
        """Tokens (T, H) routed on the host: the router's (T, E) logits read once, each token's top-k and weights
        computed in Python (`route_one`), then the experts in one call. The general path spends some twelve small
        tensor ops on routing and grouping, each costing more than its arithmetic on a CPU (BENCHMARKS.md: router
        cost in a decoding step). One token: `one_token_experts` (the fused kernel, or matrix-vector products);
        a batch: the fused kernel on the slots grouped by expert, tokens in order within a group."""
        experts_module = self.experts
        logits = F.linear(flat, self.gate.weight).tolist()  # (T, E)
        if len(logits) == 1:
            experts, weights = self.gate.route_one(logits[0])
            return one_token_experts(
                flat,
                experts,
                weights,
                experts_module.gate_up_proj,
                experts_module.down_proj,
                experts_module.act_fn,
                experts_module.activation,
            )
        num_experts = experts_module.num_experts
        slots = []  # (expert, token, weight); sentinels (dropped) skipped
        for token, row in enumerate(logits):
            experts, weights = self.gate.route_one(row)
            slots.extend((e, token, w) for e, w in zip(experts, weights) if e < num_experts)
        slots.sort()  # by expert, then token (a token meets an expert at most once, so weights never compare)
        counts = [0] * num_experts
        for expert, _, _ in slots:
            counts[expert] += 1
        return fused_experts(
            flat.contiguous(),
            torch.tensor([token for _, token, _ in slots], dtype=torch.long),
            counts,
            torch.tensor([weight for _, _, weight in slots], dtype=torch.float32),
            experts_module.gate_up_proj,
            experts_module.down_proj,
            experts_module.activation,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)  # (T, H)
        if self._host_decodable(flat):
            out = self._decode_on_host(flat)  # (T, H)
        else:
            _, top_k_weights, top_k_index = self.gate(flat)
            if self.config._experts_implementation not in SENTINEL_AWARE_IMPLEMENTATIONS:
                # transformers' experts kernels do not skip sentinel slots: point them at expert 0 with weight 0.
                dropped = top_k_index == self.experts.num_experts
                top_k_index = top_k_index.masked_fill(dropped, 0)
                top_k_weights = top_k_weights.masked_fill(dropped, 0.0)
            out = self.experts(flat, top_k_index, top_k_weights)  # (T, H)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.view(batch_size, seq_len, hidden_dim)


# ================================================================================================================
# The base family's decoder with MoE blocks, and the pretrained-model plumbing.
# ================================================================================================================


def _moe_init_weights(base_init, module: nn.Module, std: float) -> None:
    """Initialise hf_moe's modules; every other module with the base family's own `_init_weights`."""
    if isinstance(module, HfMoeExperts):
        init.normal_(module.gate_up_proj, mean=0.0, std=std)
        init.normal_(module.down_proj, mean=0.0, std=std)
    elif isinstance(module, HfMoeRouter):
        init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, NoisyTopKRouter):
            init.zeros_(module.noise_weight)  # Shazeer et al. 2017 start the noise projection at zero
        if isinstance(module, SigmoidTopKRouter):
            init.zeros_(module.e_score_correction_bias)
            init.zeros_(module.load_since_update)
    elif isinstance(module, nn.Linear) and _is_in_moe_block(module):
        init.normal_(module.weight, mean=0.0, std=std)
    else:
        base_init(module)


def _is_in_moe_block(module: nn.Module) -> bool:
    return getattr(module, "_hf_moe_owned", False)


def _build_base(config: HfMoeConfig, *, with_head: bool) -> PreTrainedModel:
    """The base family's own model (`XxxForCausalLM` or `XxxModel`) built by transformers from `config.text_config`,
    with the `mlp` of every MoE layer replaced by an `HfMoeSparseMoeBlock`."""
    text_config = config.text_config
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if with_head else MODEL_MAPPING
    if type(text_config) not in mapping:
        raise ValueError(
            f"hf_moe: transformers {transformers.__version__} has no {'causal-LM' if with_head else 'base'} model for "
            f"text_config.model_type={text_config.model_type!r}"
        )
    # Built on the meta device: the base's own MLPs (dense, or a native family's MoE blocks) are replaced below and
    # never take memory. The caller's `post_init` then initialises every tensor (from_pretrained: loads them).
    device = torch.get_default_device()
    with torch.device("meta"):
        base = mapping[type(text_config)](text_config)
    decoder = base.get_decoder() if with_head else base
    layers = getattr(decoder, "layers", None)
    if (
        layers is None
        or len(layers) != config.num_hidden_layers
        or not all(hasattr(layer, "mlp") for layer in layers)
    ):
        raise ValueError(
            f"hf_moe: the {text_config.model_type} decoder does not keep its MLPs as `layers[i].mlp`, so hf_moe cannot "
            "place its MoE blocks in it"
        )
    with torch.device("meta"):
        for idx in config.moe_layers:
            block = HfMoeSparseMoeBlock(config)
            for sub in block.modules():
                sub._hf_moe_owned = True
            layers[idx].mlp = block
    if device.type != "meta":
        base.to_empty(device=device)
    # No transformers model class stays a registered child (HfMoeModel adopts the decoder's modules), so
    # transformers' init dispatch reaches every module through HfMoePreTrainedModel._init_weights, which hands
    # the base's modules to the base family's own `_init_weights`.
    return base


class HfMoePreTrainedModel(PreTrainedModel):
    """Shared plumbing. An hf_moe model presents the modules of a base-family model (built by `_build_base`) as its
    own: the same module objects in the same `_modules` dict, so that a module replaced on either side (PEFT, vLLM,
    accelerate) is replaced on both, and forwards to that model."""

    config_class = HfMoeConfig
    config: HfMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    # The MoE block compiles with fullgraph=True (no host sync while compiling); the rest is the base family's, so
    # `_adopt` takes the base's flag.
    _can_compile_fullgraph = False
    _supports_attention_backend = True

    def _adopt(self, base: PreTrainedModel) -> None:
        self._modules = base._modules
        self._parameters = base._parameters
        self._buffers = base._buffers
        self._non_persistent_buffers_set = base._non_persistent_buffers_set
        self.__dict__["_hf_moe_base"] = base  # not a registered child: its parameters are already ours
        self._no_split_modules = list(base._no_split_modules or [])
        self._tied_weights_keys = type(base)._tied_weights_keys
        self._can_compile_fullgraph = type(base)._can_compile_fullgraph

    @property
    def hf_moe_base(self) -> PreTrainedModel:
        """The base-family model this model forwards to (sharing every module with it)."""
        return self.__dict__["_hf_moe_base"]

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf_moe_base.training = mode
        return self

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        _moe_init_weights(self.hf_moe_base._init_weights, module, self.config.initializer_range)

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint with missing, unexpected or mismatched tensors is an
        error rather than a log line and a silently random-initialised model, and an index that points outside the
        checkpoint folder is refused. Pass `strict=False` for the transformers behaviour."""
        if not strict:
            return super().from_pretrained(*args, **kwargs)
        if args and isinstance(args[0], (str, Path)) and Path(args[0]).is_dir():
            _check_checkpoint_files(Path(args[0]), kwargs.get("subfolder") or "")
        want_info = kwargs.pop("output_loading_info", False)
        # transformers raises a bare RuntimeError on a shape mismatch; load, then report it with the rest below.
        # An explicit ignore_mismatched_sizes=True accepts mismatched (re-initialised) tensors.
        accept_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        model, info = super().from_pretrained(
            *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
        kinds = ("missing_keys", "unexpected_keys") + (() if accept_mismatched else ("mismatched_keys",))
        problems = {k: sorted(info.get(k) or []) for k in kinds}
        if not hasattr(model, "lm_head"):
            # A base model (AutoModel) loaded from a causal-LM checkpoint leaves the head behind, by design.
            problems["unexpected_keys"] = [
                k for k in problems["unexpected_keys"] if not k.startswith("lm_head.")
            ]
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            details = "; ".join(
                f"{k}: {v[:8]}{' ...' if len(v) > 8 else ''} ({len(v)})" for k, v in problems.items()
            )
            raise ValueError(
                f"{cls.__name__}.from_pretrained: the checkpoint does not match the config ({details}). The weights "
                "would be partly random. Check that config.json belongs to these safetensors files, or pass "
                "strict=False to load anyway."
            )
        return (model, info) if want_info else model

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # Our own experts kernels (dropless, sentinel-aware) are the default; "eager" is the reference forward, and
        # transformers' kernels ("grouped_mm", "batched_mm") stay available on request.
        if requested_experts is None:
            return DEFAULT_EXPERTS_IMPLEMENTATION
        return super().get_correct_experts_implementation(requested_experts)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for "@use_experts_implementation" in the model's own module; it is in experts.py.
        return True

    def update_router_biases(self) -> None:
        """Apply the aux-loss-free bias update of every `sigmoid_topk` router (no-op for other routers). Called
        after each training forward when `config.router_bias_update == "forward"`; call it once per optimizer step
        yourself with `"manual"` (e.g. with gradient accumulation or gradient checkpointing)."""
        for module in self.modules():
            if isinstance(module, SigmoidTopKRouter):
                module.update_bias()


def _check_checkpoint_files(folder: Path, subfolder: str) -> None:
    """Before transformers reads a local checkpoint: refuse a safetensors index whose entries point outside the folder
    (`../x` or absolute paths), and name the file of a missing, truncated or garbled shard (safetensors' own errors
    do not). Only headers are read."""
    root = (folder / subfolder).resolve()
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{index}: not a valid safetensors index ({err}); re-save the checkpoint"
            ) from err
        files = set()
        for name, file in weight_map.items():
            if (
                not isinstance(file, str)
                or Path(file).is_absolute()
                or not (root / file).resolve().is_relative_to(root)
            ):
                raise ValueError(
                    f"{index}: tensor {name!r} points at {file!r}, outside the checkpoint folder {root}; refusing to "
                    "read files outside it. Fix the index so every shard is a file inside the folder."
                )
            files.add(root / file)
    elif (root / "model.safetensors").is_file():
        files = {root / "model.safetensors"}
    else:
        return  # transformers reports the missing weights itself
    for path in sorted(files):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: shard named by {index.name} is missing; the checkpoint is incomplete"
            )
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < header_len <= size - 8:
                raise ValueError(
                    f"{path}: not a complete safetensors file (truncated or corrupt header); re-save it"
                )
            try:
                header = json.loads(f.read(header_len))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError) as err:
                raise ValueError(
                    f"{path}: garbled safetensors header ({err}); re-save the checkpoint"
                ) from err
        if 8 + header_len + end > size:
            raise ValueError(
                f"{path}: truncated ({size} bytes, the header describes {8 + header_len + end}); re-download or "
                "re-save the checkpoint"
            )


@contextmanager
def _recording_routers(model: nn.Module, enabled: bool):
    """Collect every router's (logits, weights, index) during one forward, in layer order, through forward hooks
    that live only for that forward (no global state)."""
    records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    if not enabled:
        yield records
        return
    handles = [
        module.register_forward_hook(lambda _m, _args, output: records.append(output))
        for module in model.modules()
        if isinstance(module, HfMoeRouter)
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


# transformers 5.24 renamed the outputs' `past_key_values` to `cache`; the old name still works there but warns, on
# reads and in constructors. Both are spelt with the name this release uses.
CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _output_cache(out: Any) -> Any:
    """The KV cache of a base model's output, under this release's name."""
    return getattr(out, CACHE_FIELD, None)


@dataclass
class HfMoeModelOutputWithPast(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus the chosen experts of every MoE layer.

    router_indices: one (T, K) tensor per MoE layer, sentinel `num_experts` for dropped assignments.
    """

    router_indices: tuple[torch.Tensor, ...] | None = None


class HfMoeModel(HfMoePreTrainedModel):
    """The base family's decoder (`LlamaModel`, `Gemma3TextModel`, ...) with hf_moe MoE blocks; the base model for
    `AutoModel`. Its modules are the base decoder's, under the same names (`embed_tokens`, `layers`, `norm`), and
    its forward is the base decoder's, plus the router outputs."""

    def __init__(self, config: HfMoeConfig, decoder: PreTrainedModel | None = None):
        check_transformers_version()
        super().__init__(config)
        self._adopt(decoder if decoder is not None else _build_base(config, with_head=False))
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_indices: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> HfMoeModelOutputWithPast | tuple:
        want_logits = (
            self.config.output_router_logits if output_router_logits is None else output_router_logits
        )
        with _recording_routers(self, bool(want_logits or output_router_indices)) as records:
            if past_key_values is not None:
                # Passed on only when given: transformers >= 5.24 names the cache `cache` (which arrives in kwargs)
                # and warns when both are set.
                kwargs["past_key_values"] = past_key_values
            out = self.hf_moe_base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                return_dict=True,
                **kwargs,
            )
        result = HfMoeModelOutputWithPast(
            last_hidden_state=out.last_hidden_state,
            **{CACHE_FIELD: _output_cache(out)},
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
            router_logits=tuple(r[0] for r in records) if want_logits else None,
            router_indices=tuple(r[2] for r in records) if output_router_indices else None,
        )
        return result if return_dict is not False else result.to_tuple()


# ================================================================================================================
# Routing summary: the one computation behind the router losses, `hf_moe.router_statistics` and the training
# monitor (`hf_moe.training.RouterMonitor`).
# ================================================================================================================


def token_mask(attention_mask: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
    """(B, S_total) padding mask -> (num_rows,) bool over the routed rows of this forward (its last S columns,
    so a decoding step with a KV cache keeps its own tokens). None when there is no 2-D mask (every row counts).

    Raises:
        ValueError: a 2-D mask whose batch size does not divide the routed rows.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    if (
        num_rows % attention_mask.shape[0] != 0
        or num_rows // attention_mask.shape[0] > attention_mask.shape[1]
    ):
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
        return (
            self.num_tokens,
            self.tokens_per_expert,
            self.prob_sum,
            self.dropped,
            self.dropped_of,
            self.entropy_sum,
            self.z_sum,
        )

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
    counts = torch.bincount(
        router_indices.reshape(-1), minlength=num_experts + 1
    )  # (E + 1,), last = sentinel
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


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    router_indices: tuple[torch.Tensor, ...],
    num_experts: int,
    router_type: str,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch / GShard load-balancing loss (Fedus et al. 2021, eq. 4-6), averaged over MoE layers:
    E * sum_i f_i * P_i with f_i the assignments to expert i per token (from the experts actually chosen,
    dropped assignments excluded) and P_i the mean routing probability. Padding tokens (attention_mask == 0) are
    excluded. With top-k routing sum_i f_i = k, as in transformers' Mixtral/Qwen loss, so values match theirs.

    Args:
        router_logits: one (T, E) tensor per MoE layer.
        router_indices: one (T, K) tensor per MoE layer (sentinel E for dropped assignments).
    Returns:
        A scalar tensor.
    """
    if not router_logits:
        return torch.tensor(0.0)
    probabilities = ROUTERS[router_type].probabilities
    device = router_logits[0].device
    summaries = [
        routing_summary(logits.to(device), indices, num_experts, probabilities, attention_mask)
        for logits, indices in zip(router_logits, router_indices)
    ]
    return torch.stack([s.aux_loss for s in summaries]).mean()


def router_z_loss(
    router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2, averaged over
    MoE layers; padding tokens excluded."""
    if not router_logits:
        return torch.tensor(0.0)
    device = router_logits[0].device
    losses = []
    for logits in router_logits:
        z = torch.logsumexp(logits.to(device).float(), dim=-1).square()  # (T,)
        keep = token_mask(attention_mask, z.shape[0])
        losses.append(z.mean() if keep is None else z[keep.to(device)].sum() / keep.sum().clamp(min=1))
    return torch.stack(losses).mean()


@dataclass
class HfMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the router z-loss and the chosen experts of every MoE layer.

    z_loss: router z-loss (when `output_router_logits`).
    router_indices: one (T, K) tensor per MoE layer, sentinel `num_experts` for dropped assignments.
    """

    z_loss: torch.FloatTensor | None = None
    router_indices: tuple[torch.Tensor, ...] | None = None


class HfMoeForCausalLM(HfMoePreTrainedModel, GenerationMixin):
    """The base family's causal LM (`LlamaForCausalLM`, `Gemma3ForCausalLM`, ...: its head, logit scaling or
    soft-capping, loss) with hf_moe MoE blocks, plus the router losses."""

    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: HfMoeConfig):
        check_transformers_version()
        super().__init__(config)
        base = _build_base(config, with_head=True)
        # The base head's decoder becomes an HfMoeModel over the same modules: the checkpoint names stay the base's
        # (`model.layers...`), and no transformers model class sits inside, so transformers applies no per-family
        # key conversion when saving or loading (hf_moe checkpoints keep fused experts whatever the base).
        if "model" not in base._modules:
            raise ValueError(
                f"hf_moe: {type(base).__name__} keeps its decoder under {base.base_model_prefix!r}, not 'model'"
            )
        base._modules["model"] = HfMoeModel(config, decoder=base._modules["model"])
        self._adopt(base)
        self.vocab_size = config.vocab_size
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        output_router_indices: bool | None = None,
        **kwargs: Any,
    ) -> HfMoeCausalLMOutputWithPast:
        r"""Causal-LM forward of the base family. With `output_router_logits=True` (argument or config) the
        load-balancing loss and the router z-loss are computed and, when `labels` are given, added to the loss with
        `router_aux_loss_coef` and `router_z_loss_coef`."""
        want_logits = (
            self.config.output_router_logits if output_router_logits is None else output_router_logits
        )
        kwargs.pop("return_dict", None)
        with _recording_routers(self, bool(want_logits or output_router_indices)) as records:
            # The base head never computes router losses of its own (a native MoE base would add Mixtral's): ours are
            # computed below from the recorded routers.
            kwargs["output_router_logits"] = False
            out = self.hf_moe_base(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=True, **kwargs
            )
        router_logits = tuple(r[0] for r in records)
        router_indices = tuple(r[2] for r in records)
        loss, aux_loss, z_loss = out.loss, None, None
        if want_logits and router_logits:
            aux_loss = load_balancing_loss(
                router_logits,
                router_indices,
                self.config.num_experts,
                self.config.router_type,
                attention_mask,
            )
            z_loss = router_z_loss(router_logits, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
                loss = loss + self.config.router_z_loss_coef * z_loss.to(loss.device)
        if self.training and self.config.router_bias_update == "forward":
            self.update_router_biases()
        return HfMoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=out.logits,
            **{CACHE_FIELD: _output_cache(out)},
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
            router_logits=router_logits if want_logits else None,
            router_indices=router_indices if (want_logits or output_router_indices) else None,
        )


__all__ = [
    "HfMoeForCausalLM",
    "HfMoeModel",
    "HfMoePreTrainedModel",
    "HfMoeSparseMoeBlock",
    "HfMoeExperts",
    "HfMoeRouter",
    "ROUTERS",
    "load_balancing_loss",
    "router_z_loss",
    "router_probabilities",
]
