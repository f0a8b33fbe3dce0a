"""Which hf_moe configs vLLM can serve with transformers' outputs, and how vLLM must read them. No vLLM import:
`hf-moe serve` checks a checkpoint before it starts vLLM."""

from __future__ import annotations

from ..modeling.modeling_hf_moe import ROUTERS


def serving_problems(config) -> list[str]:
    """Reasons `config` cannot be served by vLLM with the same outputs as transformers (empty: servable). Whether
    a router's decision depends on the other tokens of a batch is the router class's own policy
    (`HfMoeRouter.batch_dependence`).

    Args:
        config: an `HfMoeConfig`.

    Returns:
        One message per blocking field.
    """
    why = ROUTERS[config.router_type].batch_dependence(config)
    return [why] if why else []


def adapt_config_for_vllm(config) -> None:
    """Make vLLM's internal routing read our config with our routers' meaning (in place, on vLLM's copy).

    vLLM's Transformers backend sizes and routes its fused-MoE layers from the *text* config (the base decoder's,
    where hf_moe mirrors its MoE fields). vLLM applies `routed_scaling_factor` in its own routing whenever it is not
    1, but only `sigmoid_topk` uses the field, and `sigmoid_topk` is routed by our own module (external routing).
    `n_group` / `topk_group` stay as they are: for the other routers they are 1 / 1, and vLLM's grouped top-k over a
    single group is the plain top-k. Shared experts are hf_moe's own module, run next to vLLM's fused experts, so
    vLLM must not count a native base's `n_shared_experts` into its fused layer.
    """
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        if config.router_type != "sigmoid_topk":
            cfg.routed_scaling_factor = 1.0
        if "n_shared_experts" in vars(cfg):
            cfg.n_shared_experts = 0
