"""hf-moe: Mixture-of-Experts models for the Hugging Face ecosystem.

Importing the package registers `model_type="hf_moe"` with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`
(idempotent), and marks the classes so that `save_pretrained` writes `auto_map` plus the modeling code, which lets
`trust_remote_code=True` load a checkpoint where hf_moe is not installed.
"""

from importlib import import_module
from typing import Any

from .modeling import HfMoeConfig, HfMoeForCausalLM, HfMoeModel

__version__ = "0.1.0"


def register() -> None:
    """Register the hf_moe classes with the transformers Auto classes. Safe to call any number of times."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(HfMoeConfig.model_type, HfMoeConfig, exist_ok=True)
    AutoModel.register(HfMoeConfig, HfMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(HfMoeConfig, HfMoeForCausalLM, exist_ok=True)
    # `auto_map` + copies of modeling/*.py in every saved checkpoint.
    HfMoeConfig.register_for_auto_class("AutoConfig")
    HfMoeModel.register_for_auto_class("AutoModel")
    HfMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")


register()

# Heavier entry points load on first use so `import hf_moe` stays cheap.
_LAZY: dict[str, str] = {
    "upcycle": "hf_moe.conversion.upcycle",
    "merge_experts": "hf_moe.conversion.merge",
    "export": "hf_moe.conversion.export",
    "import_native": "hf_moe.conversion.export",
    "router_statistics": "hf_moe.stats",
    "RouterStatistics": "hf_moe.stats",
    "lora_config": "hf_moe.peft",
    "plan_serve": "hf_moe.serving.serve", "run_serve": "hf_moe.serving.serve",
    "write_model_card": "hf_moe.hub", "push_to_hub": "hf_moe.hub", "count_parameters": "hf_moe.hub",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_moe' has no attribute {name!r}")


__all__ = ["HfMoeConfig", "HfMoeModel", "HfMoeForCausalLM", "register", "__version__", *_LAZY]
