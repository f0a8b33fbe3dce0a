"""The routed experts of the hf_moe sparse block: one reference forward, and the fast implementations beside it.

`HfMoeExperts.forward` is the definition, read top to bottom: sort the (token, slot) assignments by expert, run
each expert's SwiGLU on its contiguous group, weight the rows and put them back in token order. The fast kernels
compute the same function and are registered in transformers' experts interface, so one setting picks what runs:

    model.set_experts_implementation("hf_moe")       # or config._experts_implementation / from_pretrained(...)

- "eager": the reference forward (`HfMoeExperts.forward`).
- "hf_moe_grouped": one grouped GEMM per projection over all experts (`F.grouped_mm` with group offsets); no host
  synchronisation and static shapes, so it runs inside CUDA graphs and `torch.compile(fullgraph=True)`.
- "hf_moe_cpu": CPU-tuned eager kernels. Without autograd: in fp32 or bf16, experts with few rows (one token, or
  up to 32 rows per expert on average with AVX-512, 8 with AVX2: decoding, short prompts) through one fused compiled
  kernel that reads each routed expert's weights once (cpu_kernel.py); larger groups in fp32 (prefill) through
  the same library's grouped products (as training, below); without them, other small groups as one padded `bmm` per
  projection (padding capped at 2x the routed rows; a crowded expert's rows past the cap as one matmul of its own)
  or two grouped GEMMs on the routed rows, as `small_groups_kernel()` says; one token without the fused kernel as k
  matrix-vector products on weight views; large groups as one matmul per expert. Under autograd, for SiLU/GELU
  experts, a hand-written backward (`_RoutedExpertsFunction`: no concatenation, one scatter, the dense MLP's
  passes) whose six grouped products run in fp32 through the compiled kernel's training products (cpu_kernel.py:
  no weight packing; with AVX-512 at every group size, with AVX2 up to 64 rows per expert on average), otherwise
  through the grouped GEMM on the routed rows only (sentinel rows cut off); other activations take autograd's
  backward of the grouped GEMM.
- "hf_moe": "hf_moe_cpu" for CPU tensors, "hf_moe_grouped" otherwise (CUDA, or compiled CPU training); compiled
  CPU inference runs the "hf_moe_cpu" kernels as one custom op, `hf_moe::cpu_experts`.
transformers' own "grouped_mm" / "batched_mm" stay selectable (they do not skip dropped assignments: the block
points those at expert 0 with weight 0). BENCHMARKS.md holds the timings behind each choice.

A dropped assignment (over capacity, or not chosen under expert choice) has the sentinel index `num_experts`
and weight 0: every implementation skips it, and it gets no gradient.

This file ships as Hub remote code: it imports only torch and transformers.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ExpertsInterface

from .configuration_hf_moe import expert_activation
from .cpu_kernel import (
    ACTIVATION_CODES,
    fused_experts,
    grouped_times,
    grouped_times_transposed,
    grouped_weight_grad,
    has_avx512,
    load_fused_kernel,
)

# ================================================================================================================
# Grouping, shared by every implementation and by the fused-experts LoRA layer (hf_moe.peft).
# ================================================================================================================


class ExpertGroups(NamedTuple):
    """The T*K assignments of a (T, K) routing, sorted by expert (sentinels last).

    order: (T*K,) flat slot index (token * K + slot) of each sorted row.
    token: (T*K,) token of each sorted row (order // K).
    counts: (E,) rows routed to each expert; sentinel rows are not counted.
    offsets: (E,) int32 end of each expert's group (cumulative counts), as `F.grouped_mm` takes them; rows from
        offsets[-1] on are sentinels.
    """

    order: torch.Tensor
    token: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def group_by_expert(top_k_index: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Sort the assignments of `top_k_index` (T, K) by expert, stably (token order within a group). No host
    synchronisation and static shapes: usable under `torch.compile` and CUDA graphs."""
    flat = top_k_index.reshape(-1)  # (T*K,)
    order = torch.sort(flat, stable=True).indices  # (T*K,) sentinels (== E) sort last
    # scatter_add_ rather than bincount: its output size does not depend on the data.
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )[:num_experts]  # (E,)
    offsets = counts.cumsum(0).to(torch.int32)  # (E,)
    return ExpertGroups(order, order // top_k_index.shape[1], counts, offsets)


# ================================================================================================================
# The reference forward.
# ================================================================================================================


@use_experts_implementation
class HfMoeExperts(nn.Module):
    """`num_experts` SwiGLU experts stored fused: gate_up_proj (E, 2I, H), down_proj (E, H, I).

    Called as `experts(hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K)) -> (T, H)`. Dropless:
    every routed assignment is computed; assignments with the sentinel index E are skipped. What runs is chosen
    by `config._experts_implementation` (see the module docstring); "eager" is the reference `forward` below.
    """

    def __init__(self, config):
        super().__init__()
        text_config = config.get_text_config()
        self.num_experts = config.num_experts
        self.hidden_dim = text_config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim)
        )
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.activation = expert_activation(text_config)
        self.act_fn = ACT2FN[self.activation]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        num_tokens, top_k = top_k_index.shape
        groups = group_by_expert(top_k_index, self.num_experts)
        x = hidden_states[groups.token].to(self.gate_up_proj.dtype)  # (T*K, H) grouped by expert
        out = torch.zeros_like(x)  # sentinel rows stay zero
        start = 0
        for expert, end in enumerate(groups.offsets.tolist()):
            if end > start:
                gate, up = F.linear(x[start:end], self.gate_up_proj[expert]).chunk(2, dim=-1)  # (n_e, I) each
                out[start:end] = F.linear(self.act_fn(gate) * up, self.down_proj[expert])  # (n_e, H)
            start = end
        out = out * top_k_weights.reshape(-1, 1)[groups.order].to(out.dtype)  # (T*K, H)
        slots = torch.zeros_like(out).index_copy(0, groups.order, out)  # back to (token, slot) order
        return slots.view(num_tokens, top_k, self.hidden_dim).sum(dim=1).to(hidden_states.dtype)  # (T, H)


