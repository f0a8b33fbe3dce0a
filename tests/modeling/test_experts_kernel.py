"""Every experts implementation equals the reference forward, selected through the public setting.

The reference is `HfMoeExperts.forward` ("eager"), itself checked against a per-token loop straight from the SwiGLU
definition. Each fast implementation ("hf_moe", "hf_moe_cpu", "hf_moe_grouped") is chosen with
`config._experts_implementation` (what `model.set_experts_implementation` sets) and must match it in fp32, with
autograd (gradients of the input, the routing weights and both expert tensors) and without, with dropped
assignments (sentinel index E, weight 0). The shapes reach every path inside the CPU kernels: one token, small
balanced groups (padded bmm or grouped GEMM, both selected with `HF_MOE_CPU_SMALL_GROUPS`), skewed groups and large
groups (one matmul per expert).
"""

import copy
import os
import platform
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from hf_moe import HfMoeForCausalLM
from hf_moe.modeling import cpu_kernel
from hf_moe.modeling.cpu_kernel import load_fused_kernel
from hf_moe.modeling.experts import (
    EXPERTS_IMPLEMENTATIONS,
    FUSED_MAX_ROWS_ENV,
    MANUAL_BACKWARD_MIN_ROWS_PER_EXPERT,
    SMALL_GROUPS_ENV,
    TRAIN_KERNEL_MAX_ROWS_PER_EXPERT,
    HfMoeExperts,
    fused_max_rows_per_expert,
    group_by_expert,
    small_groups_kernel,
)
from hf_moe.modeling.modeling_hf_moe import HfMoeSparseMoeBlock
from tests.helpers.tiny import tiny_config

NUM_EXPERTS = (
    4  # tiny config; K=4 is then the expert-choice shape (every expert in every row, with sentinels)
)
FP32 = dict(rtol=1e-4, atol=1e-5)  # summation order differs between the paths; real bugs are O(0.1)
FAST = sorted(EXPERTS_IMPLEMENTATIONS)


@pytest.fixture(params=["fused", "padded", "grouped"])
def small_groups(request, monkeypatch) -> str:
    """Every kernel of CPU inference on small groups, through the environment setting that selects them."""
    monkeypatch.setenv(SMALL_GROUPS_ENV, request.param)
    assert small_groups_kernel() == request.param
    return request.param


def make_experts(
    implementation: str = "eager", seed: int = 0, dtype: torch.dtype = torch.float32, intermediate: int = 16
) -> HfMoeExperts:
    config = tiny_config(num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=intermediate)
    config._experts_implementation = implementation
    torch.manual_seed(seed)
    experts = HfMoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0.0, 0.3)
        experts.down_proj.normal_(0.0, 0.3)
    return experts.to(dtype)


def with_implementation(experts: HfMoeExperts, implementation: str) -> HfMoeExperts:
    """A copy of `experts` (same weights) whose config selects `implementation`."""
    other = copy.deepcopy(experts)
    other.config = copy.deepcopy(experts.config)
    other.config._experts_implementation = implementation
    return other


def make_routing(
    num_tokens: int, top_k: int, sentinels: bool, seed: int = 1, skew: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (as top-k gives), random positive weights; with `sentinels`, about a third of the
    slots (at least one) are dropped: index NUM_EXPERTS, weight 0. `skew` (top-1) crowds expert 0."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack(
        [torch.randperm(NUM_EXPERTS, generator=gen)[:top_k] for _ in range(num_tokens)]
    )  # (T, K)
    if skew:  # top-1 to expert 0 in every row but the last
        index = torch.zeros(num_tokens, 1, dtype=torch.long)
        index[-1] = NUM_EXPERTS - 1
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1  # (T, K)
    if sentinels:
        dropped = torch.rand(num_tokens, top_k, generator=gen) < 0.35
        dropped[0, -1] = True
        index = index.masked_fill(dropped, NUM_EXPERTS)
        weights = weights.masked_fill(dropped, 0.0)
    return index, weights


def naive_experts(
    experts: HfMoeExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """One token and one slot at a time, straight from the SwiGLU definition."""
    rows = []
    for t in range(x.shape[0]):
        acc = x[t] * 0.0  # in the graph even when every slot of the token is dropped
        for k in range(index.shape[1]):
            expert = int(index[t, k])
            if expert == experts.num_experts:
                continue
            gate, up = (experts.gate_up_proj[expert] @ x[t]).chunk(2)
            acc = acc + weights[t, k] * (experts.down_proj[expert] @ (F.silu(gate) * up))
        rows.append(acc)
    return torch.stack(rows)


def run_with_grads(fn, experts: HfMoeExperts, x: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor):
    """Output and the gradients of (input, routing weights, gate_up_proj, down_proj) of `fn(experts, x, w)`."""
    x = x.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out = fn(experts, x, weights)
    out.backward(grad_out)
    tensors = [x, weights, experts.gate_up_proj, experts.down_proj]
    # A tensor that gets no gradient at all (every slot dropped) counts as a zero gradient.
    return out.detach(), [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]


def odd_shape_experts(hidden: int, intermediate: int, num_experts: int, top_k: int) -> HfMoeExperts:
    """Reference experts of a shape the tiny config does not have (odd hidden widths get 5 heads of 8)."""
    config = tiny_config(
        hidden_size=hidden,
        **(dict(num_attention_heads=5, num_key_value_heads=5, head_dim=8) if hidden % 2 else {}),  # odd width
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=intermediate,
    )
    torch.manual_seed(0)
    experts = HfMoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0.0, 0.3)
        experts.down_proj.normal_(0.0, 0.3)
    return experts


GRAD_NAMES = ["input", "routing weights", "gate_up_proj", "down_proj"]


def assert_grads_close(actual: list[torch.Tensor], expected: list[torch.Tensor], who: str) -> None:
    for name, a, e in zip(GRAD_NAMES, actual, expected):
        torch.testing.assert_close(a, e, **FP32, msg=lambda m, name=name: f"{who}: grad of {name}: {m}")


