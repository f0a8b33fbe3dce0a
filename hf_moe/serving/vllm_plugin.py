"""vLLM plugin: serves `HfMoeForCausalLM` checkpoints in vLLM without exporting them.

vLLM calls `register()` through the `vllm.general_plugins` entry point (declared in pyproject.toml) in every
process it starts (API server, engine core, workers), so the registration reaches spawned workers; a call made
in a user's process would not. Importing `hf_moe` never imports vLLM: the model class is registered as a
"module:Class" string and vLLM imports `hf_moe.serving.vllm_model` only when it builds the model.

The registered class is vLLM's Transformers-backend MoE model (our transformers modeling code with vLLM's paged
attention and fused-MoE experts) plus a load-time check that refuses routers whose decoding vLLM cannot
reproduce; see `hf_moe.serving.vllm_model` and docs/serving.md.
"""

from __future__ import annotations

from .. import register as register_with_transformers

ARCHITECTURE = "HfMoeForCausalLM"
MODEL_CLASS = "hf_moe.serving.vllm_model:HfMoeVllmForCausalLM"


def register() -> None:
    """Register `HfMoeForCausalLM` with vLLM's `ModelRegistry` (lazily) and hf_moe with transformers' Auto classes.

    Called by vLLM itself through the entry point; safe to call any number of times.
    """
    from vllm import ModelRegistry  # optional: vllm (this function runs only inside vLLM)

    register_with_transformers()  # model_type "hf_moe" with AutoConfig/AutoModel, for vLLM's config parsing
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
