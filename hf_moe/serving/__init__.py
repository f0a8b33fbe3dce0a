"""Serving hf_moe checkpoints with vLLM: the vLLM plugin (`vllm_plugin`, `vllm_model`), the router policy
(`compat`, no vLLM import) and `hf-moe serve` (`serve`). Nothing here imports vLLM at import time. See
docs/serving.md."""
