"""HfMoeExperts.forward against a naive per-token loop and against transformers' experts kernels.

Both compute paths are covered: the grouped GEMM (F.grouped_mm, used on CPU for fp32/bf16) and the per-expert loop
(used where grouped GEMM is unavailable), plus the one-token decoding path. Sentinel slots (index == num_experts)
must contribute nothing, and every gradient (input, routing weights, both expert tensors) must match.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.moe import grouped_mm_experts_forward
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from hf_moe.modeling import modeling_hf_moe
from hf_moe.modeling.modeling_hf_moe import HfMoeExperts
from tests.helpers.tiny import tiny_config

NUM_EXPERTS = 4  # tiny config; K=4 is then the expert-choice shape (every expert in every row, with sentinels)
FP32 = dict(rtol=1e-4, atol=1e-5)  # summation order differs between the paths; real bugs are O(0.1)


def make_experts(seed: int = 0, dtype: torch.dtype = torch.float32, intermediate: int = 16) -> HfMoeExperts:
    config = tiny_config(num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=intermediate)
    config._experts_implementation = "eager"  # our own forward, as HfMoePreTrainedModel selects by default
    torch.manual_seed(seed)
    experts = HfMoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0.0, 0.3)
        experts.down_proj.normal_(0.0, 0.3)
    return experts.to(dtype)


def make_routing(num_tokens: int, top_k: int, sentinels: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (as top-k gives), random positive weights; with `sentinels`, about a third of the
    slots (at least one) are dropped: index NUM_EXPERTS, weight 0."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:top_k] for _ in range(num_tokens)])  # (T, K)
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1  # (T, K)
    if sentinels:
        dropped = torch.rand(num_tokens, top_k, generator=gen) < 0.35
        dropped[0, -1] = True
        index = index.masked_fill(dropped, NUM_EXPERTS)
        weights = weights.masked_fill(dropped, 0.0)
    return index, weights


def naive_experts(
    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """One token and one slot at a time, straight from the SwiGLU definition."""
    rows = []
    for t in range(x.shape[0]):
        acc = x[t] * 0.0  # in the graph even when every slot of the token is dropped
        for k in range(index.shape[1]):
            expert = int(index[t, k])
            if expert == gate_up_proj.shape[0]:
                continue
            gate, up = (gate_up_proj[expert] @ x[t]).chunk(2)
            acc = acc + weights[t, k] * (down_proj[expert] @ (F.silu(gate) * up))
        rows.append(acc)
    return torch.stack(rows)


def run_with_grads(fn, params: list[torch.Tensor], x: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    out = fn(x, weights)
    out.backward(grad_out)
    # A tensor that gets no gradient at all (every slot dropped) counts as a zero gradient.
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in [x, weights, *params]]
    return out.detach(), grads


@pytest.fixture(params=["grouped_mm", "loop", "large_groups"])
def path(request, monkeypatch):
    """grouped_mm: the default paths; loop: grouped GEMM unavailable; large_groups: every group counts as large, so
    CPU inference takes the per-expert loop even where grouped GEMM exists."""
    if request.param == "grouped_mm" and not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    if request.param == "loop":
        monkeypatch.setattr(modeling_hf_moe, "_use_grouped_mm", lambda weight: False)
    if request.param == "large_groups":
        monkeypatch.setattr(HfMoeExperts, "cpu_loop_min_rows_per_expert", 0)
    return request.param


# The routing weight scales the smaller of the (S, I) activation and the (S, H) output: cover both (H = 32).
@pytest.mark.parametrize("intermediate", [16, 48], ids=["I<H", "I>H"])
@pytest.mark.parametrize("sentinels", [False, True], ids=["dropless", "sentinels"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_experts_match_naive_reference(path: str, num_tokens: int, top_k: int, sentinels: bool, intermediate: int):
    experts = make_experts(intermediate=intermediate)
    index, weights = make_routing(num_tokens, top_k, sentinels)
    x = torch.randn(num_tokens, experts.hidden_dim)
    grad_out = torch.randn(num_tokens, experts.hidden_dim)

    ref_gate_up = experts.gate_up_proj.detach().clone().requires_grad_()
    ref_down = experts.down_proj.detach().clone().requires_grad_()
    expected, expected_grads = run_with_grads(
        lambda x, w: naive_experts(ref_gate_up, ref_down, x, index, w), [ref_gate_up, ref_down], x, weights, grad_out
    )
    actual, actual_grads = run_with_grads(
        lambda x, w: experts(x, index, w), [experts.gate_up_proj, experts.down_proj], x, weights, grad_out
    )
    torch.testing.assert_close(actual, expected, **FP32)
    with torch.no_grad():  # the inference paths (padded bmm, or the loop for large groups)
        torch.testing.assert_close(experts(x, index, weights), expected, **FP32)
    for name, a, e in zip(["input", "routing weights", "gate_up_proj", "down_proj"], actual_grads, expected_grads):
        torch.testing.assert_close(a, e, **FP32, msg=lambda m, name=name: f"grad of {name}: {m}")
    if sentinels:
        # A dropped slot gets no gradient through its (zero) routing weight.
        assert (actual_grads[1][index == NUM_EXPERTS] == 0).all()


def test_experts_all_dropped_give_zeros(path: str):
    experts = make_experts()
    index = torch.full((5, 2), NUM_EXPERTS)
    out = experts(torch.randn(5, experts.hidden_dim), index, torch.zeros(5, 2))
    assert out.shape == (5, experts.hidden_dim) and not out.any()


def test_experts_match_transformers_kernels(path: str):
    """Same weights through transformers' grouped_mm_experts_forward and Qwen3-MoE's eager per-expert loop."""
    ours = make_experts()
    index, weights = make_routing(64, 2, sentinels=False)
    x = torch.randn(64, ours.hidden_dim)
    grad_out = torch.randn(64, ours.hidden_dim)
    qwen_config = Qwen3MoeConfig(
        hidden_size=ours.hidden_dim, moe_intermediate_size=ours.intermediate_dim, num_experts=NUM_EXPERTS
    )
    qwen_config._experts_implementation = "eager"
    qwen = Qwen3MoeExperts(qwen_config)
    qwen.load_state_dict(ours.state_dict())

    def params(module):
        return [module.gate_up_proj, module.down_proj]

    actual, actual_grads = run_with_grads(lambda x, w: ours(x, index, w), params(ours), x, weights, grad_out)
    for name, fn, module in [
        ("transformers grouped_mm", lambda x, w: grouped_mm_experts_forward(qwen, x, index, w), qwen),
        ("qwen3 eager", lambda x, w: qwen(x, index, w), qwen),
    ]:
        expected, expected_grads = run_with_grads(fn, params(module), x, weights, grad_out)
        torch.testing.assert_close(actual, expected, **FP32, msg=lambda m, name=name: f"{name}: {m}")
        for a, e in zip(actual_grads, expected_grads):
            torch.testing.assert_close(a, e, **FP32, msg=lambda m, name=name: f"{name} grads: {m}")


@pytest.mark.parametrize("num_tokens", [1, 64])
def test_experts_bf16_runs_and_tracks_fp32(path: str, num_tokens: int):
    experts32 = make_experts()
    experts16 = make_experts(dtype=torch.bfloat16)
    index, weights = make_routing(num_tokens, 2, sentinels=True)
    x = torch.randn(num_tokens, experts32.hidden_dim)
    expected = experts32(x, index, weights)
    x16 = x.bfloat16().requires_grad_()
    out = experts16(x16, index, weights.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.detach(), rtol=0.05, atol=0.05)
    out.float().square().sum().backward()
    assert x16.grad is not None and x16.grad.isfinite().all()
    assert experts16.gate_up_proj.grad is not None and experts16.gate_up_proj.grad.isfinite().all()


def test_loop_path_has_float64_gradients(monkeypatch):
    """The loop path is the fallback for dtypes grouped GEMM lacks (float64 here): gradcheck it."""
    experts = make_experts(dtype=torch.float64)
    index, weights = make_routing(5, 2, sentinels=True)
    x = torch.randn(5, experts.hidden_dim, dtype=torch.float64, requires_grad=True)
    weights = weights.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: experts(x, index, w), (x, weights), fast_mode=True)


@pytest.mark.parametrize("sentinels", [False, True], ids=["dropless", "sentinels"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("num_tokens", [5, 64])
def test_inference_padded_path_matches_naive(monkeypatch, num_tokens: int, top_k: int, sentinels: bool):
    """Without autograd, CPU groups are padded to the largest one and run as one bmm per projection."""
    calls = []
    original = HfMoeExperts._padded_bmm
    monkeypatch.setattr(HfMoeExperts, "_padded_bmm", lambda self, *a: calls.append(1) or original(self, *a))
    experts = make_experts()
    index, weights = make_routing(num_tokens, top_k, sentinels)
    x = torch.randn(num_tokens, experts.hidden_dim)
    with torch.no_grad():
        actual = experts(x, index, weights)
        expected = naive_experts(experts.gate_up_proj, experts.down_proj, x, index, weights)
    torch.testing.assert_close(actual, expected, **FP32)
    routed = index[index < NUM_EXPERTS]
    within_bound = NUM_EXPERTS * torch.bincount(routed, minlength=NUM_EXPERTS).max() <= 2 * routed.numel()
    assert bool(calls) == bool(within_bound)
    if num_tokens == 64:  # enough tokens that random routing is balanced: the padded path must be what ran
        assert calls


def test_inference_skewed_routing_skips_padding(monkeypatch):
    """One crowded expert would pad the others past 2x the routed rows: the grouped path runs instead."""
    calls = []
    original = HfMoeExperts._padded_bmm
    monkeypatch.setattr(HfMoeExperts, "_padded_bmm", lambda self, *a: calls.append(1) or original(self, *a))
    experts = make_experts()
    index = torch.zeros(64, 1, dtype=torch.long)
    index[0, 0] = 3
    weights = torch.rand(64, 1)
    x = torch.randn(64, experts.hidden_dim)
    with torch.no_grad():
        actual = experts(x, index, weights)
        expected = naive_experts(experts.gate_up_proj, experts.down_proj, x, index, weights)
    torch.testing.assert_close(actual, expected, **FP32)
    assert not calls