# The routing weight scales the smaller of the (S, I) activation and the (S, H) output: cover both (H = 32).
@pytest.mark.parametrize("intermediate", [16, 48], ids=["I<H", "I>H"])
@pytest.mark.parametrize("sentinels", [False, True], ids=["dropless", "sentinels"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_reference_matches_definition(num_tokens: int, top_k: int, sentinels: bool, intermediate: int):
    experts = make_experts("eager", intermediate=intermediate)
    index, weights = make_routing(num_tokens, top_k, sentinels)
    x = torch.randn(num_tokens, experts.hidden_dim)
    grad_out = torch.randn(num_tokens, experts.hidden_dim)
    expected, expected_grads = run_with_grads(
        lambda m, x, w: naive_experts(m, x, index, w), experts, x, weights, grad_out
    )
    actual, actual_grads = run_with_grads(lambda m, x, w: m(x, index, w), experts, x, weights, grad_out)
    torch.testing.assert_close(actual, expected, **FP32)
    assert_grads_close(actual_grads, expected_grads, "eager")
    if sentinels:  # a dropped slot gets no gradient through its (zero) routing weight
        assert (actual_grads[1][index == NUM_EXPERTS] == 0).all()


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("intermediate", [16, 48], ids=["I<H", "I>H"])
@pytest.mark.parametrize("sentinels", [False, True], ids=["dropless", "sentinels"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_implementation_matches_reference(
    implementation: str, num_tokens: int, top_k: int, sentinels: bool, intermediate: int, small_groups: str
):
    reference = make_experts("eager", intermediate=intermediate)
    fast = with_implementation(reference, implementation)
    index, weights = make_routing(num_tokens, top_k, sentinels)
    x = torch.randn(num_tokens, reference.hidden_dim)
    grad_out = torch.randn(num_tokens, reference.hidden_dim)

    def call(m, x, w):
        return m(x, index, w)

    expected, expected_grads = run_with_grads(call, reference, x, weights, grad_out)
    actual, actual_grads = run_with_grads(call, fast, x, weights, grad_out)
    torch.testing.assert_close(actual, expected, **FP32)
    assert_grads_close(actual_grads, expected_grads, implementation)
    if sentinels:
        assert (actual_grads[1][index == NUM_EXPERTS] == 0).all()
    with torch.no_grad():  # the inference paths (one token, padded bmm)
        torch.testing.assert_close(fast(x, index, weights), expected, **FP32)


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_other_activations_match_reference(implementation: str, activation: str):
    """Gated experts with the activations of other families (Gemma's tanh GELU; ReLU has no hand-written
    backward on the CPU path and takes autograd's), forward and every gradient."""
    config = tiny_config(num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16)
    config.text_config.hidden_act = activation
    torch.manual_seed(0)
    reference = HfMoeExperts(config)
    assert reference.activation == activation
    with torch.no_grad():
        reference.gate_up_proj.normal_(0.0, 0.3)
        reference.down_proj.normal_(0.0, 0.3)
    fast = with_implementation(reference, implementation)
    # 300 tokens: past MANUAL_BACKWARD_MIN_ROWS_PER_EXPERT, so the CPU path runs its hand-written activation backward.
    index, weights = make_routing(300, 2, sentinels=True)
    x = torch.randn(300, reference.hidden_dim)
    grad_out = torch.randn(300, reference.hidden_dim)

    def call(m, x, w):
        return m(x, index, w)

    expected, expected_grads = run_with_grads(call, reference, x, weights, grad_out)
    actual, actual_grads = run_with_grads(call, fast, x, weights, grad_out)
    torch.testing.assert_close(actual, expected, **FP32)
    assert_grads_close(actual_grads, expected_grads, f"{implementation} {activation}")


KERNEL_PRODUCTS = ("hf_moe_kernels::grouped_nt", "hf_moe_kernels::grouped_nn", "hf_moe_kernels::grouped_tn")


@pytest.mark.parametrize(
    "setting, num_tokens, top_k",
    [(s, t, k) for s in ("grouped", "fused") for t, k in ((1, 2), (64, 2), (64, 4), (300, 2), (1100, 4))],
)
def test_cpu_training_picks_the_backward_by_rows_per_expert(
    setting: str, num_tokens: int, top_k: int, monkeypatch
):
    """CPU training, by routed rows per expert on average and `HF_MOE_CPU_SMALL_GROUPS`: with "fused", up to
    TRAIN_KERNEL_MAX_ROWS_PER_EXPERT (no limit with AVX-512) the hand-written backward on the compiled kernel's
    products; otherwise past
    MANUAL_BACKWARD_MIN_ROWS_PER_EXPERT the hand-written backward on aten's grouped GEMMs, below it autograd's.
    The gradient tests here use token counts on each side; this pins that they do, through the autograd node the
    forward leaves and the operators that run."""
    monkeypatch.setenv(SMALL_GROUPS_ENV, setting)
    experts = make_experts("hf_moe_cpu")
    index, weights = make_routing(num_tokens, top_k, sentinels=False)
    rows = num_tokens * top_k / NUM_EXPERTS
    kernel = setting == "fused" and rows <= (TRAIN_KERNEL_MAX_ROWS_PER_EXPERT or rows)
    hand_written = kernel or rows > MANUAL_BACKWARD_MIN_ROWS_PER_EXPERT
    x = torch.randn(num_tokens, experts.hidden_dim, requires_grad=True)
    with torch.profiler.profile() as prof:
        experts(x, index, weights).sum().backward()
        out = experts(x, index, weights)
    assert ("RoutedExperts" in out.grad_fn.name()) == hand_written, out.grad_fn.name()
    ran = {event.name for event in prof.events()}
    assert [op in ran for op in KERNEL_PRODUCTS] == [kernel] * 3, sorted(ran)


@pytest.mark.parametrize(
    "hidden, intermediate, num_experts, top_k, num_tokens, sizes",
    [
        (40, 24, 8, 2, 1, None),  # one token; rows of 40 and 24 floats: the vector and scalar tails
        (24, 40, 8, 2, 20, None),  # I > H (the routing weight scales the output), tails
        (35, 20, 8, 1, 37, list(range(1, 9))),  # expert e gets e + 1 rows: every row tile 1-8 once
        # two experts without rows, one with several row tiles; I = 4100: weight gradients summed in chunks of rows
        (32, 4100, 4, 1, 62, [0, 45, 16, 0]),
        (35, 48, 4, 2, 300, None),  # 150 rows per expert: x @ W.T through the transposed copy, 35 columns
    ],
    ids=[
        "one token, odd widths",
        "I>H, odd widths",
        "every tile size",
        "empty, crowded, chunked",
        "150 rows",
    ],
)
def test_training_kernel_matches_reference(
    hidden: int,
    intermediate: int,
    num_experts: int,
    top_k: int,
    num_tokens: int,
    sizes: list[int] | None,
    monkeypatch,
):
    """The compiled kernel's grouped products in CPU training (`HF_MOE_CPU_SMALL_GROUPS=fused`, float32) on shapes
    the tiny config does not reach: widths that are not a multiple of its vectors, every row tile, experts without
    rows, several tiles per expert, a dropped slot (`test_fused_kernel_runs_for_each_x86_level` reruns these with
    the build of each x86 level). The output and the gradients of the input, the routing weights and both expert
    tensors must match the reference, and give the same bits twice."""
    monkeypatch.setenv(SMALL_GROUPS_ENV, "fused")
    reference = odd_shape_experts(hidden, intermediate, num_experts, top_k)
    fast = with_implementation(reference, "hf_moe")
    gen = torch.Generator().manual_seed(num_tokens)
    if sizes is None:
        index = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    else:  # token 0 (its slot dropped below), then expert e's sizes[e] rows
        index = torch.cat(
            [
                torch.zeros(1, dtype=torch.long),
                torch.repeat_interleave(torch.arange(num_experts), torch.tensor(sizes)),
            ]
        )[:, None]
        assert index.shape == (num_tokens, 1)
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    index[0, -1], weights[0, -1] = num_experts, 0.0  # a dropped slot
    x = torch.randn(num_tokens, hidden, generator=gen)
    grad_out = torch.randn(num_tokens, hidden, generator=gen)

    def call(m, x, w):
        return m(x, index, w)

    # Long sums (150 rows, rows of 4100) differ in float32 by the order of summation: each path is held to the
    # float64 truth, within 4x the error of the float32 reference there (a real bug is off by O(0.1)).
    truth, truth_grads = run_with_grads(
        call, copy.deepcopy(reference).double(), x.double(), weights.double(), grad_out.double()
    )
    expected, expected_grads = run_with_grads(call, reference, x, weights, grad_out)
    with torch.profiler.profile() as prof:
        actual, actual_grads = run_with_grads(call, fast, x, weights, grad_out)
    cap = TRAIN_KERNEL_MAX_ROWS_PER_EXPERT
    kernel = cap is None or num_tokens * top_k <= cap * num_experts  # AVX2 builds stop at 64 rows per expert
    ran = {event.name for event in prof.events()}
    assert [op in ran for op in KERNEL_PRODUCTS] == [kernel] * 3, sorted(ran)
    for name, a, e, t in zip(
        ["output", *GRAD_NAMES], [actual, *actual_grads], [expected, *expected_grads], [truth, *truth_grads]
    ):
        error, bound = (a.double() - t).abs().max().item(), 4 * (e.double() - t).abs().max().item() + 1e-6
        assert error <= bound, (
            f"training kernel: {name} is {error:.2e} off the float64 result (the reference {bound:.2e})"
        )
    again, again_grads = run_with_grads(call, fast, x, weights, grad_out)
    assert torch.equal(again, actual) and all(map(torch.equal, again_grads, actual_grads))


@pytest.mark.parametrize("num_tokens", [64, 300])
@pytest.mark.parametrize("implementation", FAST)
def test_frozen_experts_give_input_and_routing_gradients(implementation: str, num_tokens: int):
    """Experts frozen (adapter training): the input and the routing weights still get their exact gradients, the
    expert tensors none (on the CPU, 64 tokens take autograd's backward and 300 the hand-written one)."""
    reference = make_experts("eager")
    fast = with_implementation(reference, implementation)
    for module in (reference, fast):
        module.requires_grad_(False)
    index, weights = make_routing(num_tokens, 2, sentinels=True)
    x = torch.randn(num_tokens, reference.hidden_dim)
    grad_out = torch.randn(num_tokens, reference.hidden_dim)
    grads = []
    for module in (reference, fast):
        xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
        module(xg, index, wg).backward(grad_out)
        assert module.gate_up_proj.grad is None and module.down_proj.grad is None
        grads.append((xg.grad, wg.grad))
    for actual, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(actual, expected, **FP32)


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize(
    "num_tokens, skew", [(64, True), (900, False)], ids=["skewed groups", "large groups"]
)
def test_inference_unpadded_cases_match_reference(
    implementation: str, num_tokens: int, skew: bool, small_groups: str
):
    """Routings that leave the plain padded bmm: one crowded expert (its rows past the capped capacity run apart),
    and about 1200 routed rows (from 256 rows per expert on average: one matmul per expert)."""
    reference = make_experts("eager")
    fast = with_implementation(reference, implementation)
    index, weights = make_routing(num_tokens, 2, sentinels=True, skew=skew)
    routed = int((index < NUM_EXPERTS).sum())
    assert (routed >= 256 * NUM_EXPERTS) if not skew else routed < 256 * NUM_EXPERTS
    x = torch.randn(num_tokens, reference.hidden_dim)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, index, weights), reference(x, index, weights), **FP32)


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("num_tokens", [32, 40])
def test_inference_several_crowded_experts_match_reference(
    implementation: str, num_tokens: int, small_groups: str
):
    """Several experts past the padded bmm's capacity at once (and one with no rows): every crowded expert's extra
    rows land in their own output rows, in the order the sort gave them."""
    num_experts = 8
    config = tiny_config(num_experts=num_experts, num_experts_per_tok=2, moe_intermediate_size=16)
    torch.manual_seed(0)
    reference = HfMoeExperts(config)
    with torch.no_grad():
        reference.gate_up_proj.normal_(0.0, 0.3)
        reference.down_proj.normal_(0.0, 0.3)
    fast = with_implementation(reference, implementation)
    gen = torch.Generator().manual_seed(num_tokens)
    # Top-2 over experts 0, 1 and 2 mostly, experts 3-6 now and then; expert 7 gets nothing.
    crowded = torch.randint(0, 3, (num_tokens, 2), generator=gen)
    spread = torch.randint(3, num_experts - 1, (num_tokens, 2), generator=gen)
    index = torch.where(torch.rand(num_tokens, 2, generator=gen) < 0.8, crowded, spread)
    index[:, 1] = torch.where(index[:, 1] == index[:, 0], (index[:, 0] + 1) % (num_experts - 1), index[:, 1])
    index[0, 1] = num_experts  # a dropped slot too
    weights = torch.rand(num_tokens, 2, generator=gen) + 0.1
    counts = torch.bincount(index[index < num_experts], minlength=num_experts)
    routed = int(counts.sum())
    assert int((counts > 2 * routed // num_experts).sum()) >= 2  # at least two experts past the capacity
    x = torch.randn(num_tokens, reference.hidden_dim)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, index, weights), reference(x, index, weights), **FP32)


@pytest.mark.parametrize("implementation", ["eager", *FAST])
def test_all_dropped_give_zeros(implementation: str):
    experts = make_experts(implementation)
    for num_tokens in (1, 5):
        index = torch.full((num_tokens, 2), NUM_EXPERTS)
        x = torch.randn(num_tokens, experts.hidden_dim, requires_grad=True)
        out = experts(x, index, torch.zeros(num_tokens, 2))
        assert out.shape == (num_tokens, experts.hidden_dim) and not out.any()
        with torch.no_grad():
            assert not experts(x, index, torch.zeros(num_tokens, 2)).any()


def test_float64_gradcheck_through_grouped_fallback():
    """float64 has no grouped-GEMM kernel: "hf_moe_grouped" runs its per-group loop operator and custom backward."""
    experts = make_experts("hf_moe_grouped", dtype=torch.float64)
    index, weights = make_routing(5, 2, sentinels=True)
    x = torch.randn(5, experts.hidden_dim, dtype=torch.float64, requires_grad=True)
    weights = weights.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: experts(x, index, w), (x, weights), fast_mode=True)
    gate_up = experts.gate_up_proj
    assert torch.autograd.gradcheck(
        lambda g: torch.func.functional_call(
            experts, {"gate_up_proj": g}, (x.detach(), index, weights.detach())
        ),
        (gate_up.detach().clone().requires_grad_(),),
        fast_mode=True,
    )


@pytest.mark.parametrize("implementation", FAST)
@pytest.mark.parametrize("num_tokens", [1, 64])
def test_bf16_runs_and_tracks_fp32(implementation: str, num_tokens: int, small_groups: str):
    experts32 = make_experts(implementation)
    experts16 = with_implementation(experts32, implementation).to(torch.bfloat16)
    index, weights = make_routing(num_tokens, 2, sentinels=True)
    x = torch.randn(num_tokens, experts32.hidden_dim)
    expected = experts32(x, index, weights)
    x16 = x.bfloat16().requires_grad_()
    out = experts16(x16, index, weights.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.detach(), rtol=0.05, atol=0.05)
    with torch.no_grad():  # the inference paths in bf16
        inference = experts16(x16, index, weights.bfloat16())
        torch.testing.assert_close(inference.float(), expected.detach(), rtol=0.05, atol=0.05)
    out.float().square().sum().backward()
    assert x16.grad is not None and x16.grad.isfinite().all()
    assert experts16.gate_up_proj.grad is not None and experts16.gate_up_proj.grad.isfinite().all()


def test_matches_transformers_qwen3_experts():
    """Same weights through Qwen3-MoE's experts (eager and transformers' grouped_mm): the layouts agree."""
    ours = make_experts("hf_moe")
    index, weights = make_routing(64, 2, sentinels=False)
    x = torch.randn(64, ours.hidden_dim)
    grad_out = torch.randn(64, ours.hidden_dim)
    actual, actual_grads = run_with_grads(lambda m, x, w: m(x, index, w), ours, x, weights, grad_out)
    for implementation in ("eager", "grouped_mm"):
        config = Qwen3MoeConfig(
            hidden_size=ours.hidden_dim, moe_intermediate_size=ours.intermediate_dim, num_experts=NUM_EXPERTS
        )
        config._experts_implementation = implementation
        qwen = Qwen3MoeExperts(config)
        qwen.load_state_dict(ours.state_dict())
        expected, expected_grads = run_with_grads(lambda m, x, w: m(x, index, w), qwen, x, weights, grad_out)
        torch.testing.assert_close(actual, expected, **FP32)
        assert_grads_close(actual_grads, expected_grads, f"qwen3 {implementation}")


def test_group_by_expert():
    index = torch.tensor([[2, 0], [4, 2], [0, 4]])  # E = 4; 4 is the sentinel
    groups = group_by_expert(index, 4)
    assert groups.order.tolist() == [1, 4, 0, 3, 2, 5]  # expert 0 (slots 1, 4), expert 2 (0, 3), sentinels
    assert groups.token.tolist() == [0, 2, 0, 1, 1, 2]
    assert groups.counts.tolist() == [2, 0, 2, 0]
    assert groups.offsets.tolist() == [2, 2, 4, 4] and groups.offsets.dtype == torch.int32


def test_model_setting_selects_implementation():
    """`set_experts_implementation` reaches every layer's experts; all names give the same logits and gradients."""
    torch.manual_seed(0)
    model = HfMoeForCausalLM(
        tiny_config(num_experts=NUM_EXPERTS, router_type="switch", capacity_factor=0.5, num_experts_per_tok=1)
    )
    assert model.config._experts_implementation == "hf_moe"  # the default
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    results = {}
    for name in ["eager", *FAST, "grouped_mm"]:
        model.set_experts_implementation(name)
        assert {layer.mlp.experts.config._experts_implementation for layer in model.model.layers} == {name}
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        results[name] = (out.logits.detach(), model.model.layers[0].mlp.experts.gate_up_proj.grad.clone())
    for name, (logits, grad) in results.items():
        torch.testing.assert_close(logits, results["eager"][0], **FP32, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(grad, results["eager"][1], **FP32, msg=lambda m, n=name: f"{n} grad: {m}")


@pytest.mark.slow
def test_block_compiles_without_graph_breaks():
    """The sparse block under torch.compile(fullgraph=True) (a graph break is an error there) equals eager, forward
    and backward, with dropped assignments; "hf_moe" trains through the sync-free grouped path while compiling and
    runs CPU inference as one custom op."""
    config = tiny_config(
        num_experts=NUM_EXPERTS, router_type="switch", capacity_factor=0.5, num_experts_per_tok=1
    )
    config._experts_implementation = "hf_moe"
    torch.manual_seed(0)
    block = HfMoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 6, config.hidden_size)
    grad_out = torch.randn(2, 6, config.hidden_size)
    compiled = torch.compile(block, fullgraph=True)

    def fwd_bwd(module):
        xg = x.clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        out = module(xg)
        out.backward(grad_out)
        return out.detach(), xg.grad, block.experts.gate_up_proj.grad.clone(), block.gate.weight.grad.clone()

    for actual, expected in zip(fwd_bwd(compiled), fwd_bwd(block)):
        torch.testing.assert_close(actual, expected, **FP32)
    with (
        torch.no_grad()
    ):  # compiled CPU inference: the eager CPU kernels as the custom op hf_moe::cpu_experts
        for shape in [(1, 1), (2, 6)]:  # one decoding token; a batch with dropped assignments
            inputs = torch.randn(*shape, config.hidden_size)
            torch.testing.assert_close(compiled(inputs), block(inputs), **FP32)


@pytest.mark.slow
def test_generate_with_static_cache_and_compile_matches_eager():
    """`generate` with a static cache and the decoding step under torch.compile(fullgraph=True) (transformers'
    CompileConfig; on the CPU it needs `_compile_all_devices`) gives eager's greedy tokens, at batch 1 and 2."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(num_experts=NUM_EXPERTS, num_experts_per_tok=2)).eval()
    with torch.no_grad():  # experts large enough that their output moves the logits
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.normal_(0.0, 0.3)
            layer.mlp.experts.down_proj.normal_(0.0, 0.3)
    # The flag follows the base family (Llama here), whose decoder compiles fullgraph; so does the MoE block.
    assert model._can_compile_fullgraph is type(model.hf_moe_base)._can_compile_fullgraph is True
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    common = dict(
        do_sample=False,
        max_new_tokens=6,
        min_new_tokens=6,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    for batch in (1, 2):
        expected = model.generate(ids[:batch], **common)
        torch._dynamo.utils.counters.clear()
        actual = model.generate(
            ids[:batch], cache_implementation="static", compile_config=compile_config, **common
        )
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decoding step was compiled
        assert torch.equal(actual.sequences, expected.sequences), batch
        torch.testing.assert_close(torch.stack(actual.scores), torch.stack(expected.scores), **FP32)


@pytest.mark.parametrize("implementation", FAST)
def test_weights_at_unaligned_address(implementation: str, small_groups: str):
    """Weights loaded from safetensors start at any 4-byte offset; the grouped GEMM takes them (torch >= 2.11)."""
    reference = make_experts("eager")
    fast = with_implementation(reference, implementation)
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(reference, name).detach()
        storage = torch.empty(weight.numel() + 1)
        shifted = storage[1:].view_as(weight).copy_(weight)  # base address 4 bytes past an aligned one
        setattr(fast, name, torch.nn.Parameter(shifted))
    assert fast.gate_up_proj.data_ptr() % 16 != 0
    index, weights = make_routing(64, 2, sentinels=True)
    x = torch.randn(64, reference.hidden_dim)
    grad_out = torch.randn(64, reference.hidden_dim)
    expected, expected_grads = run_with_grads(lambda m, x, w: m(x, index, w), reference, x, weights, grad_out)
    actual, actual_grads = run_with_grads(lambda m, x, w: m(x, index, w), fast, x, weights, grad_out)
    torch.testing.assert_close(actual, expected, **FP32)
    assert_grads_close(actual_grads, expected_grads, implementation)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, index, weights), expected, **FP32)


def test_fused_max_rows_setting_sets_where_the_fused_kernel_stops(monkeypatch):
    """`HF_MOE_CPU_FUSED_MAX_ROWS` caps the fused kernel's batches (rows per expert on average; one token always
    takes it); unset, the cap follows the host's ISA; a bad value is refused with what is expected."""
    experts = make_experts("hf_moe_cpu")
    reference = make_experts("eager")
    monkeypatch.setenv(SMALL_GROUPS_ENV, "fused")
    fused_op = "hf_moe_kernels::fused_experts"
    # (cap, tokens at top-2 without drops, whether the fused kernel runs): 2 rows per token over 4 experts.
    for cap, num_tokens, fused in [("0", 1, True), ("0", 2, False), ("8", 16, True), ("8", 17, False)]:
        monkeypatch.setenv(FUSED_MAX_ROWS_ENV, cap)
        index, weights = make_routing(num_tokens, 2, sentinels=False, seed=num_tokens)
        x = torch.randn(num_tokens, experts.hidden_dim)
        with torch.no_grad(), torch.profiler.profile() as prof:
            out = experts(x, index, weights)
        assert (fused_op in [event.name for event in prof.events()]) == fused, (cap, num_tokens)
        with torch.no_grad():
            torch.testing.assert_close(out, reference(x, index, weights), **FP32)
    monkeypatch.delenv(FUSED_MAX_ROWS_ENV)
    assert fused_max_rows_per_expert() == (32 if cpu_kernel.has_avx512() else 8)
    for bad in ("-1", "many"):
        monkeypatch.setenv(FUSED_MAX_ROWS_ENV, bad)
        with (
            torch.no_grad(),
            pytest.raises(ValueError, match=f"{FUSED_MAX_ROWS_ENV}='{bad}': expected a non-neg"),
        ):
            experts(x, index, weights)


