"""What a router initialisation receives: :class:`RouterInitContext`, and the :data:`RouterInit` signature.

The registry :data:`hf_moe.conversion.init.ROUTER_INITS` lists schemes defined in sibling modules (the prompts-based
one in :mod:`hf_moe.conversion.prompts`). Those modules import the context from here and the registry imports them,
so the imports run one way: ``init -> prompts -> init_context``. Import both names from
:mod:`hf_moe.conversion.init`, which re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RouterInitContext:
    """What a router initialisation may use. Built once per conversion, before any layer is written.

    Attributes:
        num_experts: E.
        hidden_size: H.
        granularity: slices per dense MLP (experts ``v*g .. v*g+g-1`` form virtual group ``v``).
        std: std of random rows (the dense config's initializer_range).
        seed: conversion seed.
        moe_layers: indices of the layers that become MoE.
        src_dir: the dense checkpoint folder (e.g. to run the dense model on prompts).
        reader: the open :class:`~hf_moe.conversion.io.CheckpointReader` of `src_dir`.
        prompts: user prompts for data-driven schemes (path or parsed object), else None.
        extra: free-form options for registry entries.
    """

    num_experts: int
    hidden_size: int
    granularity: int = 1
    std: float = 0.02
    seed: int = 0
    moe_layers: list[int] = field(default_factory=list)
    src_dir: Any = None
    reader: Any = None
    prompts: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


# ROUTER_INITS[name](context) -> callable(layer_idx) -> router weight (E, H).
RouterInit = Callable[[RouterInitContext], Callable[[int], torch.Tensor]]

__all__ = ["RouterInit", "RouterInitContext"]
