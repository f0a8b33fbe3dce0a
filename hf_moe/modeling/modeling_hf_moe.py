"""The hf_moe model, read top to bottom in data-flow order:
config -> router -> experts -> sparse MoE block -> attention -> decoder layer -> model -> causal-LM head.

This file ships as Hub remote code: it imports only torch, transformers and its sibling config module.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_hf_moe import HfMoeConfig
from .experts import DEFAULT_EXPERTS_IMPLEMENTATION, SENTINEL_AWARE_IMPLEMENTATIONS, HfMoeExperts

# ================================================================================================================
# Routers. Contract: router(h (T, H)) -> (router_logits (T, E), top_k_weights (T, K), top_k_index (T, K)).
# An assignment that is dropped (over capacity) or absent (expert choice) has index E (a sentinel, one past the
# last expert) and weight 0: the experts skip it and the token passes through the residual connection.
# ================================================================================================================


class HfMoeRouter(nn.Module):
    """Base router: a bias-free linear map from the hidden state to one logit per expert."""

    def __init__(self, config: HfMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.hidden_dim = config.hidden_size
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


def sum_to_one(weights: torch.Tensor) -> torch.Tensor:
    """Rows of non-negative (T, K) weights scaled to sum to one, with the smallest weight replaced by one minus the
    others. The same function, but the float row then sums to one exactly for k=2 (1 - w is exact for w >= 1/2)
    and to within half an ulp of the smallest weight beyond, instead of drifting by ulps of the largest. An upcycled
    model whose experts are copies of one MLP then reproduces that MLP (sum_k w_k y = y) to rounding."""
    weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights.shape[-1] == 1:
        return weights
    smallest = weights.argmin(dim=-1, keepdim=True)  # (T, 1)
    rest = weights.scatter(-1, smallest, 0.0).sum(dim=-1, keepdim=True, dtype=torch.float64)
    return weights.scatter(-1, smallest, (1.0 - rest).to(weights.dtype))


class TopKSoftmaxRouter(HfMoeRouter):
    """Mixtral: top-k over the logits, then softmax over the k selected logits (weights sum to one)."""

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.logits(hidden_states)  # (T, E)
        top_logits, top_k_index = torch.topk(router_logits, self.top_k, dim=-1)  # (T, K)
        top_k_weights = sum_to_one(F.softmax(top_logits, dim=-1, dtype=torch.float32)).to(router_logits.dtype)
        return router_logits, top_k_weights, top_k_index


class SoftmaxTopKRouter(HfMoeRouter):
    """Qwen-MoE: softmax over all experts, then top-k; renormalised iff `norm_topk_prob`."""

    def __init__(self, config: HfMoeConfig):
        super().__init__(config)
        self.norm_topk_prob = config.norm_topk_prob

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.logits(hidden_states)  # (T, E)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)  # (T, K)
        if self.norm_topk_prob:
            top_k_weights = sum_to_one(top_k_weights)
        return router_logits, top_k_weights.to(router_logits.dtype), top_k_index


class SigmoidTopKRouter(HfMoeRouter):
    """DeepSeek-V3: sigmoid scores; selection uses `scores + e_score_correction_bias` restricted to the best
    `topk_group` of `n_group` expert groups; weights are the unbiased scores, renormalised iff `norm_topk_prob`,
    times `routed_scaling_factor`. The bias is moved toward balanced load without an auxiliary loss
    (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing"): +rate for under-loaded experts, -rate for
    over-loaded ones, from the load counted in training forwards."""

    def __init__(self, config: HfMoeConfig):
        super().__init__(config)
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.bias_update_rate = config.router_bias_update_rate
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))
        # Load counted since the last bias update; not part of the checkpoint.
        self.load_since_update = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)

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
            top_k_weights = sum_to_one(top_k_weights + 1e-20 / self.top_k)  # sigmoid scores are > 0; eps as DeepSeek
        top_k_weights = top_k_weights * self.routed_scaling_factor
        if self.training and self.bias_update_rate > 0:
            with torch.no_grad():
                self.load_since_update += torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts).float()
        return router_logits, top_k_weights, top_k_index

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply the aux-loss-free update from the load counted since the last call, then reset the count. Under
        torch.distributed the counts of all ranks are summed first, so every rank moves its bias alike."""
        load = self.load_since_update
        if self.bias_update_rate > 0 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        if self.bias_update_rate > 0 and load.sum() > 0:
            self.e_score_correction_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


class NoisyTopKRouter(HfMoeRouter):
    """Shazeer et al. 2017 noisy top-k gating: in training, logits + N(0, 1) * softplus(h W_noise^T); top-k of
    the noisy logits, softmax over the k kept. Without noise (eval) it equals `topk_softmax`."""

    def __init__(self, config: HfMoeConfig):
        super().__init__(config)
        self.noise_weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.logits(hidden_states)  # (T, E)
        if self.training:
            noise_std = F.softplus(F.linear(hidden_states, self.noise_weight))  # (T, E)
            router_logits = router_logits + torch.randn_like(router_logits) * noise_std
        top_logits, top_k_index = torch.topk(router_logits, self.top_k, dim=-1)
        top_k_weights = sum_to_one(F.softmax(top_logits, dim=-1, dtype=torch.float32)).to(router_logits.dtype)
        return router_logits, top_k_weights, top_k_index


def expert_capacity(num_tokens: int, capacity_factor: float, num_experts: int, top_k: int = 1) -> int:
    """Tokens one expert may take: ceil(capacity_factor * num_tokens * top_k / num_experts), at most num_tokens."""
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


class SwitchRouter(HfMoeRouter):
    """Switch Transformer (Fedus et al. 2021): top-1 expert weighted by its softmax probability. With a
    `capacity_factor`, each expert takes at most `expert_capacity(T, factor, E)` tokens in token order; the rest
    are dropped (sentinel index E, weight 0) and pass through the residual connection."""

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
    """Per-token routing distribution over experts (rows sum to one) used by the balancing loss and statistics:
    softmax of the logits, or normalised sigmoid scores for `sigmoid_topk` (DeepSeek-V3's sequence-wise form)."""
    if router_type == "sigmoid_topk":
        scores = router_logits.float().sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True)
    return F.softmax(router_logits.float(), dim=-1)


