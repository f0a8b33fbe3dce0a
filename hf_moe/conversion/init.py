"""Expert and router initialisation for upcycling: small pure functions on tensors.

Notation: a dense SwiGLU MLP ``y = W_down (act(W_gate x) * W_up x)`` with ``W_gate, W_up: (I, H)`` and
``W_down: (H, I)``. hf_moe stores experts fused: ``gate_up_proj (E, 2*I_e, H)`` (gate rows then up rows) and
``down_proj (E, H, I_e)``.

- :func:`expert_weights`: sparse upcycling (Komatsuzaki et al. 2022: every expert is a copy of the dense MLP) and
  its fine-grained form (He et al. 2024, "Upcycling Large Language Models into Mixture of Experts"): the
  intermediate dimension is split into ``granularity`` slices and expert ``e`` holds slice ``e % granularity``,
  so experts ``v*g .. v*g+g-1`` form *virtual group* ``v``, one complete copy of the MLP.
- :func:`drop_upcycle` (Nakamura et al. 2025, "Drop-Upcycling"): per expert, re-initialise a random fraction of
  the intermediate units (same rows of gate/up, columns of down) from N(mean, std) of that weight matrix.
- :func:`add_relative_noise`: Gaussian noise scaled by each weight matrix's std.
- Router initialisations live in :data:`ROUTER_INITS`, keyed by name, so new schemes are registry entries. Each
  takes a :class:`RouterInitContext` (defined in :mod:`hf_moe.conversion.init_context`, re-exported here); the
  ``prompts`` entry is :func:`hf_moe.conversion.prompts.prompts_router`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from .init_context import RouterInit, RouterInitContext
from .prompts import cheap_embed_router, prompts_router


def seeded_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded from `seed` and a path such as ("drop", layer_idx): each layer/purpose gets its own
    stream, so results do not depend on the order in which layers are processed."""
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1))
    return generator


# ================================================================================================================
# Experts.
# ================================================================================================================


def expert_weights(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    num_experts: int,
    granularity: int = 1,
    down_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused expert weights from a dense MLP by copy (``granularity=1``) or fine-grained split.

    Expert ``e`` holds intermediate slice ``e % granularity`` (``I / granularity`` units) and its ``down_proj`` is
    multiplied by ``down_scale``. Computed in float32; cast the result as needed.

    Args:
        gate: (I, H) dense gate_proj weight.
        up: (I, H) dense up_proj weight.
        down: (H, I) dense down_proj weight.
        num_experts: E, a multiple of `granularity`.
        granularity: slices per dense MLP; must divide I.
        down_scale: factor on every expert's down_proj (``granularity`` makes a whole virtual group sum to the
            dense output when each member gets router weight ``1/granularity``, see docs/upcycling.md).

    Returns:
        gate_up_proj (E, 2*I/g, H) and down_proj (E, H, I/g), float32.
    """
    inter, hidden = gate.shape
    if up.shape != (inter, hidden) or down.shape != (hidden, inter):
        raise ValueError(
            f"dense MLP shapes do not fit together: gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
            f"down {tuple(down.shape)}; expected (I, H), (I, H), (H, I)"
        )
    if granularity < 1 or inter % granularity:
        raise ValueError(f"granularity={granularity} must be >= 1 and divide the intermediate size {inter}")
    if num_experts % granularity:
        raise ValueError(f"num_experts={num_experts} must be a multiple of granularity={granularity}")
    width = inter // granularity
    gate_s = gate.float().reshape(granularity, width, hidden)  # (g, I/g, H)
    up_s = up.float().reshape(granularity, width, hidden)
    gate_up = torch.cat([gate_s, up_s], dim=1)  # (g, 2I/g, H)
    down_s = down.float().reshape(hidden, granularity, width).permute(1, 0, 2) * down_scale  # (g, H, I/g)
    slice_of = torch.arange(num_experts) % granularity  # (E,)
    return gate_up[slice_of].contiguous(), down_s[slice_of].contiguous()


def drop_upcycle(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    *,
    drop_ratio: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-Upcycling (Nakamura et al. 2025, Sec. 3): for each expert independently, pick
    ``round(drop_ratio * I_e)`` intermediate units at random and re-initialise their gate and up rows and their
    down column from N(mean, std) of the expert's corresponding weight matrix (gate, up, down separately).

    Args:
        gate_up: (E, 2*I_e, H) fused gate/up weights (not modified).
        down: (E, H, I_e) down weights (not modified).
        drop_ratio: fraction in [0, 1].
        generator: source of randomness (seeded by the caller).

    Returns:
        New gate_up (E, 2*I_e, H), down (E, H, I_e) and the re-initialised unit indices (E, n), sorted.
    """
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio={drop_ratio} must be in [0, 1]")
    num_experts, hidden, width = down.shape
    n = round(drop_ratio * width)
    gate_up, down = gate_up.clone(), down.clone()
    dropped = torch.empty(num_experts, n, dtype=torch.long)
    for e in range(num_experts):
        idx = torch.randperm(width, generator=generator)[:n].sort().values  # (n,)
        dropped[e] = idx
        if n == 0:
            continue
        gate_w, up_w = gate_up[e, :width], gate_up[e, width:]  # (I_e, H) views
        for weight in (gate_w, up_w):
            mean, std = weight.float().mean(), weight.float().std()
            fresh = torch.randn(n, hidden, generator=generator) * std + mean
            weight[idx] = fresh.to(weight.dtype)
        down_w = down[e]  # (H, I_e)
        mean, std = down_w.float().mean(), down_w.float().std()
        fresh = torch.randn(hidden, n, generator=generator) * std + mean
        down_w[:, idx] = fresh.to(down_w.dtype)
    return gate_up, down, dropped