def test_small_groups_setting_selects_the_kernel(monkeypatch):
    """`HF_MOE_CPU_SMALL_GROUPS` switches CPU inference on small groups between the fused kernel, the padded bmm
    and the grouped GEMM (seen in the ops that run, for a batch and for one token); with "fused", a batch past
    `fused_max_rows_per_expert()` (which depends on the host's ISA) takes the vendor's kernel; `auto` takes the fused
    kernel where it builds (it does here); a typo is refused with the accepted values."""
    experts = make_experts("hf_moe_cpu")
    # A batch the fused kernel takes on any host (top-2 without drops: 2 rows per token), and one just past its cap.
    num_tokens = min(24, fused_max_rows_per_expert() * NUM_EXPERTS // 2)
    index, weights = make_routing(num_tokens, 2, sentinels=True)
    x = torch.randn(num_tokens, experts.hidden_dim)
    over = fused_max_rows_per_expert() * NUM_EXPERTS // 2 + 1
    index_over, weights_over = make_routing(over, 2, sentinels=False)
    x_over = torch.randn(over, experts.hidden_dim)
    ops = {}
    for kernel in ("fused", "padded", "grouped"):
        monkeypatch.setenv(SMALL_GROUPS_ENV, kernel)
        with torch.no_grad(), torch.profiler.profile() as prof:
            experts(x, index, weights)
            experts(x[:1], index[:1], weights[:1])
        ops[kernel] = [event.name for event in prof.events()]
    fused_op = "hf_moe_kernels::fused_experts"
    assert ops["fused"].count(fused_op) == 2 and "aten::bmm" not in ops["fused"]
    assert "aten::bmm" in ops["padded"] and fused_op not in ops["padded"]
    assert "aten::bmm" not in ops["grouped"] and fused_op not in ops["grouped"]
    monkeypatch.setenv(SMALL_GROUPS_ENV, "fused")
    with torch.no_grad(), torch.profiler.profile() as prof:
        out_over = experts(x_over, index_over, weights_over)
    assert fused_op not in [event.name for event in prof.events()]
    with torch.no_grad():
        reference = make_experts("eager")(x_over, index_over, weights_over)  # same seed: same weights
    torch.testing.assert_close(out_over, reference, **FP32)
    monkeypatch.setenv(SMALL_GROUPS_ENV, "auto")
    assert small_groups_kernel() == "fused"
    monkeypatch.setenv(SMALL_GROUPS_ENV, "bmm")
    with (
        torch.no_grad(),
        pytest.raises(
            ValueError, match="HF_MOE_CPU_SMALL_GROUPS='bmm'.*'fused', 'padded', 'grouped' or 'auto'"
        ),
    ):
        experts(x, index, weights)


FALLBACK_SCRIPT = """
import warnings, torch
from hf_moe.modeling.experts import small_groups_kernel
from tests.modeling.test_experts_kernel import make_experts, make_routing
experts = make_experts("hf_moe_cpu")
index, weights = make_routing(24, 2, sentinels=True)
x = torch.randn(24, experts.hidden_dim)
expected = make_experts("eager")(x, index, weights)
with warnings.catch_warnings(record=True) as caught, torch.no_grad():
    warnings.simplefilter("always")
    try:
        experts(x, index, weights)
        print("kernel", small_groups_kernel())
    except RuntimeError as error:
        print("error", error)
    else:
        torch.testing.assert_close(experts(x, index, weights), expected, rtol=1e-4, atol=1e-5)
print("warnings", " | ".join(str(w.message) for w in caught))
"""


@pytest.mark.parametrize("setting", ["fused", "auto"])
def test_fused_kernel_that_cannot_build(setting: str, tmp_path):
    """A compiler that fails (here `false`): an explicit "fused" raises naming the cause and the fix; "auto" warns
    once and runs the other kernels, still equal to the reference. No half-built library is left behind."""
    env = {**os.environ, "CXX": "false", "HF_MOE_KERNEL_CACHE": str(tmp_path), SMALL_GROUPS_ENV: setting}
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    if setting == "fused":
        assert (
            "error HF_MOE_CPU_SMALL_GROUPS=fused: the fused CPU experts kernel cannot be built" in done.stdout
        )
        assert "Install a C++ compiler" in done.stdout and "failed" in done.stdout
    else:
        assert (
            "kernel " + ("grouped" if "GenuineIntel" in open("/proc/cpuinfo").read() else "padded")
            in done.stdout
        )
        assert done.stdout.count("the fused CPU experts kernel is not available") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernel", "loop"])
def test_grouped_mm_ops_pass_opcheck(layout: str, dtype: torch.dtype):
    """The custom operators torch.compile sees: real and fake kernels agree on shapes and strides (the weight
    gradient comes back in the weight's own layout, so autograd accumulates it without a copy), autograd registered,
    schema honest. float64 takes the per-group loop, float32 the aten kernel."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 32, dtype=dtype, generator=gen)
    grad = torch.randn(12, 16, dtype=dtype, generator=gen)
    offsets = torch.tensor([4, 4, 12], dtype=torch.int32)  # an empty group in the middle
    if layout == "transposed":  # as the experts pass them: (E, out, in) stored, (E, in, out) viewed
        weight = torch.randn(3, 16, 32, dtype=dtype, generator=gen).transpose(1, 2)
    else:
        weight = torch.randn(3, 32, 16, dtype=dtype, generator=gen)
    torch.library.opcheck(torch.ops.hf_moe.grouped_mm, (x, weight.detach().requires_grad_(), offsets))
    torch.library.opcheck(torch.ops.hf_moe.grouped_mm_backward, (x, weight, offsets, grad))
    _, grad_weight = torch.ops.hf_moe.grouped_mm_backward(x, weight, offsets, grad)
    assert grad_weight.stride() == weight.stride()
    expected = torch.stack([x[:4].t() @ grad[:4], torch.zeros(32, 16, dtype=dtype), x[4:].t() @ grad[4:]])
    torch.testing.assert_close(grad_weight, expected)


@pytest.mark.parametrize(
    "hidden, intermediate, num_experts, top_k, num_tokens, crowded",
    [
        (40, 24, 8, 2, 1, False),  # one token; rows of 40 and 24 floats: the kernel's scalar tails
        (40, 24, 8, 2, 20, False),  # a decoding batch, tails in both projections
        (32, 16, 16, 4, 24, True),  # many experts, one with more rows than the kernel's 8-row tile
        # 5-8 rows per expert (the two-weight-row form) with tails; 35 output columns: a lone last column
        (35, 20, 8, 2, 28, False),
        # top-1, expert e gets e + 1 rows: every tile size 1-8 once (AVX2 runs 7 and 8 as two passes)
        (35, 20, 8, 1, 37, "tile sizes"),
    ],
    ids=[
        "one token, odd widths",
        "batch, odd widths",
        "16 experts, crowded",
        "5-8 rows, odd columns",
        "every tile size",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_kernel_matches_reference(
    hidden: int,
    intermediate: int,
    num_experts: int,
    top_k: int,
    num_tokens: int,
    crowded: bool | str,
    dtype: torch.dtype,
    monkeypatch,
):
    """The fused kernel (`HF_MOE_CPU_SMALL_GROUPS=fused`) on shapes the tiny config does not reach: widths that
    are not a multiple of its vectors, groups larger than its row tile, every tile size, many experts, a dropped
    slot (`test_fused_kernel_runs_for_each_x86_level` reruns these with the build of each x86 level). It
    must run (seen in the profile), match the reference, and give the same bits twice. In bfloat16 it computes in
    float32, so it matches the float32 reference on the same (bfloat16) values up to the output's rounding."""
    monkeypatch.setenv(SMALL_GROUPS_ENV, "fused")
    monkeypatch.setenv(FUSED_MAX_ROWS_ENV, "32")  # these shapes on every host, AVX2 ones included
    reference = odd_shape_experts(hidden, intermediate, num_experts, top_k)
    with torch.no_grad():
        for weight in (reference.gate_up_proj, reference.down_proj):  # values that bfloat16 holds exactly
            weight.copy_(weight.to(dtype))
    fast = with_implementation(reference, "hf_moe").to(dtype)
    gen = torch.Generator().manual_seed(num_tokens)
    index = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    if crowded == "tile sizes":  # token 0 (its slot dropped below), then expert e's e + 1 rows
        sizes = torch.arange(1, num_experts + 1)
        index = torch.cat(
            [torch.zeros(1, dtype=torch.long), torch.repeat_interleave(torch.arange(num_experts), sizes)]
        )
        index = index[:, None]
        assert index.shape == (num_tokens, 1)
    elif crowded:  # expert 0 in every token's first slot: 24 rows, three tiles
        index[:, 0] = 0
        index[:, 1:] = torch.stack(
            [torch.randperm(num_experts - 1, generator=gen)[: top_k - 1] + 1 for _ in range(num_tokens)]
        )
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    index[0, -1], weights[0, -1] = num_experts, 0.0  # a dropped slot
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    with torch.no_grad(), torch.profiler.profile() as prof:
        actual = fast(x, index, weights)
    assert "hf_moe_kernels::fused_experts" in [event.name for event in prof.events()]
    assert actual.dtype == dtype
    # bfloat16 output: rounded to 8 bits of mantissa, a relative error of at most 2**-9
    tolerance = FP32 if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(actual.float(), reference(x.float(), index, weights), **tolerance)
        assert torch.equal(fast(x, index, weights), actual)


def test_fused_kernel_op_passes_opcheck():
    """The compiled operator's schema, fake kernel and dispatch agree (torch.library.opcheck)."""
    assert load_fused_kernel() is None
    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(3, 2 * 24, 40, generator=gen), torch.randn(3, 40, 24, generator=gen)
    x = torch.randn(5, 40, generator=gen)
    token = torch.tensor([0, 3, 1, 2, 4, 0], dtype=torch.long)  # grouped by expert: 2, 0, 4 rows
    weights = torch.rand(6, generator=gen)
    torch.library.opcheck(
        torch.ops.hf_moe_kernels.fused_experts.default, (x, token, [2, 0, 4], weights, gate_up, down, 0)
    )


def test_training_kernel_ops_pass_opcheck():
    """The grouped products' schemas, fake kernels and dispatch agree (torch.library.opcheck)."""
    assert load_fused_kernel() is None
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 24, 40, generator=gen)  # (E, N, K)
    counts = [2, 0, 4]
    x, g = torch.randn(6, 40, generator=gen), torch.randn(6, 24, generator=gen)
    ops = torch.ops.hf_moe_kernels
    torch.library.opcheck(ops.grouped_nt.default, (x, weight, counts))
    torch.library.opcheck(ops.grouped_nn.default, (g, weight, counts))
    torch.library.opcheck(ops.grouped_tn.default, (g, x, counts))