# ================================================================================================================
# Experts: fused SwiGLU weights gate_up_proj (E, 2I, H), down_proj (E, H, I).
# ================================================================================================================


class HfMoeMLP(nn.Module):
    """Dense SwiGLU MLP: the MLP of dense layers, and the (fused) shared experts."""

    def __init__(self, config: HfMoeConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class HfMoeSparseMoeBlock(nn.Module):
    """router -> routed experts (+ shared experts, optionally sigmoid-gated as in Qwen2-MoE)."""

    def __init__(self, config: HfMoeConfig):
        super().__init__()
        self.config = config
        self.gate = ROUTERS[config.router_type](config)
        self.experts = HfMoeExperts(config)
        self.shared_experts = (
            HfMoeMLP(config, config.shared_expert_intermediate_size) if config.num_shared_experts > 0 else None
        )
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)  # (T, H)
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
# Attention and the decoder.
# ================================================================================================================


class HfMoeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class HfMoeRotaryEmbedding(nn.Module):
    """Rotary tables for every rope type transformers knows; `partial_rotary_factor` (in `rope_parameters`)
    rotates only the first part of each head, as GLM-4.5 does."""

    inv_freq: torch.Tensor

    def __init__(self, config: HfMoeConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: HfMoeConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, rotary_dim)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first `cos.shape[-1]` channels of each (B, heads, S, D) query/key head; pass the rest through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat((q_rot * cos + rotate_half(q_rot) * sin, q_pass), dim=-1)
    k_embed = torch.cat((k_rot * cos + rotate_half(k_rot) * sin, k_pass), dim=-1)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, S, D) -> (B, kv_heads * n_rep, S, D)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # (B, heads, S, S_kv)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()  # (B, S, heads, D)
    return attn_output, attn_weights


class HfMoeAttention(nn.Module):
    """Grouped-query attention through transformers' attention interface (eager, sdpa, flash_attention_2, ...)."""

    def __init__(self, config: HfMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window
        q_dim, kv_dim = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=config.attention_output_bias)
        if config.use_qk_norm:
            self.q_norm = HfMoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = HfMoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape)  # (B, S, heads, D)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.config.use_qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)  # (B, heads, S, D)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class HfMoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = HfMoeAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = HfMoeSparseMoeBlock(config)
        else:
            self.mlp = HfMoeMLP(config, config.intermediate_size)
        self.input_layernorm = HfMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = HfMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ================================================================================================================
# Pretrained-model plumbing, the model, router losses and the causal-LM head.
# ================================================================================================================