def add_relative_noise(
    gate_up: torch.Tensor, down: torch.Tensor, *, noise_std: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add N(0, (noise_std * std(W))^2) to each expert's gate, up and down matrix W (std taken per matrix).

    Returns:
        New gate_up (E, 2*I_e, H) and down (E, H, I_e).
    """
    if noise_std < 0:
        raise ValueError(f"noise_std={noise_std} must be >= 0")
    if noise_std == 0:
        return gate_up, down
    width = down.shape[-1]
    gate_up, down = gate_up.clone(), down.clone()
    for e in range(down.shape[0]):
        for weight in (gate_up[e, :width], gate_up[e, width:], down[e]):
            scale = noise_std * weight.float().std()
            weight += (torch.randn(weight.shape, generator=generator) * scale).to(weight.dtype)
    return gate_up, down


def shared_expert_weights(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    width: int,
    granularity: int,
    down_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused shared-expert MLP of intermediate width `width` filled with the dense MLP's slices in order, cycling
    (slice t of the shared block = dense slice ``t % granularity``), down_proj times `down_scale`.

    Returns:
        gate (width, H), up (width, H), down (H, width), float32.
    """
    inter, hidden = gate.shape
    slice_width = inter // granularity
    if width % slice_width:
        raise ValueError(f"shared expert width {width} must be a multiple of the slice width {slice_width}")
    slices = torch.arange(width // slice_width) % granularity  # (s,)
    gate_s = gate.float().reshape(granularity, slice_width, hidden)[slices].reshape(width, hidden)
    up_s = up.float().reshape(granularity, slice_width, hidden)[slices].reshape(width, hidden)
    down_s = (
        down.float().reshape(hidden, granularity, slice_width)[:, slices].reshape(hidden, width) * down_scale
    )
    return gate_s, up_s, down_s


# ================================================================================================================
# Routers: ROUTER_INITS[name](context) -> callable(layer_idx) -> router weight (E, H).
# ================================================================================================================


def random_router(context: RouterInitContext) -> Callable[[int], torch.Tensor]:
    """Independent N(0, std^2) rows per expert and layer."""

    def init(layer_idx: int) -> torch.Tensor:
        generator = seeded_generator(context.seed, "router", layer_idx)
        return (
            torch.randn(context.num_experts, context.hidden_size, generator=generator) * context.std
        )  # (E, H)

    return init


def virtual_group_router(context: RouterInitContext) -> Callable[[int], torch.Tensor]:
    """He et al. 2024 virtual-group initialisation: one random row per virtual group, shared by its
    `granularity` members, so top-k picks whole groups (all slices of one MLP copy) when top_k is a multiple of
    the granularity. With granularity 1 this is :func:`random_router`."""

    def init(layer_idx: int) -> torch.Tensor:
        generator = seeded_generator(context.seed, "router", layer_idx)
        groups = context.num_experts // context.granularity
        rows = torch.randn(groups, context.hidden_size, generator=generator) * context.std  # (E/g, H)
        return rows.repeat_interleave(context.granularity, dim=0)  # (E, H)

    return init


ROUTER_INITS: dict[str, RouterInit] = {
    "random": random_router,
    "virtual-group": virtual_group_router,
    "prompts": prompts_router,  # hf_moe.conversion.prompts
    "cheap_embed": cheap_embed_router,  # hf_moe.conversion.prompts (mergekit's gate_mode: cheap_embed)
}


def get_router_init(name: str) -> RouterInit:
    """The router initialisation registered under `name`.

    Raises:
        ValueError: unknown name, listing the registered ones.
    """
    if name not in ROUTER_INITS:
        raise ValueError(f"unknown router_init {name!r}; registered: {', '.join(ROUTER_INITS)}")
    return ROUTER_INITS[name]


__all__ = [
    "ROUTER_INITS",
    "RouterInit",
    "RouterInitContext",
    "add_relative_noise",
    "drop_upcycle",
    "expert_weights",
    "get_router_init",
    "random_router",
    "seeded_generator",
    "shared_expert_weights",
    "virtual_group_router",
]
