"""Router initialisation from prompts (mergekit-moe's ``hidden`` gate mode).

Each expert gets a few *positive* prompts (text it should handle) and optional *negative* prompts (text it
should not). The prompts are run through the dense model (loaded once, in memory, float32) and, for every MoE
layer, the hidden states that feed that layer's MLP (the ``post_attention_layernorm`` output, which is exactly
what the router of the MoE layer reads) are averaged:

    m_e^+ = mean over positive prompts of (mean over the prompt's non-special tokens of h)      # (H,)
    d_e   = m_e^+ - m_e^-   (or m_e^+ without negatives)                                        # (H,)
    row_e = d_e / ||d_e|| * logit_scale / rms_token_norm                                        # (H,)

``rms_token_norm`` is the typical norm of single token hidden states at that layer (the square root of the mean,
over all prompts, of each prompt's mean squared token norm), so a token whose hidden state points along ``row_e``
scores a logit of about ``logit_scale`` and an orthogonal one about 0. All experts of a layer share that scale,
hence a prompt's *average* router logits (the router is linear) are highest at its own expert whenever it is the
only positive prompt of that expert and there are no negatives:
``row_e . m_e = c ||m_e|| > c ||m_e|| cos(m_e, m_f) = row_f . m_e``.

Rows whose directions are nearly the same (cosine > :data:`COLLINEAR_COSINE`) cannot separate their experts:
a warning names the layer and the expert pairs. Special tokens (BOS) are left out of the means: the first
position's hidden state is the same for every prompt and would pull all rows together.

The prompt file (YAML) lists one entry per expert, in expert order::

    logit_scale: 4.0            # optional, default 4.0
    experts:
      - name: shakespeare       # optional label used in messages
        positive_prompts: ["To be, or not to be"]
        negative_prompts: ["def main():"]
      - positive_prompts: ["import numpy as np"]

With fine-grained upcycling (``granularity`` g > 1) the file may instead list one entry per *virtual group*
(``num_experts / g`` entries); every member of a group then gets the group's row, which keeps the
virtual-group structure (and hence exactness) intact.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from .init_context import RouterInitContext
from .io import TOKENIZER_FILES

logger = logging.getLogger(__name__)

COLLINEAR_COSINE = 0.95  # rows more aligned than this barely separate their experts
DEFAULT_LOGIT_SCALE = 4.0
_EXPERT_KEYS = {"name", "positive_prompts", "negative_prompts"}
_TOP_KEYS = {"experts", "logit_scale"}


class PromptsFileNotFoundError(FileNotFoundError, ValueError):
    """The prompts file does not exist (both a FileNotFoundError and a ValueError: it is bad input)."""


@dataclass(frozen=True)
class ExpertPrompts:
    """The prompts of one expert (or one virtual group)."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()
    name: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """A validated prompts file.

    Attributes:
        experts: one entry per expert (or per virtual group), in expert order.
        logit_scale: logit of a token whose hidden state points along a row (see the module docstring).
        source: where the prompts came from (file path or "<python object>"), for messages.
    """

    experts: tuple[ExpertPrompts, ...]
    logit_scale: float = DEFAULT_LOGIT_SCALE
    source: str = "<python object>"


def _text_list(value: Any, *, where: str, field: str, required: bool) -> tuple[str, ...]:
    if value is None:
        if required:
            raise ValueError(f"{where}: `{field}` is missing; give a non-empty list of prompt strings")
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ValueError(f"{where}: `{field}` must be a list of strings, got {type(value).__name__}")
    texts = []
    for i, text in enumerate(value):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: `{field}`[{i}] is {text!r}; every prompt must be a non-empty string")
        texts.append(text)
    if required and not texts:
        raise ValueError(f"{where}: `{field}` is empty; give at least one prompt")
    return tuple(texts)