class HfMoePreTrainedModel(PreTrainedModel):
    config_class = HfMoeConfig
    config: HfMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfMoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False  # the expert grouping is data-dependent
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(HfMoeRouter, index=0),
        "router_indices": OutputRecorder(HfMoeRouter, index=2),
        "hidden_states": HfMoeDecoderLayer,
        "attentions": HfMoeAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        # transformers' `init` functions skip tensors already loaded from a checkpoint; plain in-place `normal_`
        # would overwrite them when a module is only partly in the checkpoint (a non-persistent buffer).
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

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint with missing, unexpected or mismatched tensors is an
        error rather than a log line and a silently random-initialised model. Pass `strict=False` for the
        transformers behaviour."""
        if not strict:
            return super().from_pretrained(*args, **kwargs)
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
            problems["unexpected_keys"] = [k for k in problems["unexpected_keys"] if not k.startswith("lm_head.")]
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            details = "; ".join(f"{k}: {v[:8]}{' ...' if len(v) > 8 else ''} ({len(v)})" for k, v in problems.items())
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


class HfMoeModel(HfMoePreTrainedModel):
    def __init__(self, config: HfMoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(HfMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = HfMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = HfMoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)

        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


def _token_mask(attention_mask: torch.Tensor | None, num_rows: int, device: torch.device) -> torch.Tensor | None:
    """Flatten a (B, S_total) padding mask to the (B*S,) rows of the current forward (the last S columns)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    seq_len = num_rows // attention_mask.shape[0]
    return attention_mask[:, -seq_len:].reshape(-1).to(device=device, dtype=torch.float32)


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
    device = router_logits[0].device
    losses = []
    for logits, indices in zip(router_logits, router_indices):
        probs = router_probabilities(logits.to(device), router_type)  # (T, E)
        mask = _token_mask(attention_mask, probs.shape[0], device)
        if mask is None:
            mask = torch.ones(probs.shape[0], device=device)
        # One-hot with a sentinel column for dropped assignments, then drop that column: (T, E)
        assigned = F.one_hot(indices.to(device), num_experts + 1)[..., :num_experts].sum(dim=1).float()
        denom = mask.sum().clamp(min=1.0)
        tokens_per_expert = (assigned * mask[:, None]).sum(dim=0) / denom  # (E,)
        prob_per_expert = (probs * mask[:, None]).sum(dim=0) / denom  # (E,)
        losses.append(num_experts * (tokens_per_expert * prob_per_expert).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2, averaged over
    MoE layers; padding tokens excluded."""
    if not router_logits:
        return torch.tensor(0.0)
    device = router_logits[0].device
    losses = []
    for logits in router_logits:
        z = torch.logsumexp(logits.to(device).float(), dim=-1).square()  # (T,)
        mask = _token_mask(attention_mask, z.shape[0], device)
        losses.append(z.mean() if mask is None else (z * mask).sum() / mask.sum().clamp(min=1.0))
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
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: HfMoeConfig):
        super().__init__(config)
        self.model = HfMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_indices: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> HfMoeCausalLMOutputWithPast:
        r"""Causal-LM forward. With `output_router_logits=True` (argument or config) the load-balancing loss and the
        router z-loss are computed and, when `labels` are given, added to the loss with `router_aux_loss_coef` and
        `router_z_loss_coef`."""
        output_router_logits = (
            self.config.output_router_logits if output_router_logits is None else output_router_logits
        )
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            output_router_indices=bool(output_router_logits or output_router_indices),
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = z_loss = None
        router_logits = getattr(outputs, "router_logits", None)
        router_indices = getattr(outputs, "router_indices", None)
        if output_router_logits and router_logits:
            aux_loss = load_balancing_loss(
                router_logits, router_indices, self.config.num_experts, self.config.router_type, attention_mask
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
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits,
            router_indices=router_indices,
        )

    def update_router_biases(self) -> None:
        """Apply the aux-loss-free bias update of every `sigmoid_topk` router (no-op for other routers). Called
        after each training forward when `config.router_bias_update == "forward"`; call it once per optimizer step
        yourself with `"manual"` (e.g. with gradient accumulation or gradient checkpointing)."""
        for module in self.modules():
            if isinstance(module, SigmoidTopKRouter):
                module.update_bias()


__all__ = [
    "HfMoeForCausalLM",
    "HfMoeModel",
    "HfMoePreTrainedModel",
    "HfMoeSparseMoeBlock",
    "HfMoeExperts",
    "ROUTERS",
    "load_balancing_loss",
    "router_z_loss",
    "router_probabilities",
]
