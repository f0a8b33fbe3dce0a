"""Router inspection over a text: run a checkpoint on tokenized text, collect `hf_moe.stats.router_statistics`, and
draw the layer x expert load heatmap.

Example:
```python
>>> from hf_moe.plotting import inspect_routing, plot_expert_load
>>> stats = inspect_routing("my-moe", open("play.txt").read(), max_tokens=2048)
>>> print(stats.format_table())
>>> plot_expert_load(stats, "load.png")
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conversion.io import atomic_open
from .stats import RouterStatistics, router_statistics


def chunk_token_ids(
    token_ids: list[int], *, seq_len: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token stream into rows of `seq_len`, padding the last row.

    Args:
        token_ids: the token stream.
        seq_len: row length.
        pad_token_id: id written into the padding (masked out of every statistic).
    Returns:
        input_ids (B, S) and attention_mask (B, S).
    """
    if not token_ids:
        raise ValueError("the text tokenized to zero tokens; give a non-empty text")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    rows = (len(token_ids) + seq_len - 1) // seq_len
    input_ids = torch.full((rows, seq_len), pad_token_id, dtype=torch.long)  # (B, S)
    attention_mask = torch.zeros((rows, seq_len), dtype=torch.long)  # (B, S)
    flat = torch.tensor(token_ids, dtype=torch.long)
    input_ids.view(-1)[: len(token_ids)] = flat
    attention_mask.view(-1)[: len(token_ids)] = 1
    return input_ids, attention_mask


def routing_statistics_for_ids(
    model: Any, token_ids: list[int], *, seq_len: int = 512, pad_token_id: int | None = None
) -> RouterStatistics:
    """Router statistics of `model` over a token stream (cut into rows of `seq_len`, run as one batch).

    Args:
        model: an hf_moe causal-LM model.
        token_ids: the token stream.
        seq_len: tokens per row (at most the model's `max_position_embeddings`).
        pad_token_id: padding id for the last row (default: the config's, else 0).
    Returns:
        A `RouterStatistics` over all tokens (padding excluded).
    """
    config = model.config
    seq_len = min(seq_len, config.max_position_embeddings, len(token_ids))
    pad = pad_token_id if pad_token_id is not None else (config.pad_token_id or 0)
    input_ids, attention_mask = chunk_token_ids(token_ids, seq_len=seq_len, pad_token_id=pad)
    return router_statistics(model, input_ids, attention_mask)


def inspect_routing(
    model_dir: str | os.PathLike,
    text: str,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    max_tokens: int = 2048,
    seq_len: int = 512,
    progress: bool = False,
) -> RouterStatistics:
    """Load a checkpoint and its tokenizer, and compute router statistics over the first `max_tokens` tokens of
    `text`.

    Expert-choice routers pick tokens among all tokens of the batch, so their figures depend on `seq_len` and
    `max_tokens`; token-choice routers do not (capacity-limited `switch` routing does).

    Args:
        model_dir: an hf_moe checkpoint folder.
        text: the text to route.
        tokenizer_dir: where the tokenizer is (default: `model_dir`).
        max_tokens: tokens to use from the start of the text.
        seq_len: tokens per row of the batch.
        progress: show a tqdm bar over the decoder layers during the forward pass (minutes for a real model on a CPU).
    Returns:
        A `RouterStatistics`.
    """
    model_dir = Path(model_dir)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir / 'config.json'} not found; point at a saved hf_moe checkpoint folder"
        )
    if not any(
        (tokenizer_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    ):
        raise FileNotFoundError(
            f"no tokenizer files in {tokenizer_dir}; copy the source model's tokenizer there or pass --tokenizer DIR"
        )
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if getattr(model.config, "model_type", None) != "hf_moe":
        raise ValueError(f"{model_dir} holds a {model.config.model_type!r} model, not hf_moe")
    # Tokenize only a prefix of the text, doubled until it holds max_tokens tokens (texts can be megabytes).
    chars = max_tokens * 4
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= max_tokens or chars >= len(text):
            break
        chars *= 2
    ids = ids[:max_tokens]
    if not progress:
        return routing_statistics_for_ids(model, ids, seq_len=seq_len, pad_token_id=tokenizer.pad_token_id)
    # The statistics come from one batched forward pass (expert choice depends on the whole batch), so progress is
    # counted in layers, by hooks that only observe.
    layers = model.model.layers
    with tqdm(total=len(layers), desc=f"routing {len(ids)} tokens", unit="layer") as bar:

        def advance(*_: Any) -> None:  # returns None: a forward hook's return value would replace the output
            bar.update(1)

        hooks = [layer.register_forward_hook(advance) for layer in layers]
        try:
            return routing_statistics_for_ids(
                model, ids, seq_len=seq_len, pad_token_id=tokenizer.pad_token_id
            )
        finally:
            for hook in hooks:
                hook.remove()


def plot_expert_load(
    stats: RouterStatistics, path: str | os.PathLike, *, title: str | None = None, dpi: int = 120
) -> Path:
    """Save a heatmap of expert load (rows: MoE layers, columns: experts) as a PNG.

    Each cell is the layer's share of routed assignments that went to the expert; the colour scale is centred on
    the balanced share 1/E, so over-loaded experts stand out. The file is written atomically.

    Args:
        stats: router statistics (e.g. from `inspect_routing`).
        path: output .png path.
        title: plot title (default: router type and token count).
        dpi: resolution.
    Returns:
        The path written.
    """
    # optional: matplotlib (hf-moe[plot]). The object-oriented API with the Agg canvas: no pyplot, so no global
    # backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    path = Path(path)
    load = torch.tensor(stats.expert_load, dtype=torch.float64)  # (L, E)
    num_layers, num_experts = load.shape
    balanced = 1.0 / num_experts
    width = min(16.0, 3.0 + 0.35 * num_experts)
    height = min(12.0, 2.5 + 0.35 * num_layers)
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    vmax = max(float(load.max()), balanced * 1.0001)
    norm = TwoSlopeNorm(vcenter=balanced, vmin=0.0, vmax=vmax)
    image = ax.imshow(load.numpy(), aspect="auto", cmap="RdBu_r", norm=norm)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(num_layers), [str(i) for i in stats.layers])
    step = max(1, num_experts // 16)
    ax.set_xticks(range(0, num_experts, step))
    if num_experts <= 16 and num_layers <= 32:
        for i in range(num_layers):
            for j in range(num_experts):
                # White on the saturated ends of the colour map, black near the balanced (white) centre.
                colour = "white" if abs(float(norm(float(load[i, j]))) - 0.5) > 0.3 else "black"
                ax.text(j, i, f"{load[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(f"share of assignments (balanced = 1/{num_experts})")
    ax.set_title(
        title
        or f"Expert load: {stats.router_type}, top-{stats.top_k} of {num_experts}, {stats.num_tokens} tokens"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:  # the one atomic-write helper (hf_moe.conversion.io)
        fig.savefig(f, format="png", bbox_inches="tight")
    return path


__all__ = ["chunk_token_ids", "routing_statistics_for_ids", "inspect_routing", "plot_expert_load"]
