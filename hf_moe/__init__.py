"""hf-moe: Mixture-of-Experts models for the Hugging Face ecosystem.

Importing the package registers `model_type="hf_moe"` with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`
(idempotent), and marks the classes so that `save_pretrained` writes `auto_map` plus the modeling code, which lets
`trust_remote_code=True` load a checkpoint where hf_moe is not installed. When PEFT is installed it also registers
hf_moe's fused-experts LoRA layer with PEFT (as soon as PEFT is imported), so `PeftModel.from_pretrained` loads
hf_moe adapters without extra calls.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from importlib import import_module
from pathlib import PurePath
from typing import Any

__version__ = "0.1.0"


def register() -> None:
    """Register the hf_moe classes with the transformers Auto classes. Safe to call any number of times."""
    # lazy: CLI start-up. torch and transformers load on the first call, not at `import hf_moe` (see below).
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .modeling import HfMoeConfig, HfMoeForCausalLM, HfMoeModel

    AutoConfig.register(HfMoeConfig.model_type, HfMoeConfig, exist_ok=True)
    AutoModel.register(HfMoeConfig, HfMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(HfMoeConfig, HfMoeForCausalLM, exist_ok=True)
    # `auto_map` + copies of modeling/*.py in every saved checkpoint.
    HfMoeConfig.register_for_auto_class("AutoConfig")
    HfMoeModel.register_for_auto_class("AutoModel")
    HfMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def _in_console_script() -> bool:
    """True in the `hf-moe` command: its launcher imports this package before `hf_moe.cli` parses the arguments."""
    return PurePath(sys.argv[0] if sys.argv else "").stem == "hf-moe"


# Importing the model classes means importing torch and transformers (3-7 s). The `hf-moe` command defers that
# until its arguments are parsed (hf_moe.cli calls register()), so that `--help` and argument errors are instant.
# Everywhere else importing hf_moe registers, as documented above.
if not _in_console_script():
    from .modeling import HfMoeConfig, HfMoeForCausalLM, HfMoeModel

    register()


def _register_with_peft() -> None:
    """Let plain PEFT load adapters of hf_moe's fused-experts LoRA layer (`hf_moe.peft.register_with_peft`).

    PEFT is optional and slow to import, so it is not imported here: if it is already loaded the layer is
    registered now, otherwise a one-shot import hook registers it right after `import peft` completes."""
    if "peft" in sys.modules:
        import_module("hf_moe.peft")  # registers on import
    elif importlib.util.find_spec("peft") is not None and not any(
        isinstance(f, _PeftImportHook) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _PeftImportHook())


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """Finds `peft` as the normal path finder does, and imports `hf_moe.peft` once `peft/__init__` has run."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot, and no recursion while the real spec is looked up
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            try:
                import_module("hf_moe.peft")
            except Exception as err:  # never break `import peft` itself
                warnings.warn(
                    f"hf_moe could not register its fused-experts LoRA layer with PEFT: {err}", stacklevel=2
                )

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


_register_with_peft()

# Heavier entry points load on first use so `import hf_moe` stays cheap.
_LAZY: dict[str, str] = {
    "HfMoeConfig": "hf_moe.modeling",
    "HfMoeModel": "hf_moe.modeling",
    "HfMoeForCausalLM": "hf_moe.modeling",
    "upcycle": "hf_moe.conversion.upcycle",
    "merge_experts": "hf_moe.conversion.merge",
    "compress": "hf_moe.compression",
    "export": "hf_moe.conversion.export",
    "import_native": "hf_moe.conversion.export",
    "router_statistics": "hf_moe.stats",
    "RouterStatistics": "hf_moe.stats",
    "lora_config": "hf_moe.peft",
    "plan_serve": "hf_moe.serving.serve",
    "run_serve": "hf_moe.serving.serve",
    "write_model_card": "hf_moe.hub",
    "push_to_hub": "hf_moe.hub",
    "count_parameters": "hf_moe.hub",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_moe' has no attribute {name!r}")


__all__ = ["HfMoeConfig", "HfMoeModel", "HfMoeForCausalLM", "register", "__version__", *_LAZY]