def test_training_weight_grads_past_the_cache_match():
    """Weight gradients larger than the last-level cache (here 67 MB) are written with streaming stores, in one pass
    per tile: they must equal the per-expert products, with an expert without rows left at zero."""
    assert load_fused_kernel() is None
    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 2, 5]
    g, a = torch.randn(10, 4104, generator=gen), torch.randn(10, 1024, generator=gen)
    actual = torch.ops.hf_moe_kernels.grouped_tn(g, a, counts)
    starts = [0, 3, 3, 5, 10]
    for e in range(4):
        rows = slice(starts[e], starts[e + 1])
        torch.testing.assert_close(actual[e], g[rows].t() @ a[rows], **FP32)


@pytest.mark.parametrize(
    "op, args, message",
    [
        (
            "grouped_nt",
            lambda: (torch.randn(5, 8), torch.randn(2, 4, 8), [2, 2]),
            "counts add up to 4, not to the 5",
        ),
        ("grouped_nn", lambda: (torch.randn(4, 8), torch.randn(2, 4, 8), [2, 2]), "do not match"),
        (
            "grouped_tn",
            lambda: (torch.randn(4, 8).double(), torch.randn(4, 3).double(), [4]),
            "contiguous float32",
        ),
        ("grouped_nt", lambda: (torch.randn(8, 4).t(), torch.randn(2, 4, 8), [2, 2]), "contiguous float32"),
    ],
    ids=["counts", "shapes", "dtype", "layout"],
)
def test_training_kernel_ops_refuse_bad_input(op: str, args, message: str):
    """A call the kernel cannot compute raises, naming the problem, instead of reading past a tensor."""
    assert load_fused_kernel() is None
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.hf_moe_kernels, op)(*args())


