"""The vLLM model class behind the plugin: vLLM's Transformers-backend MoE model with a load-time router check.

Imported by vLLM only (through the "module:Class" string that `vllm_plugin.register()` registers); it imports
vLLM. vLLM builds our transformers `HfMoeForCausalLM` on the meta device, swaps in its paged attention and, for
every `experts` child with 3-D `gate_up_proj` / `down_proj`, its fused-MoE layer. How the routing is kept:

- If vLLM's fuser recognises the `gate` as `topk(softmax|sigmoid(linear(x)))` with only `weight` /
  `e_score_correction_bias` as state, vLLM drops our router and routes itself ("internal routing") from config
  fields: `norm_topk_prob` (renormalise), `n_group` + `topk_group` (grouped top-k), `routed_scaling_factor`.
  Of our routers only `softmax_topk` matches; the config adjustment below makes vLLM's reading of those fields
  equal our router's semantics.
- Otherwise ("external routing") our router module runs unchanged and vLLM's fused experts receive its
  `(top_k_weights, top_k_index)`: `topk_softmax`, `sigmoid_topk` (it holds a non-checkpoint load buffer),
  `noisy_topk` (a noise projection; noise is training-only, so eval routing is deterministic) and `switch`.

Refused at load, with the reason: `expert_choice` (experts choose among all tokens of a forward pass, so a
decoding step and a prefill route differently, and vLLM batches unrelated requests into one pass) and `switch`
with a `capacity_factor` (which tokens are dropped depends on the other tokens in the batch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import AutoModel
from vllm.model_executor.models.transformers import TransformersMoEForCausalLM

from hf_moe.modeling import HfMoeConfig, HfMoeModel

from .compat import adapt_config_for_vllm, serving_problems


class HfMoeVllmDecoder(HfMoeModel):
    """The decoder class vLLM builds and decorates for torch.compile.

    vLLM's Transformers backend marks the decoder class for compilation by changing the class itself (its bases and
    `__init__`), after which that class can only be built inside a vLLM config context. Giving vLLM this subclass
    keeps `HfMoeModel` / `HfMoeForCausalLM` usable with transformers in the same process (an in-process engine next
    to a transformers model, as in tests and notebooks)."""


def _use_vllm_decoder() -> None:
    # AutoModel is what the backend calls to build the decoder; HfMoeForCausalLM keeps building HfMoeModel.
    AutoModel.register(HfMoeConfig, HfMoeVllmDecoder, exist_ok=True)


if TYPE_CHECKING:
    from vllm.config import VllmConfig


class HfMoeVllmForCausalLM(TransformersMoEForCausalLM):
    """`HfMoeForCausalLM` in vLLM: Transformers-backend MoE model; refuses batch-dependent routers at load."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        problems = serving_problems(config)
        if problems:
            raise ValueError(
                "hf_moe: this checkpoint cannot be served by vLLM with the outputs it has in transformers: "
                + "; ".join(problems)
                + ". Decode it with transformers generate() instead."
            )
        adapt_config_for_vllm(config)
        _use_vllm_decoder()
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _patch_config(self) -> None:
        # vLLM sets its attention implementation on the text config (the base decoder's). The hf_moe config holds
        # that text config, and transformers propagates the top-level implementation to sub-configs when the model
        # is built, so it is set at the top as well; otherwise the default (sdpa) would overwrite vLLM's.
        super()._patch_config()
        self.config._attn_implementation = self.text_config._attn_implementation