# ================================================================================================================
# Grouped GEMM: F.grouped_mm where the kernel takes the operands, else a per-group loop, as one custom operator so
# that torch.compile neither breaks the graph on it nor needs its (bf16-only) fake kernel.
# ================================================================================================================


def _grouped_mm_kernel_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # The aten kernel: CUDA bf16/fp16 (sm80+), CPU fp32/bf16; operand strides 16-byte aligned (torch >= 2.11 no
    # longer needs aligned base addresses, which weights loaded from safetensors do not have).
    if x.is_cuda:
        if weight.dtype not in (torch.bfloat16, torch.float16) or torch.cuda.get_device_capability(
            x.device
        ) < (8, 0):
            return False
    elif x.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x.dtype != weight.dtype:
        return False
    size = x.element_size()
    return all(all(s == 1 or (s * size) % 16 == 0 for s in t.stride()) for t in (x, weight))


def _grouped_mm_loop(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], weight.shape[-1])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[group], out=out[start:end])
        start = end
    return out


def _grouped_mm_impl(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if _grouped_mm_kernel_fits(x, weight):
        return F.grouped_mm(x, weight, offs=offsets)
    return _grouped_mm_loop(x, weight, offsets)


def _grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(E, out, in): `grad[group e].T @ x[group e]` for rows `grad` (S, out) and `x` (S, in) grouped by expert;
    experts without rows get zeros."""
    if _grouped_mm_kernel_fits(grad.t(), x):
        return F.grouped_mm(grad.t(), x, offs=offsets)
    out = x.new_zeros(offsets.shape[0], grad.shape[1], x.shape[1])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(grad[start:end].t(), x[start:end], out=out[group])
        start = end
    return out


def _grouped_mm_backward_impl(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x = _grouped_mm_impl(grad, weight.transpose(-2, -1), offsets)  # (S, in)
    # The weight gradient in the weight's own layout (as the fake kernel's empty_like promises), so that autograd
    # accumulates it into the parameter's .grad without a copy: experts' weights arrive here transposed.
    if weight.stride(-2) == 1 and weight.stride(-1) != 1:
        return grad_x, _grouped_weight_grad(grad, x, offsets).transpose(1, 2)  # (E, in, out), in-major
    return grad_x, _grouped_weight_grad(x, grad, offsets)  # (E, in, out)


def _register_grouped_mm_op() -> None:
    # Another copy of this file (Hub remote code beside the installed hf_moe) may have registered it already.
    if hasattr(torch.ops.hf_moe, "grouped_mm"):
        return
    torch.library.custom_op(
        "hf_moe::grouped_mm",
        _grouped_mm_impl,
        mutates_args=(),
        schema="(Tensor x, Tensor weight, Tensor offsets) -> Tensor",
    )
    torch.library.custom_op(
        "hf_moe::grouped_mm_backward",
        _grouped_mm_backward_impl,
        mutates_args=(),
        schema="(Tensor x, Tensor weight, Tensor offsets, Tensor grad) -> (Tensor, Tensor)",
    )
    torch.library.register_fake(
        "hf_moe::grouped_mm", lambda x, weight, offsets: x.new_empty(x.shape[0], weight.shape[-1])
    )
    torch.library.register_fake(
        "hf_moe::grouped_mm_backward",
        lambda x, weight, offsets, grad: (torch.empty_like(x), torch.empty_like(weight)),
    )

    def setup_context(ctx, inputs, output):
        x, weight, offsets = inputs
        ctx.save_for_backward(x, weight, offsets)

    def backward(ctx, grad):
        x, weight, offsets = ctx.saved_tensors
        grad_x, grad_weight = torch.ops.hf_moe.grouped_mm_backward(x, weight, offsets, grad.contiguous())
        return grad_x, grad_weight, None

    torch.library.register_autograd("hf_moe::grouped_mm", backward, setup_context=setup_context)


_register_grouped_mm_op()


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`x` (S, in) grouped by expert @ `weight` (E, in, out) per group -> (S, out); groups end at `offsets` (E,).
    Rows from offsets[-1] on are unspecified (the kernel leaves them unwritten)."""
    if not torch.compiler.is_compiling() and _grouped_mm_kernel_fits(x, weight):
        return F.grouped_mm(
            x, weight, offs=offsets
        )  # the aten op directly: no custom-op dispatch in eager mode
    return torch.ops.hf_moe.grouped_mm(x, weight, offsets)


# ================================================================================================================
# Fast implementations. Each has the signature of HfMoeExperts.forward (self first) and computes the same function.
# ================================================================================================================


def _combine(self: HfMoeExperts, out: torch.Tensor, groups: ExpertGroups, num_tokens: int) -> torch.Tensor:
    """Weighted rows (S, H) grouped by expert -> (T, H) in token order; S may stop before the sentinel rows."""
    if out.is_cuda:
        # Copy into distinct (token, slot) rows, then sum the slots: deterministic, unlike index_add_ on CUDA.
        top_k = groups.order.numel() // max(num_tokens, 1)
        slots = out.new_zeros(groups.order.numel(), self.hidden_dim).index_copy_(
            0, groups.order[: out.shape[0]], out
        )
        return slots.view(num_tokens, top_k, self.hidden_dim).sum(dim=1)
    return out.new_zeros(num_tokens, self.hidden_dim).index_add_(0, groups.token[: out.shape[0]], out)


def _grouped_forward(
    self: HfMoeExperts,
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    groups: ExpertGroups,
    num_routed: int | None,
) -> torch.Tensor:
    # Two grouped GEMMs over the rows grouped by expert. With `num_routed` known (a host sync, free on the CPU) the
    # sentinel rows are cut off; otherwise all T*K rows go through, and as the kernel leaves sentinel rows unwritten
    # (forward output and input gradient), they are zeroed on the way in and out.
    num_tokens = hidden_states.shape[0]
    order, token = groups.order, groups.token
    dropped = None
    if num_routed is None:
        dropped = (torch.arange(order.numel(), device=order.device) >= groups.offsets[-1]).unsqueeze(-1)
    elif num_routed < order.numel():
        order, token = order[:num_routed], token[:num_routed]
    x = hidden_states[token].to(self.gate_up_proj.dtype)  # (S, H)
    weights = top_k_weights.reshape(-1, 1)[order].to(x.dtype)  # (S, 1)
    if dropped is not None:
        x, weights = x.masked_fill(dropped, 0.0), weights.masked_fill(dropped, 0.0)
    gate, up = grouped_mm(x, self.gate_up_proj.transpose(1, 2), groups.offsets).chunk(
        2, dim=-1
    )  # (S, I) each
    h = self.act_fn(gate) * up
    # The routing weight scales whichever of the (S, I) activation and the (S, H) output is smaller.
    if self.intermediate_dim <= self.hidden_dim:
        out = grouped_mm(h * weights, self.down_proj.transpose(1, 2), groups.offsets)
    else:
        out = grouped_mm(h, self.down_proj.transpose(1, 2), groups.offsets) * weights
    if dropped is not None:
        out = out.masked_fill(dropped, 0.0)  # (S, H)
    return _combine(self, out, groups, num_tokens).to(hidden_states.dtype)


# The activations whose derivative the hand-written backward knows, as aten's backward kernels:
# fn(grad (S, I), input (S, I), out= (S, I) strided view).
def _silu_backward(grad: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> None:
    torch.ops.aten.silu_backward.grad_input(grad, gate, grad_input=out)


def _gelu_backward(grad: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> None:
    torch.ops.aten.gelu_backward.grad_input(grad, gate, approximate="none", grad_input=out)


def _gelu_tanh_backward(grad: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> None:
    torch.ops.aten.gelu_backward.grad_input(grad, gate, approximate="tanh", grad_input=out)


ACTIVATION_BACKWARD = {
    "silu": _silu_backward,
    "swish": _silu_backward,
    "gelu": _gelu_backward,
    "gelu_pytorch_tanh": _gelu_tanh_backward,
}


# The three grouped products of `_RoutedExpertsFunction`, for rows sorted by expert (groups end at `offsets`), each
# by the compiled kernel where `counts` (rows per expert, host ints) is given, else by aten's grouped GEMM.
def _times_transposed(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: list[int] | None
) -> torch.Tensor:
    """x (S, K) @ weight[e].T per group -> (S, N); weight (E, N, K)."""
    if counts is not None:
        return grouped_times_transposed(x, weight, counts)
    return grouped_mm(x, weight.transpose(1, 2), offsets)


def _times(
    g: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: list[int] | None
) -> torch.Tensor:
    """g (S, N) @ weight[e] per group -> (S, K); weight (E, N, K)."""
    if counts is not None:
        return grouped_times(g, weight, counts)
    return grouped_mm(g, weight, offsets)


def _weight_grad(
    g: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor, counts: list[int] | None
) -> torch.Tensor:
    """g[group e].T @ a[group e] -> (E, N, K), zeros for experts without rows; g (S, N), a (S, K)."""
    if counts is not None:
        return grouped_weight_grad(g, a, counts)
    return _grouped_weight_grad(g, a, offsets)


class _RoutedExpertsFunction(torch.autograd.Function):
    """The routed rows' forward and a hand-written backward (CPU training, "hf_moe_cpu").

    Its six grouped products (forward x @ W.T twice, backward g @ W twice and two weight gradients) run through the
    compiled kernel when `counts` (rows per expert) is given, else through `F.grouped_mm` (MKL on the CPU).

    Autograd's own backward of `_grouped_forward` concatenates the gate and up gradients (the backward of `chunk`)
    and scatters the input gradient with `index_put` over the (T*K) gather; here the gate and up gradients are
    written into one (S, 2I) buffer and the input gradient is one `index_add_`. It saves what a dense SwiGLU's
    autograd saves (input, gate/up pre-activations, activation, product), so the backward makes the same passes
    over (S, I) as the dense one. The routing weight scales the smaller of the (S, I) product and the (S, H)
    output, as in `_grouped_forward`.
    """

    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,  # (T, H)
        top_k_weights: torch.Tensor,  # (T, K)
        gate_up_proj: torch.Tensor,  # (E, 2I, H)
        down_proj: torch.Tensor,  # (E, H, I)
        token: torch.Tensor,  # (S,) token of each routed row, grouped by expert
        order: torch.Tensor,  # (S,) flat (token, slot) index of each routed row
        offsets: torch.Tensor,  # (E,) end of each expert's group
        act_fn,
        activation: str,
        counts: list[int] | None = None,  # (E,) rows per expert: the compiled kernel's products; None: aten's
    ) -> torch.Tensor:
        x = hidden_states.index_select(0, token)  # (S, H)
        weights = top_k_weights.reshape(-1).index_select(0, order).unsqueeze(1).to(x.dtype)  # (S, 1)
        ctx.counts = counts
        gate_up = _times_transposed(x, gate_up_proj, offsets, counts)  # (S, 2I)
        inter = gate_up.shape[1] // 2
        act = act_fn(gate_up[:, :inter])  # (S, I)
        h = act * gate_up[:, inter:]  # (S, I)
        scale_hidden = inter <= hidden_states.shape[1]
        if scale_hidden:
            out = _times_transposed(h * weights, down_proj, offsets, counts)  # (S, H) weighted
            ctx.save_for_backward(x, gate_up, act, h, weights, gate_up_proj, down_proj, token, order, offsets)
        else:
            unweighted = _times_transposed(h, down_proj, offsets, counts)  # (S, H)
            out = unweighted * weights
            ctx.save_for_backward(
                x, gate_up, act, h, weights, gate_up_proj, down_proj, token, order, offsets, unweighted
            )
        ctx.scale_hidden, ctx.activation = scale_hidden, activation
        ctx.weights_shape, ctx.weights_dtype = top_k_weights.shape, top_k_weights.dtype
        return hidden_states.new_zeros(hidden_states.shape).index_add_(0, token, out)  # (T, H)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        x, gate_up, act, h, weights, gate_up_proj, down_proj, token, order, offsets, *rest = ctx.saved_tensors
        need_input, need_weights, need_gate_up, need_down = ctx.needs_input_grad[:4]
        inter = gate_up.shape[1] // 2
        counts = ctx.counts
        grad_out = grad_output.index_select(0, token)  # (S, H)
        grad_down = grad_w = grad_weights = grad_gate_up_proj = grad_input = None
        if ctx.scale_hidden:
            if need_down:
                grad_down = _weight_grad(grad_out, h * weights, offsets, counts)  # (E, H, I)
            grad_h = _times(grad_out, down_proj, offsets, counts)  # (S, I) gradient of the weighted product
            if need_weights:
                grad_w = torch.linalg.vecdot(grad_h, h)  # (S,)
            grad_h.mul_(weights)
        else:
            if need_weights:
                grad_w = torch.linalg.vecdot(grad_out, rest[0])  # (S,)
            grad_out = grad_out * weights  # (S, H) gradient of the unweighted output
            if need_down:
                grad_down = _weight_grad(grad_out, h, offsets, counts)  # (E, H, I)
            grad_h = _times(grad_out, down_proj, offsets, counts)  # (S, I)
        if grad_w is not None:
            grad_weights = (
                grad_w.new_zeros(ctx.weights_shape.numel())
                .index_copy_(0, order, grad_w)
                .view(ctx.weights_shape)
                .to(ctx.weights_dtype)
            )
        if need_input or need_gate_up:
            grad_gate_up = torch.empty_like(gate_up)  # (S, 2I): gate and up gradients side by side, no cat
            torch.mul(grad_h, act, out=grad_gate_up[:, inter:])
            ACTIVATION_BACKWARD[ctx.activation](
                grad_h.mul_(gate_up[:, inter:]), gate_up[:, :inter], out=grad_gate_up[:, :inter]
            )
            if need_gate_up:
                grad_gate_up_proj = _weight_grad(grad_gate_up, x, offsets, counts)  # (E, 2I, H)
            if need_input:
                grad_x = _times(grad_gate_up, gate_up_proj, offsets, counts)  # (S, H)
                grad_input = grad_output.new_zeros(grad_output.shape).index_add_(0, token, grad_x)
        return grad_input, grad_weights, grad_gate_up_proj, grad_down, None, None, None, None, None, None


def _manual_backward_fits(self: HfMoeExperts, hidden_states: torch.Tensor) -> bool:
    # The hand-written backward covers the known activations on same-dtype CPU tensors outside autocast.
    return (
        getattr(self, "activation", None) in ACTIVATION_BACKWARD
        and hidden_states.dtype == self.gate_up_proj.dtype == self.down_proj.dtype
        and not torch.is_autocast_enabled("cpu")
    )


def grouped_experts_forward(
    self: HfMoeExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """ "hf_moe_grouped": sort, two grouped GEMMs over all T*K rows (sentinel rows masked), combine. No host sync."""
    groups = group_by_expert(top_k_index, self.num_experts)
    return _grouped_forward(self, hidden_states, top_k_weights, groups, num_routed=None)


def one_token_experts(
    hidden_states: torch.Tensor,
    experts: list[int],
    weights: list[float],
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn,
    activation: str | None = None,
) -> torch.Tensor:
    """One token (1, H) through its routed `experts` with routing `weights` (host lists, inference only). With
    the fused kernel (`small_groups_kernel() == "fused"` and an `activation` it knows): one call that reads each
    expert's weights once. Otherwise k matrix-vector products on weight views, with no sort, no gather and no
    weight copy; the routing weights are addmm's scalars (the running sum scaled by beta, the new expert's output
    by alpha). Sentinel indices (>= E, dropped assignments) are skipped."""
    num_experts = gate_up_proj.shape[0]
    if activation is not None and fused_fits(hidden_states, gate_up_proj, down_proj, activation):
        routed = sorted((e, w) for e, w in zip(experts, weights) if e < num_experts)  # grouped by expert
        counts = [0] * num_experts
        for expert, _ in routed:
            counts[expert] += 1
        return fused_experts(
            hidden_states.contiguous(),
            torch.zeros(len(routed), dtype=torch.long),
            counts,
            torch.tensor([w for _, w in routed], dtype=torch.float32),
            gate_up_proj,
            down_proj,
            activation,
        )
    dtype = gate_up_proj.dtype
    x = hidden_states if hidden_states.dtype == dtype else hidden_states.to(dtype)  # (1, H)
    out, scale = None, 1.0
    for expert, weight in zip(experts, weights):
        if expert >= num_experts:  # sentinel: dropped assignment
            continue
        gate, up = F.linear(x, gate_up_proj[expert]).chunk(2, dim=-1)  # (1, I) each
        h = act_fn(gate) * up  # (1, I)
        if out is None:
            out, scale = F.linear(h, down_proj[expert]), weight  # (1, H), scaled later
        else:
            out, scale = torch.addmm(out, h, down_proj[expert].t(), beta=scale, alpha=weight), 1.0
    if out is None:  # every assignment dropped
        return torch.zeros_like(hidden_states)
    if scale != 1.0:
        out = out.mul_(scale)
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def _one_token_forward(
    self: HfMoeExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    # Inference only: the routing is read on the host (free on the CPU).
    return one_token_experts(
        hidden_states,
        top_k_index.tolist()[0],
        top_k_weights.tolist()[0],
        self.gate_up_proj,
        self.down_proj,
        self.act_fn,
        self.activation,
    )


def _padded_bmm_forward(
    self: HfMoeExperts,
    x: torch.Tensor,
    weights: torch.Tensor,
    groups: ExpertGroups,
    counts: list[int],
    capacity: int,
) -> torch.Tensor:
    # Each expert's first `capacity` rows padded into one (E, C, H) batch, then one batched matmul per projection:
    # two parallel kernels instead of two per active expert. Rows past the capacity in a crowded expert (skewed
    # routing) run as one matmul per crowded expert, so the padding never exceeds the capacity the caller chose.
    num_routed = x.shape[0]
    group_start = groups.offsets - groups.counts  # (E,)
    arange = torch.arange(max(self.num_experts, num_routed), device=x.device)
    experts = torch.repeat_interleave(
        arange[: self.num_experts], groups.counts, output_size=num_routed
    )  # (S,)
    rank = arange[:num_routed] - group_start.index_select(0, experts)  # (S,) row within its expert's group
    overflow = max(counts) > capacity
    rows = (rank < capacity).nonzero().squeeze(1) if overflow else arange[:num_routed]  # (S',) padded rows
    slot = (
        (experts * capacity + rank).index_select(0, rows) if overflow else experts * capacity + rank
    )  # (S',)
    padded = x.new_zeros(self.num_experts * capacity, self.hidden_dim).index_copy_(
        0, slot, x.index_select(0, rows) if overflow else x
    )  # (E*C, H)
    gate, up = torch.bmm(
        padded.view(self.num_experts, capacity, -1), self.gate_up_proj.transpose(1, 2)
    ).chunk(2, -1)
    h = self.act_fn(gate) * up  # (E, C, I)
    out_padded = torch.bmm(h, self.down_proj.transpose(1, 2)).view(-1, self.hidden_dim)  # (E*C, H)
    if not overflow:
        return out_padded.index_select(0, slot).mul_(weights)  # (S, H)
    out = x.new_empty(num_routed, self.hidden_dim).index_copy_(0, rows, out_padded.index_select(0, slot))
    start = 0
    for expert, count in enumerate(counts):
        if count > capacity:  # this expert's rows [capacity, count) of its sorted group
            end = start + count
            gate, up = F.linear(x[start + capacity : end], self.gate_up_proj[expert]).chunk(2, dim=-1)
            torch.mm(self.act_fn(gate) * up, self.down_proj[expert].t(), out=out[start + capacity : end])
        start += count
    return out.mul_(weights)  # (S, H)


def _expert_loop_forward(
    self: HfMoeExperts, x: torch.Tensor, weights: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    # One matmul per projection and active expert, each expert writing its rows of the output in place.
    out = x.new_empty(x.shape[0], self.hidden_dim)  # (S, H)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            end = start + count
            gate, up = F.linear(x[start:end], self.gate_up_proj[expert]).chunk(2, dim=-1)  # (n_e, I) each
            torch.mm(self.act_fn(gate) * up, self.down_proj[expert].t(), out=out[start:end])
            start = end
    return out.mul_(weights)


def _routed_grouped_forward(
    self: HfMoeExperts, x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    # The routed rows only (S, sorted by expert) through two grouped GEMMs: no padding, no sentinel rows, and only
    # the weights of experts that got rows are read.
    gate, up = grouped_mm(x, self.gate_up_proj.transpose(1, 2), offsets).chunk(2, dim=-1)  # (S, I) each
    return grouped_mm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2), offsets).mul_(weights)  # (S, H)


# CPU training with more routed rows than this per expert on average runs the hand-written backward
# (`_RoutedExpertsFunction`); fewer take autograd's backward of the grouped GEMMs on the routed rows. The hand-written
# one saves an (S, 2I) `cat` and an `index_put`, 5% of the small-shape block's fwd+bwd at 4096 tokens; at a few rows
# its Python costs more than they do: autograd's path was 2-4% faster at 1 token, level at 16-256 tokens
# (BENCHMARKS.md, "Reading the block tables").
MANUAL_BACKWARD_MIN_ROWS_PER_EXPERT = 32
# CPU training in float32, with `HF_MOE_CPU_SMALL_GROUPS` choosing the fused kernel, runs the hand-written backward
# on the compiled kernel's grouped products (cpu_kernel.py) instead of MKL's, and so does float32 inference past the
# fused kernel's rows (prefill): with AVX-512 at every group size (they
# led MKL's 1.6-2.7x from 1 to 1024 rows per expert), with AVX2 up to this many routed rows per expert on average
# (1.2-2.3x up to 64, 1.07-1.14x at 256, by less than the spread between machines) (BENCHMARKS.md, "Grouped products
# for CPU training").
TRAIN_KERNEL_MAX_ROWS_PER_EXPERT: int | None = None if has_avx512() else 64
# CPU inference from this many routed rows per expert on average runs one matmul per expert (BENCHMARKS.md).
CPU_LOOP_MIN_ROWS_PER_EXPERT = 256
# ... and up to `fused_max_rows_per_expert()`, with the "fused" kernel, the fused kernel (BENCHMARKS.md, "Few rows
# per expert" and "AVX2 hosts"). With AVX-512 it leads the padded `bmm` 1.3-2.8x up to 32 rows and ties it at 64-96
# on the SmolLM2 shape. With AVX2 only (8-lane vectors, at most 6 rows per pass in 16 registers) it leads 1.0-2.0x
# up to 8 rows and trails 1.02-1.04x at 16-32, so it stops at 8.
FUSED_MAX_ROWS_ENV = "HF_MOE_CPU_FUSED_MAX_ROWS"
_DEFAULT_FUSED_MAX_ROWS = (
    32 if has_avx512() else 8
)  # read once: /proc/cpuinfo is no place for a traced forward


def fused_max_rows_per_expert() -> int:
    """Up to how many routed rows per expert on average (over the batch) CPU inference runs the fused kernel:
    `HF_MOE_CPU_FUSED_MAX_ROWS` (a non-negative integer; 0 keeps it to single tokens), else 32 on CPUs with AVX-512
    and 8 without, where it stops leading (BENCHMARKS.md)."""
    value = os.environ.get(FUSED_MAX_ROWS_ENV, "").strip()
    if not value:
        return _DEFAULT_FUSED_MAX_ROWS
    try:
        rows = int(value)
    except ValueError:
        rows = -1
    if rows < 0:
        raise ValueError(
            f"{FUSED_MAX_ROWS_ENV}={value!r}: expected a non-negative integer (rows per expert on average up to "
            "which the fused kernel runs; unset means 32 with AVX-512, 8 without)"
        )
    return rows


SMALL_GROUPS_ENV = "HF_MOE_CPU_SMALL_GROUPS"
SMALL_GROUPS_KERNELS = ("fused", "padded", "grouped")


@functools.cache
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _vendor_default() -> str:
    # MKL's small-row GEMMs differ by vendor: on Intel CPUs the grouped GEMM on the routed rows led, elsewhere the
    # padded bmm (BENCHMARKS.md, "The timings behind these choices").
    return "grouped" if _cpu_vendor() == "GenuineIntel" else "padded"


@functools.cache
def _warn_fused_unavailable(reason: str) -> None:
    warnings.warn(
        f"hf_moe: the fused CPU experts kernel is not available ({reason}); decoding uses the "
        f"{_vendor_default()!r} kernel instead. Set {SMALL_GROUPS_ENV}={_vendor_default()} to silence this.",
        stacklevel=3,
    )


def small_groups_kernel() -> str:
    """How CPU inference runs experts with few rows (under 256 per expert on average: decoding, short prompts).
    Set with the environment variable `HF_MOE_CPU_SMALL_GROUPS`:
    - "fused": one compiled kernel per layer (hf_moe/modeling/cpu_kernel.py) that reads each routed expert's
      weights once, for one token and up to `fused_max_rows_per_expert()` rows per expert on average (32 with
      AVX-512, 8 without; `HF_MOE_CPU_FUSED_MAX_ROWS`); larger groups as "auto" without it. CPU training in
      float32, and inference in float32 past the fused kernel's rows, run their grouped products through the
      same compiled library (up to TRAIN_KERNEL_MAX_ROWS_PER_EXPERT: every size with AVX-512, 64 rows per expert
      with AVX2). Compiled on first use with the system's C++ compiler; raises if it cannot be built.
    - "padded": one padded `bmm` per projection; one token as k matrix-vector products.
    - "grouped": `F.grouped_mm` on the routed rows; one token as k matrix-vector products.
    With "padded" or "grouped", CPU training runs its products on `F.grouped_mm` (MKL).
    - "auto" (unset): "fused" where the kernel builds, else "grouped" on Intel CPUs and "padded" elsewhere (with a
      warning that says why), the faster choices on the machines in BENCHMARKS.md.
    """
    choice = os.environ.get(SMALL_GROUPS_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", *SMALL_GROUPS_KERNELS):
        raise ValueError(
            f"{SMALL_GROUPS_ENV}={choice!r}: expected 'fused', 'padded', 'grouped' or 'auto' (unset means 'auto')"
        )
    if choice in ("fused", "auto"):
        reason = load_fused_kernel()
        if reason is None:
            return "fused"
        if choice == "fused":
            raise RuntimeError(
                f"{SMALL_GROUPS_ENV}=fused: the fused CPU experts kernel cannot be built or loaded: {reason}. "
                f"Install a C++ compiler (g++), or set {SMALL_GROUPS_ENV}=auto to fall back to the other kernels."
            )
        _warn_fused_unavailable(reason)
        return _vendor_default()
    return choice


def fused_fits(
    hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, activation: str
) -> bool:
    """Whether the fused kernel computes this call: float32 or bfloat16 CPU tensors (one dtype), an activation it
    knows, contiguous expert weights, and the setting choosing it."""
    return (
        hidden_states.dtype == gate_up_proj.dtype == down_proj.dtype
        and hidden_states.dtype in (torch.float32, torch.bfloat16)
        and hidden_states.device.type == "cpu"
        and activation in ACTIVATION_CODES
        and gate_up_proj.is_contiguous()
        and down_proj.is_contiguous()
        and small_groups_kernel() == "fused"
    )


def _train_kernel_fits(self: HfMoeExperts, hidden_states: torch.Tensor) -> bool:
    # The compiled kernel's grouped products: float32 (the hand-written backward checked the dtypes agree),
    # contiguous expert weights, and the setting choosing the fused kernel.
    return (
        hidden_states.dtype == torch.float32
        and self.gate_up_proj.is_contiguous()
        and self.down_proj.is_contiguous()
        and small_groups_kernel() == "fused"
    )


def cpu_experts_forward(
    self: HfMoeExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """ "hf_moe_cpu": eager CPU kernels; may synchronise with the host (free on the CPU)."""
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden_states, top_k_weights, self.gate_up_proj, self.down_proj)
    )
    num_tokens = top_k_index.shape[0]
    if num_tokens == 1 and not needs_grad:
        return _one_token_forward(self, hidden_states, top_k_index, top_k_weights)
    groups = group_by_expert(top_k_index, self.num_experts)
    counts = groups.counts.tolist()
    num_routed = sum(counts)
    if needs_grad:
        if _manual_backward_fits(self, hidden_states):
            cap = TRAIN_KERNEL_MAX_ROWS_PER_EXPERT
            kernel = (cap is None or num_routed <= cap * self.num_experts) and _train_kernel_fits(
                self, hidden_states
            )
            if kernel or num_routed > MANUAL_BACKWARD_MIN_ROWS_PER_EXPERT * self.num_experts:
                return _RoutedExpertsFunction.apply(
                    hidden_states,
                    top_k_weights,
                    self.gate_up_proj,
                    self.down_proj,
                    groups.token[:num_routed],
                    groups.order[:num_routed],
                    groups.offsets,
                    self.act_fn,
                    self.activation,
                    counts if kernel else None,
                )
        return _grouped_forward(self, hidden_states, top_k_weights, groups, num_routed or None)
    if num_routed == 0:
        return torch.zeros_like(hidden_states)
    order = groups.order[:num_routed]  # (S,) sentinel rows are never computed
    if num_routed <= fused_max_rows_per_expert() * self.num_experts and fused_fits(
        hidden_states, self.gate_up_proj, self.down_proj, self.activation
    ):
        # Gather, both projections, weighting and combine in one call (weights in float32, as the kernel takes).
        weights = top_k_weights.reshape(-1).index_select(0, order).float()  # (S,)
        return fused_experts(
            hidden_states.contiguous(),
            groups.token[:num_routed],
            counts,
            weights,
            self.gate_up_proj,
            self.down_proj,
            self.activation,
        )
    # Small groups: two grouped GEMMs on the routed rows, or one padded bmm per projection, its capacity capped so
    # the padding stays within 2x the routed rows (a crowded expert's extra rows run apart), as
    # `small_groups_kernel()` says ("fused" past its rows: the vendor's choice); large groups: one matmul per
    # expert.
    small_groups = num_routed < CPU_LOOP_MIN_ROWS_PER_EXPERT * self.num_experts
    x = hidden_states.index_select(0, groups.token[:num_routed]).to(self.gate_up_proj.dtype)  # (S, H)
    weights = top_k_weights.reshape(-1, 1).index_select(0, order).to(x.dtype)  # (S, 1)
    cap = TRAIN_KERNEL_MAX_ROWS_PER_EXPERT
    kernel = small_groups_kernel() if small_groups else None
    if (cap is None or num_routed <= cap * self.num_experts) and _train_kernel_fits(self, hidden_states):
        # Past the fused kernel's rows (prefill): the training products, which lead MKL's there too.
        kernel = "products"
    elif kernel == "fused":
        kernel = _vendor_default()
    if kernel == "products":
        gate, up = grouped_times_transposed(x, self.gate_up_proj, counts).chunk(2, dim=-1)  # (S, I) each
        out = grouped_times_transposed(self.act_fn(gate) * up, self.down_proj, counts).mul_(weights)  # (S, H)
    elif kernel == "grouped":
        out = _routed_grouped_forward(self, x, weights, groups.offsets)
    elif kernel == "padded":
        capacity = min(max(counts), max(1, 2 * num_routed // self.num_experts))
        out = _padded_bmm_forward(self, x, weights, groups, counts, capacity)
    else:
        out = _expert_loop_forward(self, x, weights, counts)
    return _combine(self, out, groups, num_tokens).to(hidden_states.dtype)


class _ExpertsView(NamedTuple):
    """What the CPU kernels read of an `HfMoeExperts`, rebuilt from plain tensors inside the custom operator."""

    num_experts: int
    hidden_dim: int
    intermediate_dim: int
    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    act_fn: nn.Module
    activation: str


def _register_cpu_inference_op() -> None:
    # Under torch.compile on the CPU, inference runs the eager CPU kernels as one opaque operator: their host reads
    # (the k experts of one token, the group sizes of a batch) would otherwise break the graph, and the sync-free
    # grouped path they replace is slower on the CPU (BENCHMARKS.md, compiled decoding). No autograd formula:
    # training while compiling takes the grouped path.
    if hasattr(torch.ops.hf_moe, "cpu_experts"):
        return
    activations = {}  # ACT2FN builds a new module per lookup

    def cpu_experts_op(x, index, weights, gate_up_proj, down_proj, activation):
        act_fn = activations.setdefault(activation, ACT2FN[activation])
        num_experts, intermediate, hidden = down_proj.shape[0], down_proj.shape[2], down_proj.shape[1]
        view = _ExpertsView(num_experts, hidden, intermediate, gate_up_proj, down_proj, act_fn, activation)
        return cpu_experts_forward(view, x, index, weights)  # type: ignore[arg-type]

    torch.library.custom_op(
        "hf_moe::cpu_experts",
        cpu_experts_op,
        mutates_args=(),
        schema=(
            "(Tensor x, Tensor index, Tensor weights, Tensor gate_up_proj, Tensor down_proj, str activation) -> Tensor"
        ),
    )
    torch.library.register_fake(
        "hf_moe::cpu_experts",
        lambda x, index, weights, gate_up_proj, down_proj, activation: torch.empty_like(x),
    )


_register_cpu_inference_op()


def auto_experts_forward(
    self: HfMoeExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """ "hf_moe": the CPU kernels for CPU tensors (compiled inference: the same kernels as the custom operator
    `hf_moe::cpu_experts`), the grouped GEMM otherwise (CUDA, and compiled CPU training)."""
    if hidden_states.device.type == "cpu":
        if not torch.compiler.is_compiling():
            return cpu_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if not torch.is_grad_enabled() and hasattr(self, "activation"):
            return torch.ops.hf_moe.cpu_experts(
                hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self.activation
            )
    return grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights)


EXPERTS_IMPLEMENTATIONS = {
    "hf_moe": auto_experts_forward,
    "hf_moe_cpu": cpu_experts_forward,
    "hf_moe_grouped": grouped_experts_forward,
}
for _name, _forward in EXPERTS_IMPLEMENTATIONS.items():
    ExpertsInterface.register(_name, _forward)

# The implementations that skip sentinel assignments themselves ("eager" is HfMoeExperts.forward).
SENTINEL_AWARE_IMPLEMENTATIONS = frozenset({None, "eager", *EXPERTS_IMPLEMENTATIONS})
# What an hf_moe model runs when no implementation is requested.
DEFAULT_EXPERTS_IMPLEMENTATION = "hf_moe"

__all__ = [
    "DEFAULT_EXPERTS_IMPLEMENTATION",
    "FUSED_MAX_ROWS_ENV",
    "EXPERTS_IMPLEMENTATIONS",
    "ExpertGroups",
    "HfMoeExperts",
    "SENTINEL_AWARE_IMPLEMENTATIONS",
    "group_by_expert",
    "grouped_mm",
    "fused_fits",
    "fused_max_rows_per_expert",
    "one_token_experts",
    "small_groups_kernel",
]