def load_prompts(prompts: str | os.PathLike | dict | list | PromptSpec) -> PromptSpec:
    """Read and validate router prompts.

    Args:
        prompts: a YAML file path, or the parsed object: ``{"experts": [...], "logit_scale": 4.0}`` or just
        the
            list of expert entries. Each entry: ``positive_prompts`` (required, non-empty list of strings; a
            single string is accepted), ``negative_prompts`` (optional), ``name`` (optional).

    Returns:
        The validated :class:`PromptSpec`.

    Raises:
        PromptsFileNotFoundError: the file does not exist (a FileNotFoundError and a ValueError).
        ValueError: unreadable YAML, a wrong structure, unknown keys, or empty prompts, naming the entry.
    """
    if isinstance(prompts, PromptSpec):
        return prompts
    source = "<python object>"
    if isinstance(prompts, str | os.PathLike):
        path = Path(prompts)
        source = str(path)
        if not path.is_file():
            raise PromptsFileNotFoundError(
                f"prompts file {path} does not exist; pass a YAML file listing each "
                "expert's positive_prompts (see docs/merge.md)"
            )
        try:
            prompts = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"prompts file {path} is not valid YAML: {err}") from err
    if isinstance(prompts, list | tuple):
        prompts = {"experts": list(prompts)}
    if not isinstance(prompts, dict) or "experts" not in prompts:
        raise ValueError(
            f"prompts ({source}) must be a mapping with an `experts` list (one entry per expert), got "
            f"{type(prompts).__name__}"
        )
    unknown = set(prompts) - _TOP_KEYS
    if unknown:
        raise ValueError(
            f"prompts ({source}): unknown top-level keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}"
        )
    entries = prompts["experts"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"prompts ({source}): `experts` must be a non-empty list, one entry per expert")
    logit_scale = prompts.get("logit_scale", DEFAULT_LOGIT_SCALE)
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, int | float) or logit_scale <= 0:
        raise ValueError(f"prompts ({source}): logit_scale={logit_scale!r} must be a positive number")
    experts = []
    for i, entry in enumerate(entries):
        where = f"prompts ({source}), expert {i}"
        if isinstance(entry, str | list):  # shorthand: the positive prompts only
            entry = {"positive_prompts": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping with positive_prompts, got {type(entry).__name__}")
        unknown = set(entry) - _EXPERT_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_EXPERT_KEYS)}")
        name = entry.get("name")
        experts.append(
            ExpertPrompts(
                positive=_text_list(
                    entry.get("positive_prompts"), where=where, field="positive_prompts", required=True
                ),
                negative=_text_list(
                    entry.get("negative_prompts"), where=where, field="negative_prompts", required=False
                ),
                name=None if name is None else str(name),
            )
        )
    return PromptSpec(experts=tuple(experts), logit_scale=float(logit_scale), source=source)