X86_LEVELS = {"x86-64-v3": "avx2", "x86-64-v4": "avx512f"}  # -march level: the /proc/cpuinfo flag it needs


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction-set levels")
@pytest.mark.parametrize("level", list(X86_LEVELS), ids=["AVX2", "AVX-512"])
def test_fused_kernel_compiles_for_each_x86_level(level: str, tmp_path):
    """The kernel has code for each vector width (8 floats with AVX2, 16 with AVX-512): it must compile for
    both, whatever this machine has (a build that failed on AVX2 hosts once reached main from an AVX-512 one)."""
    from torch.utils.cpp_extension import include_paths

    compiler = cpu_kernel._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "fused_experts.cpp"
    source.write_text(cpu_kernel._SOURCE)
    flags = [flag for flag in cpu_kernel._flags(level) if flag != "-shared"]
    command = [
        compiler,
        *flags,
        *(f"-I{p}" for p in include_paths()),
        "-c",
        str(source),
        "-o",
        str(tmp_path / "k.o"),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction-set levels")
@pytest.mark.parametrize("level", list(X86_LEVELS), ids=["AVX2", "AVX-512"])
def test_fused_kernel_runs_for_each_x86_level(level: str, tmp_path):
    """`HF_MOE_KERNEL_MARCH` builds the kernel for one x86 level: the AVX2 build's 8-float tiles (and its 7-8 row
    tiles in two passes) are checked against the reference on an AVX-512 machine too, in a fresh process (one
    build per process), with the fused-kernel tests above; the level shows in `has_avx512()` and the default cap."""
    flags = cpu_kernel._cpu_flags()
    if flags is None or X86_LEVELS[level] not in flags:
        pytest.skip(f"this CPU has no {X86_LEVELS[level]}")
    if cpu_kernel._compiler() is None:
        pytest.skip("no C++ compiler")
    env = {
        **os.environ,
        cpu_kernel.KERNEL_MARCH_ENV: level,
        cpu_kernel.KERNEL_CACHE_ENV: str(tmp_path / "kernels"),
        "HF_MOE_EXPECT_AVX512": str(int(level == "x86-64-v4")),
    }
    env.pop(FUSED_MAX_ROWS_ENV, None)
    tests = (
        "test_fused_kernel_matches_reference or test_training_kernel_matches_reference"
        " or test_training_weight_grads_past_the_cache_match or test_fused_kernel_build_follows_the_march_setting"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
        env=env,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    # 5 shapes x 2 dtypes of the fused-kernel test, 5 + 1 of the training ones, the check of the build's level
    assert re.search(r"\b17 passed\b", done.stdout), done.stdout[-3000:]
    assert [p.suffix for p in (tmp_path / "kernels").iterdir()] == [".so"]  # built there, for this level


def test_fused_kernel_build_follows_the_march_setting(monkeypatch):
    """Run by `test_fused_kernel_runs_for_each_x86_level` with `HF_MOE_KERNEL_MARCH` set (and on its own with
    the default): the kernel builds for that level, and `has_avx512()` and the default cap of the fused kernel
    follow it."""
    assert load_fused_kernel() is None
    expected = os.environ.get("HF_MOE_EXPECT_AVX512")
    if expected is not None:
        assert cpu_kernel.has_avx512() == bool(int(expected))
    monkeypatch.delenv(FUSED_MAX_ROWS_ENV, raising=False)
    assert fused_max_rows_per_expert() == (32 if cpu_kernel.has_avx512() else 8)


@pytest.mark.parametrize(
    "march, message",
    [
        ("-O0 evil", "expected a -march value such as native"),
        ("no-such-cpu", "does not accept -march=no-such-cpu"),
    ],
)
def test_fused_kernel_refuses_a_bad_march(march: str, message: str, tmp_path):
    """A malformed or unknown `HF_MOE_KERNEL_MARCH` is refused with the reason, before anything is compiled.
    Checked in a fresh process: the kernel is loaded once per process."""
    if cpu_kernel._compiler() is None:
        pytest.skip("no C++ compiler")
    code = "from hf_moe.modeling.cpu_kernel import load_fused_kernel; import sys; sys.stdout.write(load_fused_kernel())"
    env = {**os.environ, cpu_kernel.KERNEL_MARCH_ENV: march, cpu_kernel.KERNEL_CACHE_ENV: str(tmp_path / "k")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert message in done.stdout
    assert not (tmp_path / "k").exists()
