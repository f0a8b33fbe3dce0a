"""Which hf_moe configs vLLM can serve with transformers' outputs, and how vLLM must read them. No vLLM import:
`hf-moe serve` checks a checkpoint before it starts vLLM."""

from __future__ import annotations

# Routers whose per-token decision depends on the other tokens of the forward pass (why, for the error message).
BATCH_DEPENDENT = {
    "expert_choice": "each expert picks its top tokens among all tokens of a forward pass, which is not causal and "
    "changes with whatever other requests vLLM batches alongside",
}


def serving_problems(config) -> list[str]:
    """Reasons `config` cannot be served by vLLM with the same outputs as transformers (empty: servable).

    Args:
        config: an `HfMoeConfig` (or any object with its routing fields).

    Returns:
        One message per blocking field.
    """
    problems = []
    router = getattr(config, "router_type", "softmax_topk")
    if router in BATCH_DEPENDENT:
        problems.append(f"router_type={router!r}: {BATCH_DEPENDENT[router]}")
    if router == "switch" and getattr(config, "capacity_factor", None) is not None:
        problems.append(
            f"router_type='switch' with capacity_factor={config.capacity_factor}: which tokens are dropped depends "
            "on the other tokens in the batch; set capacity_factor=None (dropless) to serve it"
        )
    return problems


def adapt_config_for_vllm(config) -> None:
    """Make vLLM's internal routing read our config with our routers' meaning (in place, on vLLM's copy).

    vLLM applies `routed_scaling_factor` in its own routing whenever it is not 1, but only `sigmoid_topk` uses the
    field, and `sigmoid_topk` is routed by our own module (external routing). `n_group` / `topk_group` stay as they
    are: for the other routers they are 1 / 1, and vLLM's grouped top-k over a single group is the plain top-k.
    """
    if config.router_type != "sigmoid_topk":
        config.routed_scaling_factor = 1.0