def _load_dense(model_dir: Path) -> tuple[torch.nn.Module, Any]:
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES if name != "generation_config.json"):
        raise ValueError(
            f"router_init='prompts' needs the tokenizer of {model_dir} to encode the prompts, but the "
            "folder has no tokenizer files (tokenizer.json / tokenizer_config.json); copy them there"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def _decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise ValueError(
            f"{type(model).__name__} has no `model.layers[i].mlp`; router_init='prompts' needs a "
            "Llama-style decoder"
        )
    return layers


@torch.no_grad()
def prompt_hidden_means(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, layers: Sequence[int]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Mean MLP-input hidden state of each text, per layer, over its non-special tokens.

    Args:
        model: a transformers causal LM with ``model.layers[i].mlp`` (dense or hf_moe).
        tokenizer: its tokenizer.
        texts: the prompts; each is run alone (no padding).
        layers: decoder layer indices.

    Returns:
        ``{layer: (N, H) means}`` and ``{layer: (N,) sum of squared token norms / token count}`` per text.

    Raises:
        ValueError: a text that encodes to special tokens only.
    """
    decoder_layers = _decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def hook(layer_idx: int) -> Callable:
        def grab(module: torch.nn.Module, args: tuple) -> None:
            captured[layer_idx] = args[0].detach().float()  # (1, S, H): the post_attention_layernorm output

        return grab

    handles = [decoder_layers[i].mlp.register_forward_pre_hook(hook(i)) for i in layers]
    means: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    sq_norms: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    try:
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            # Special tokens (BOS added by the tokenizer, or written in the text) are left out of the means.
            special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=enc["input_ids"].dtype)
            keep = ~torch.isin(enc["input_ids"][0], special)  # (S,)
            if not keep.any():
                raise ValueError(
                    f"prompt {text!r} encodes to special tokens only; give a prompt with some text"
                )
            captured.clear()
            model(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"))
            for i in layers:
                tokens = captured[i][0, keep]  # (S', H)
                means[i].append(tokens.mean(dim=0))
                sq_norms[i].append(tokens.pow(2).sum(dim=-1).mean())
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.stack(means[i]) for i in layers}, {i: torch.stack(sq_norms[i]) for i in layers}


def router_rows_from_prompts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: str | os.PathLike | dict | list | PromptSpec,
    *,
    num_experts: int,
    layers: Sequence[int],
    granularity: int = 1,
) -> dict[int, torch.Tensor]:
    """Router weights of every MoE layer from the prompts (see the module docstring for the formula).

    Args:
        model: the dense model whose hidden states the router will read (float32, eval).
        tokenizer: its tokenizer.
        prompts: prompt file or object (see :func:`load_prompts`).
        num_experts: E.
        layers: the MoE layer indices.
        granularity: with g > 1 the prompts may list ``E / g`` virtual groups instead of ``E`` experts.

    Returns:
        ``{layer: (E, H) float32 router weight}``.

    Raises:
        ValueError: bad prompts, a count that fits neither E nor E/g, or an expert whose positive and negative
            prompts give the same mean.
    """
    spec = load_prompts(prompts)
    count = len(spec.experts)
    if count == num_experts:
        repeat = 1
    elif granularity > 1 and count * granularity == num_experts:
        repeat = granularity
    else:
        allowed = f"{num_experts}" + (
            f" (or {num_experts // granularity} virtual groups)" if granularity > 1 else ""
        )
        raise ValueError(
            f"prompts ({spec.source}) list {count} experts but the model has {allowed}; give one "
            "entry per expert, in expert order"
        )
    texts: list[str] = []
    spans: list[tuple[slice, slice]] = []  # per entry: positive and negative rows in `texts`
    for entry in spec.experts:
        start = len(texts)
        texts.extend(entry.positive)
        mid = len(texts)
        texts.extend(entry.negative)
        spans.append((slice(start, mid), slice(mid, len(texts))))
    means, sq_norms = prompt_hidden_means(model, tokenizer, texts, layers=layers)
    label = [entry.name or str(e) for e, entry in enumerate(spec.experts)]
    rows: dict[int, torch.Tensor] = {}
    for i in layers:
        directions = []
        for e, (pos, neg) in enumerate(spans):
            d = means[i][pos].mean(dim=0)  # (H,)
            if neg.stop > neg.start:
                d = d - means[i][neg].mean(dim=0)
            if d.norm() <= 1e-8 * max(means[i][pos].norm(dim=-1).max().item(), 1e-30):
                raise ValueError(
                    f"prompts ({spec.source}), expert {label[e]}: the positive and negative prompts give "
                    f"the same mean hidden state at layer {i}; use prompts that differ"
                )
            directions.append(d / d.norm())
        unit = torch.stack(directions)  # (count, H)
        cos = unit @ unit.T  # (count, count)
        pairs = [(a, b) for a in range(count) for b in range(a + 1, count) if cos[a, b] > COLLINEAR_COSINE]
        if pairs:
            listed = ", ".join(f"experts {label[a]} and {label[b]} (cos {cos[a, b]:.3f})" for a, b in pairs)
            warnings.warn(
                f"router_init='prompts': layer {i}: nearly collinear router rows "
                f"(cosine > {COLLINEAR_COSINE}): {listed}; their prompts barely separate these experts. "
                "Use more distinct prompts or add "
                "negative_prompts.",
                stacklevel=2,
            )
        rms_norm = sq_norms[i].mean().sqrt()  # typical token hidden-state norm at this layer
        rows[i] = (unit * (spec.logit_scale / rms_norm)).repeat_interleave(repeat, dim=0)  # (E, H)
    return rows


def router_rows_from_dir(
    model_dir: str | os.PathLike,
    prompts: str | os.PathLike | dict | list | PromptSpec,
    *,
    num_experts: int,
    layers: Sequence[int],
    granularity: int = 1,
) -> dict[int, torch.Tensor]:
    """:func:`router_rows_from_prompts` on the model and tokenizer of a folder. The whole model is loaded in
    memory (float32) for the forward passes and freed afterwards.

    Raises:
        ValueError: bad prompts (checked before the model is loaded) or a folder without a tokenizer.
    """
    spec = load_prompts(prompts)  # fail on a bad file before paying for the model load
    model, tokenizer = _load_dense(Path(model_dir))
    try:
        return router_rows_from_prompts(
            model, tokenizer, spec, num_experts=num_experts, layers=layers, granularity=granularity
        )
    finally:
        del model


def prompts_router(context: RouterInitContext) -> Callable[[int], torch.Tensor]:
    """``ROUTER_INITS["prompts"]``: router rows from the dense model in ``context.src_dir`` run on
    ``context.prompts``. The prompts are validated here; the model runs once, on the first layer requested."""
    if context.prompts is None:
        raise ValueError(
            "router_init='prompts' needs prompts: pass prompts=<YAML file or object> (CLI: --prompts "
            "prompts.yaml) listing each expert's positive_prompts; see docs/merge.md"
        )
    if context.src_dir is None:
        raise ValueError("router_init='prompts' needs the dense model folder (RouterInitContext.src_dir)")
    spec = load_prompts(context.prompts)
    count = len(spec.experts)
    if count != context.num_experts and count * context.granularity != context.num_experts:
        # Same check as in router_rows_from_prompts, but before any output is written or any model is loaded.
        raise ValueError(
            f"prompts ({spec.source}) list {count} experts but the model has {context.num_experts}"
            + (
                f" (or {context.num_experts // context.granularity} virtual groups)"
                if context.granularity > 1
                else ""
            )
            + "; give one entry per expert, in expert order"
        )
    cache: dict[int, torch.Tensor] = {}

    def init(layer_idx: int) -> torch.Tensor:
        if not cache:
            cache.update(
                router_rows_from_dir(
                    context.src_dir,
                    spec,
                    num_experts=context.num_experts,
                    layers=list(context.moe_layers),
                    granularity=context.granularity,
                )
            )
        if layer_idx not in cache:
            raise ValueError(
                f"router_init='prompts' was asked for layer {layer_idx}, which is not among the MoE "
                f"layers {sorted(cache)}"
            )
        return cache[layer_idx]

    return init


# ================================================================================================================
# mergekit's gate_mode cheap_embed: router rows from token embeddings alone
# ================================================================================================================


def _embedding_direction(embed: torch.Tensor, tokenizer: Any, texts: tuple[str, ...]) -> torch.Tensor:
    """Unit vector of the summed input embeddings of the texts' non-special tokens. embed: (V, H) -> (H,)."""
    special = set(tokenizer.all_special_ids)
    ids = [t for text in texts for t in tokenizer(text)["input_ids"] if t not in special]
    if not ids:
        raise ValueError(
            f"prompts {list(texts)!r} encode to special tokens only; give prompts with some text"
        )
    total = embed[torch.tensor(ids)].float().sum(dim=0)  # (H,)
    return total / total.norm().clamp_min(1e-8)


def cheap_embed_router(context: RouterInitContext) -> Callable[[int], torch.Tensor]:
    """``ROUTER_INITS["cheap_embed"]`` (mergekit's cheap_embed gate mode): expert ``e``'s row is the unit vector
    of its positive prompts' summed token embeddings, minus that of its negative prompts, renormalised; the same
    rows in every layer. Reads the base's embedding matrix and tokenizer only: no forward pass."""

    if context.prompts is None:
        raise ValueError("router_init='cheap_embed' needs prompts: one positive_prompts entry per expert")
    spec = load_prompts(context.prompts)
    if len(spec.experts) != context.num_experts:
        raise ValueError(
            f"prompts ({spec.source}) list {len(spec.experts)} experts but the model has {context.num_experts}"
        )
    src = Path(context.src_dir)
    if not any((src / name).is_file() for name in TOKENIZER_FILES if name != "generation_config.json"):
        raise ValueError(
            f"router_init='cheap_embed' needs the tokenizer of {src} to encode the prompts; copy it there"
        )
    names = [n for n in context.reader.keys() if n.endswith("embed_tokens.weight")]
    if len(names) != 1:
        raise ValueError(
            f"router_init='cheap_embed' needs one *embed_tokens.weight tensor in {src}, found {names}"
        )
    tokenizer = AutoTokenizer.from_pretrained(src)
    embed = context.reader.get_tensor(names[0])  # (V, H)
    rows = []
    for e, entry in enumerate(spec.experts):
        row = _embedding_direction(embed, tokenizer, entry.positive)
        if entry.negative:
            row = row - _embedding_direction(embed, tokenizer, entry.negative)
            if row.norm() < 1e-6:
                raise ValueError(
                    f"prompts ({spec.source}), expert {entry.name or e}: the positive and negative prompts have "
                    "the same embedding direction; use prompts that differ"
                )
        rows.append(row / row.norm().clamp_min(1e-8))
    router = torch.stack(rows)  # (E, H)
    del embed

    def init(layer_idx: int) -> torch.Tensor:
        return router.clone()

    return init


__all__ = [
    "COLLINEAR_COSINE",
    "DEFAULT_LOGIT_SCALE",
    "ExpertPrompts",
    "PromptSpec",
    "PromptsFileNotFoundError",
    "cheap_embed_router",
    "load_prompts",
    "prompt_hidden_means",
    "prompts_router",
    "router_rows_from_dir",
    "router_rows_from_prompts",
]
