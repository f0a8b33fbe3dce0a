"""Compress an MoE checkpoint by pruning or merging experts, with calibration and optional router recovery.

Works on hf_moe checkpoints and on native MoE checkpoints that transformers loads with its own class (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4.5-MoE, DeepSeek-V3, ...): the output keeps the input's format.

1. **Calibration** (forward only, `torch.no_grad`): the model runs over the calibration text in windows; a
   forward-pre-hook on each MoE layer's experts module receives `(hidden_states, top_k_index, top_k_weights)`,
   the call signature shared by hf_moe and transformers 5's MoE models, and accumulates per-expert sums. Nothing
   is kept across batches except those sums (`E` numbers, plus an `(E, H)` output sum when merging), so memory
   is the model plus one batch of activations.
2. **Saliency** per expert j of each layer:
   - `reap` (REAP, arXiv 2510.13999, eq. 9): S_j = mean over the tokens routed to j of g_j(x) * ||f_j(x)||_2,
     g_j the routing weight the model gives expert j (after renormalisation / scaling), f_j the expert's output;
   - `frequency`: the number of (token, slot) assignments routed to j;
   - `random`: a seeded random permutation (the baseline; needs no calibration).
3. **Plan**: the same number of experts is kept in every MoE layer (native formats and vLLM need one expert count).
   Pruning keeps the most salient; with group-limited routing (`n_group > 1`, DeepSeek-V3 / GLM-4.5) the same
   number is kept in every group, so group membership, and thus the router's group selection, is preserved.
   Merging (`merge=True`, HC-SMoE, arXiv 2410.08589) clusters experts by average-linkage hierarchical
   clustering on the cosine distance of their mean outputs over the calibration tokens (every expert evaluated
   on every token), then averages each cluster's weights with the members' saliencies as weights (`frequency`:
   HC-SMoE's frequency weighting). The router row of a merged expert is the same weighted average of its
   members' rows: the merged expert is that average of its members, so its logit is the same average of theirs,
   on every token (a linear router). Tokens that strongly preferred one member score it lower than before; router
   recovery is what corrects that.
4. **Writing**: the checkpoint is streamed tensor by tensor (`io.CheckpointReader` / `io.ShardWriter`) into an
   atomic output folder. Per-layer expert tensors are recognised by name, for both the fused layout
   (`...experts.gate_up_proj [E, 2I, H]`, `...experts.down_proj [E, H, I]`) and the per-expert layout of Hub
   checkpoints (`...experts.{e}.w1.weight`, `...experts.{e}.gate_proj.weight`, ...); the router tensors are
   `<moe>.gate.weight` and any `<moe>.gate.*` with E rows (`e_score_correction_bias`, `noise_weight`). Every
   other tensor is copied. config.json keeps its format with the expert count and top-k updated.
5. **Router recovery** (`recover_router=N`): the compressed model (loaded in its own class) is trained for N
   AdamW steps on the calibration windows, only its router weights trainable, to minimise KL(teacher || student)
   of the next-token distributions, the teacher being the original model.

Example:
```python
>>> import hf_moe
>>> hf_moe.compress("qwen3-moe/", "qwen3-moe-75/", keep=0.75, method="reap", calib="calib.txt")
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import register
from .conversion.core import finish_checkpoint, source_history, write_config_json, write_hf_moe_card
from .conversion.io import PROVENANCE_NAME, CheckpointReader, ShardWriter, atomic_output_dir

logger = logging.getLogger(__name__)

METHODS = ("reap", "frequency", "random")
# config.json keys that hold the number of routed experts, by family (all present ones are updated).
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_KEY = "num_experts_per_tok"
# Tokens per batch on which every expert is evaluated for merging (a strided subsample beyond).
MERGE_TOKENS_PER_BATCH = 512

# Per-layer tensor names. `moe` is the module holding router and experts (`model.layers.3.mlp`,
# `model.layers.3.block_sparse_moe`).
_PER_EXPERT_RE = re.compile(
    r"^(?P<moe>model\.layers\.(?P<layer>\d+)\.(?:.+\.)?[^.]+)\.experts\.(?P<e>\d+)\.(?P<rest>.+)$"
)
_FUSED_RE = re.compile(r"^(?P<moe>model\.layers\.(?P<layer>\d+)\.(?:.+\.)?[^.]+)\.experts\.(?P<rest>[^.]+)$")
_ROUTER_RE = re.compile(r"^(?P<moe>model\.layers\.(?P<layer>\d+)\.(?:.+\.)?[^.]+)\.gate\.(?P<rest>[^.]+)$")
_LAYER_MODULE_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ================================================================================================================
# Calibration.
# ================================================================================================================


@dataclass
class LayerStatistics:
    """Per-expert sums over the calibration tokens of one MoE layer."""

    count: torch.Tensor  # (E,) float64: (token, slot) assignments routed to each expert
    gate_sum: torch.Tensor  # (E,) float64: sum of routing weights g_j(x) over those assignments
    reap_sum: torch.Tensor  # (E,) float64: sum of g_j(x) * ||f_j(x)||_2 over those assignments
    output_sum: torch.Tensor | None = None  # (E, H) float64: sum of f_j(x) over every sampled token (merging)
    output_tokens: int = 0  # tokens summed in output_sum

    @classmethod
    def empty(cls, num_experts: int, hidden: int | None) -> LayerStatistics:
        z = torch.zeros(num_experts, dtype=torch.float64)
        out = torch.zeros(num_experts, hidden, dtype=torch.float64) if hidden else None
        return cls(count=z.clone(), gate_sum=z.clone(), reap_sum=z.clone(), output_sum=out)

    def reap(self) -> torch.Tensor:
        """REAP saliency (E,): mean of g * ||f|| over the routed tokens; 0 for an expert never routed to."""
        return torch.where(
            self.count > 0, self.reap_sum / self.count.clamp_min(1), torch.zeros_like(self.count)
        )

    def mean_outputs(self) -> torch.Tensor:
        if self.output_sum is None or self.output_tokens == 0:
            raise ValueError("no expert outputs were collected; calibrate with need_outputs=True to merge")
        return self.output_sum / self.output_tokens  # (E, H)


@dataclass
class CalibrationStatistics:
    """What calibration measured, per MoE layer (keyed by decoder-layer index)."""

    layers: dict[int, LayerStatistics]
    num_experts: int
    tokens: int  # calibration tokens run through the model
    text_sha256: str  # sha256 of the calibration text (texts joined by "\n\n", utf-8)
    token_sha256: str  # sha256 of the token ids used (int64 little-endian)
    source: str = ""  # resolved path of the calibrated checkpoint
    extra: dict[str, Any] = field(default_factory=dict)

    def saliency(self, method: str, layer: int, *, seed: int = 0) -> torch.Tensor:
        """(E,) scores; the experts with the largest are kept."""
        if method == "random":
            return random_saliency(self.num_experts, layer, seed=seed)
        stats = self.layers[layer]
        if method == "reap":
            return stats.reap()
        if method == "frequency":
            return stats.count.clone()
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def random_saliency(num_experts: int, layer: int, *, seed: int = 0) -> torch.Tensor:
    """(E,) a seeded random permutation, different in every layer: the baseline."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randperm(num_experts, generator=gen).double()


def _load_texts(calib: str | os.PathLike | Sequence[str]) -> list[str]:
    if isinstance(calib, str | os.PathLike):
        path = Path(calib)
        if not path.is_file():
            raise FileNotFoundError(
                f"calibration file {path} not found; pass a UTF-8 text file, or a list of strings in Python"
            )
        return [path.read_text(encoding="utf-8")]
    texts = list(calib)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("calib must be a text file path or a non-empty list of strings")
    return texts


def calibration_windows(
    tokenizer: Any, texts: Sequence[str], *, calib_tokens: int, seq_len: int
) -> tuple[torch.Tensor, str, str]:
    """The first `calib_tokens` tokens of the texts (each tokenized, joined), cut into (N, seq_len) windows.
    Returns (windows, text sha256, token sha256)."""
    text_hash = hashlib.sha256("\n\n".join(texts).encode("utf-8")).hexdigest()
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= calib_tokens:
            break
    ids = ids[:calib_tokens]
    if len(ids) < seq_len:
        if len(ids) < 2:
            raise ValueError("the calibration text has fewer than 2 tokens; give more text")
        seq_len = len(ids)
    n = len(ids) // seq_len
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, S)
    token_hash = hashlib.sha256(windows.numpy().astype("<i8").tobytes()).hexdigest()
    return windows, text_hash, token_hash


def find_moe_blocks(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder-layer index -> the module holding `.gate` (router with an (E, H) `weight`) and `.experts` (an
    experts module called as `experts(hidden_states, top_k_index, top_k_weights)`)."""
    blocks: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if gate is None or experts is None or not isinstance(getattr(gate, "weight", None), torch.Tensor):
            continue
        if not isinstance(experts, torch.nn.Module) or isinstance(experts, torch.nn.ModuleList):
            continue  # per-expert ModuleList (pre-5 transformers layouts): not the fused call signature
        match = _LAYER_MODULE_RE.search(name + ".")
        if match:
            blocks[int(match.group(1))] = module
    return blocks


def _experts_call_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args) :]]
    return values[0], values[1], values[2]


class _Collector:
    """Forward-pre-hooks on every MoE layer's experts module that accumulate `LayerStatistics`."""

    def __init__(self, blocks: dict[int, torch.nn.Module], num_experts: int, need_outputs: bool):
        self.blocks = blocks
        self.num_experts = num_experts
        self.need_outputs = need_outputs
        self.stats: dict[int, LayerStatistics] = {}
        self._busy = False
        self._handles: list[Any] = []

    def __enter__(self) -> _Collector:
        for layer, block in self.blocks.items():
            hidden = block.gate.weight.shape[1] if self.need_outputs else None
            self.stats[layer] = LayerStatistics.empty(self.num_experts, hidden)
            self._handles.append(
                block.experts.register_forward_pre_hook(self._hook(layer, block.experts), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, layer: int, experts: torch.nn.Module):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self._busy:  # our own calls to the experts below
                return
            self._busy = True
            try:
                self._update(self.stats[layer], experts, *_experts_call_args(args, kwargs))
            finally:
                self._busy = False

        return hook

    @torch.no_grad()
    def _update(
        self,
        stats: LayerStatistics,
        experts: torch.nn.Module,
        hidden: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        num_tokens, top_k = index.shape  # hidden: (T, H); index, weights: (T, K)
        num_experts = self.num_experts
        ones = torch.ones(num_tokens, 1, dtype=weights.dtype, device=weights.device)
        for k in range(top_k):
            # The experts module's own code with one slot per token and weight 1: the unweighted output of the
            # expert in slot k, for every token at once (sentinel slots, index == E, come back as zeros).
            slot = index[:, k : k + 1]  # (T, 1)
            outputs = experts(hidden, slot, ones)  # (T, H)
            valid = slot[:, 0] < num_experts
            chosen = slot[valid, 0].cpu()
            gate = weights[valid, k].double().cpu()
            norms = outputs[valid].double().norm(dim=-1).cpu()
            stats.count.index_add_(0, chosen, torch.ones_like(gate))
            stats.gate_sum.index_add_(0, chosen, gate)
            stats.reap_sum.index_add_(0, chosen, gate * norms)
        if stats.output_sum is not None:
            stride = max(1, math.ceil(num_tokens / MERGE_TOKENS_PER_BATCH))
            sample = hidden[::stride]  # (T', H)
            ones = ones[: len(sample)]
            for e in range(num_experts):
                slot = torch.full((len(sample), 1), e, dtype=index.dtype, device=index.device)
                stats.output_sum[e] += experts(sample, slot, ones).double().sum(dim=0).cpu()
            stats.output_tokens += len(sample)


def _num_experts(config: dict) -> int:
    found = {key: config[key] for key in EXPERT_COUNT_KEYS if isinstance(config.get(key), int)}
    if not found:
        raise ValueError(
            f"config.json has none of {EXPERT_COUNT_KEYS}; is model_type={config.get('model_type')!r} an MoE model?"
        )
    if len(set(found.values())) > 1:
        raise ValueError(f"config.json disagrees with itself on the number of experts: {found}")
    return next(iter(found.values()))


def _load_model(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    register()  # model_type "hf_moe" with the Auto classes (idempotent)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _tokenizer(model_dir: Path, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{model_dir} has no tokenizer files ({err.__class__.__name__}); calibration text needs the model's "
            "tokenizer: add tokenizer.json to the folder or pass tokenizer= in Python"
        ) from err


def calibrate(
    model: str | os.PathLike | torch.nn.Module,
    calib: str | os.PathLike | Sequence[str],
    *,
    calib_tokens: int = 65536,
    seq_len: int = 512,
    batch_size: int = 4,
    need_outputs: bool = False,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> CalibrationStatistics:
    """Run the calibration text through an MoE model (forward only) and collect per-expert statistics.

    Args:
        model: a checkpoint folder (hf_moe or native MoE), or a loaded model (then pass `tokenizer`).
        calib: a UTF-8 text file, or a list of texts.
        calib_tokens: at most this many tokens are used.
        seq_len: window length (capped by the model's context length).
        batch_size: windows per forward.
        need_outputs: also sum every expert's output over (a subsample of) all tokens, which merging needs.
        tokenizer: the tokenizer, when `model` is a loaded model or its folder lacks one.
        dtype: dtype in which a folder is loaded for calibration.
        progress: show a progress bar.

    Returns:
        A `CalibrationStatistics`, reusable by several `compress(..., statistics=...)` calls.
    """
    model_dir = None
    if isinstance(model, str | os.PathLike):
        model_dir = Path(model)
        net = _load_model(model_dir, dtype)
    else:
        net = model.eval()
    tok = _tokenizer(model_dir, tokenizer) if model_dir is not None else tokenizer
    if tok is None:
        raise ValueError("pass tokenizer= when calibrating a loaded model")
    config = net.config.to_dict()
    num_experts = _num_experts(config)
    text_config = net.config.get_text_config()
    seq_len = min(seq_len, getattr(text_config, "max_position_embeddings", seq_len) or seq_len)
    texts = _load_texts(calib)
    windows, text_hash, token_hash = calibration_windows(
        tok, texts, calib_tokens=calib_tokens, seq_len=seq_len
    )
    blocks = find_moe_blocks(net)
    if not blocks:
        raise ValueError(
            f"no MoE layers found in {type(net).__name__}: expected modules with a `.gate` router and an "
            "`.experts` module called as experts(hidden_states, top_k_index, top_k_weights)"
        )
    device = next(net.parameters()).device
    with _Collector(blocks, num_experts, need_outputs) as collector, torch.no_grad():
        for i in tqdm(
            range(0, len(windows), batch_size), desc="calibration", unit="batch", disable=not progress
        ):
            net(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
    return CalibrationStatistics(
        layers=collector.stats,
        num_experts=num_experts,
        tokens=windows.numel(),
        text_sha256=text_hash,
        token_sha256=token_hash,
        source=str(model_dir.resolve()) if model_dir else "",
        extra={"seq_len": windows.shape[1], "windows": windows.shape[0]},
    )


# ================================================================================================================
# Plans: which old experts make each new expert.
# ================================================================================================================


@dataclass(frozen=True)
class LayerPlan:
    """New expert j = sum_m weights[j][m] * old expert groups[j][m] (pruning: one member of weight 1)."""

    groups: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]

    def describe(self, num_experts: int) -> dict[str, Any]:
        kept = sorted(m for g in self.groups for m in g)
        merged = {str(j): list(g) for j, g in enumerate(self.groups) if len(g) > 1}
        return {
            "new_to_old": [list(g) for g in self.groups],
            "removed": [e for e in range(num_experts) if e not in kept],
            "merged": merged,
        }


def _group_ranges(num_experts: int, n_group: int) -> list[list[int]]:
    size = num_experts // n_group
    return [list(range(g * size, (g + 1) * size)) for g in range(n_group)]


def prune_plan(saliency: torch.Tensor, keep_per_group: int, n_group: int = 1) -> LayerPlan:
    """Keep the `keep_per_group` most salient experts of each routing group (ties: lower index), in index order."""
    kept: list[int] = []
    for members in _group_ranges(len(saliency), n_group):
        scores = saliency[members]
        # Stable descending order: argsort of -score is stable on ties, so lower indices win them.
        order = torch.argsort(-scores, stable=True)[:keep_per_group]
        kept.extend(sorted(members[i] for i in order.tolist()))
    return LayerPlan(groups=tuple((e,) for e in kept), weights=tuple((1.0,) for _ in kept))


def cluster_experts(features: torch.Tensor, num_clusters: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of the rows of `features` (n, d) by cosine distance, down to
    `num_clusters` clusters; each cluster sorted, clusters ordered by their smallest member."""
    n = features.shape[0]
    unit = F.normalize(features.double(), dim=-1)
    dist = 1.0 - unit @ unit.T  # (n, n)
    clusters: list[list[int]] = [[i] for i in range(n)]
    d = dist.clone()
    d.fill_diagonal_(float("inf"))
    active = list(range(n))
    while len(active) > num_clusters:
        sub = d[active][:, active]
        flat = int(torch.argmin(sub))
        a, b = active[flat // len(active)], active[flat % len(active)]
        a, b = min(a, b), max(a, b)
        size_a, size_b = len(clusters[a]), len(clusters[b])
        # Lance-Williams update for average linkage.
        d[a] = (size_a * d[a] + size_b * d[b]) / (size_a + size_b)
        d[:, a] = d[a]
        d[a, a] = float("inf")
        clusters[a] = sorted(clusters[a] + clusters[b])
        active.remove(b)
    return sorted((clusters[i] for i in active), key=lambda c: c[0])


def merge_plan(
    mean_outputs: torch.Tensor, saliency: torch.Tensor, keep_per_group: int, n_group: int = 1
) -> LayerPlan:
    """Cluster each routing group's experts into `keep_per_group` clusters by output similarity; weights are the
    members' saliencies normalised within the cluster (uniform if all are zero)."""
    groups, weights = [], []
    for members in _group_ranges(len(saliency), n_group):
        for cluster in cluster_experts(mean_outputs[members], keep_per_group):
            old = [members[i] for i in cluster]
            w = saliency[old].double().clamp_min(0)
            w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(old))
            groups.append(tuple(old))
            weights.append(tuple(float(x) for x in w))
    return LayerPlan(groups=tuple(groups), weights=tuple(weights))


def _combine(plan: LayerPlan, get: Any) -> list[torch.Tensor]:
    """New per-expert tensors: a copy of the kept expert's (exact), or the weighted average in float32."""
    out = []
    for members, w in zip(plan.groups, plan.weights, strict=True):
        if len(members) == 1:
            out.append(get(members[0]))
            continue
        first = get(members[0])
        total = first.float() * w[0]
        for m, wm in zip(members[1:], w[1:], strict=True):
            total += get(m).float() * wm
        out.append(total.to(first.dtype))
    return out


# ================================================================================================================
# Writing.
# ================================================================================================================


def _classify(
    reader: CheckpointReader, num_experts: int
) -> tuple[dict[str, tuple[str, int]], dict[int, str]]:
    """name -> (kind, layer) for the per-layer expert and router tensors; layer -> moe module prefix.
    Kinds: "per_expert", "fused" (first dim E), "router" (first dim E)."""
    kinds: dict[str, tuple[str, int]] = {}
    moe_prefix: dict[int, str] = {}
    for name in reader.keys():
        match = _PER_EXPERT_RE.match(name)
        if match:
            kinds[name] = ("per_expert", int(match["layer"]))
            moe_prefix[int(match["layer"])] = match["moe"]
            continue
        match = _FUSED_RE.match(name)
        if match and reader.shape(name) and reader.shape(name)[0] == num_experts:
            kinds[name] = ("fused", int(match["layer"]))
            moe_prefix[int(match["layer"])] = match["moe"]
    for name in reader.keys():
        match = _ROUTER_RE.match(name)
        if match and moe_prefix.get(int(match["layer"])) == match["moe"]:
            shape = reader.shape(name)
            if shape and shape[0] == num_experts:
                kinds[name] = ("router", int(match["layer"]))
    for layer, moe in moe_prefix.items():
        if f"{moe}.gate.weight" not in kinds:
            raise ValueError(
                f"{reader.root}: layer {layer} has experts under {moe}.experts but no router {moe}.gate.weight "
                f"with {num_experts} rows; the checkpoint does not match config.json"
            )
    return kinds, moe_prefix


def _check_out_dir(src: Path, out: Path, overwrite: bool) -> None:
    s, o = src.resolve(), out.resolve()
    if s == o or o.is_relative_to(s) or s.is_relative_to(o):
        raise ValueError(
            f"output folder {out} overlaps the input {src}; inputs are never modified: choose a folder outside it"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {out} already exists; choose another path or pass overwrite=True"
        )


_SKIP_COPY = {"config.json", "model.safetensors.index.json", PROVENANCE_NAME, "README.md"}


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, remote code and any other small files; not weights, config, card."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in _SKIP_COPY and not path.name.endswith(".safetensors"):
            shutil.copyfile(path, dst / path.name)


def _new_config(config: dict, num_new: int, top_k: int) -> dict:
    new = json.loads(json.dumps(config))
    for key in EXPERT_COUNT_KEYS:
        if isinstance(new.get(key), int):
            new[key] = num_new
    new[TOP_K_KEY] = top_k
    return new


def _write_checkpoint(
    reader: CheckpointReader,
    out: Path,
    plan: _Plan,
    *,
    router_override: dict[int, torch.Tensor] | None,
    max_shard_size: int | str,
    progress: bool,
) -> None:
    """Stream `reader` into `out` applying the plan, then its config.json; router weights replaced by
    `router_override[layer]`."""
    plans, kinds, moe_prefix = plan.layers, plan.kinds, plan.moe_prefix
    per_expert: dict[tuple[int, str], dict[int, str]] = {}  # (layer, rest) -> old expert -> name
    for name, (kind, layer) in kinds.items():
        if kind == "per_expert":
            match = _PER_EXPERT_RE.match(name)
            per_expert.setdefault((layer, match["rest"]), {})[int(match["e"])] = name
    done: set[tuple[int, str]] = set()
    with ShardWriter(out, max_shard_size=max_shard_size) as writer:
        for name in tqdm(reader.keys(), desc="writing", unit="tensor", disable=not progress):
            kind, layer = kinds.get(name, (None, -1))
            if kind is None:
                writer.add(name, reader.get_tensor(name))
            elif kind == "per_expert":
                rest = _PER_EXPERT_RE.match(name)["rest"]
                if (layer, rest) in done:
                    continue
                done.add((layer, rest))
                names = per_expert[(layer, rest)]
                for j, tensor in enumerate(_combine(plans[layer], lambda e: reader.get_tensor(names[e]))):
                    writer.add(f"{moe_prefix[layer]}.experts.{j}.{rest}", tensor.contiguous())
            else:  # fused experts or router rows: (E, ...) along dim 0
                full = reader.get_tensor(name)
                if kind == "router" and name.endswith(".gate.weight") and router_override:
                    writer.add(name, router_override[layer].to(full.dtype).contiguous())
                    continue
                parts = _combine(plans[layer], lambda e: full[e])
                writer.add(name, torch.stack(parts).contiguous())
    write_config_json(out, plan.config)


def _parameter_counts(reader: CheckpointReader, kinds: dict, num_experts: int, top_k: int) -> dict[str, int]:
    """Total parameters on disk and active per token (total minus the routed experts a token does not use)."""
    total = sum(math.prod(reader.shape(n)) for n in reader.keys())
    if reader.config.get("tie_word_embeddings") and "lm_head.weight" in reader:
        total -= math.prod(reader.shape("lm_head.weight"))
    experts = sum(math.prod(reader.shape(n)) for n, (k, _) in kinds.items() if k in ("per_expert", "fused"))
    return {"total": total, "active": total - experts * (num_experts - top_k) // num_experts}


def _recover_router(
    teacher: torch.nn.Module,
    student_dir: Path,
    windows: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    progress: bool,
) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
    """Train only the router weights of the model in `student_dir` to match the teacher's next-token
    distributions (KL(teacher || student), mean over tokens). Returns the new router weights per layer."""
    student = _load_model(student_dir, torch.float32)
    blocks = find_moe_blocks(student)
    for param in student.parameters():
        param.requires_grad_(False)
    routers = {layer: block.gate.weight for layer, block in blocks.items()}
    for weight in routers.values():
        weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(routers.values()), lr=lr, weight_decay=0.0)
    device = next(student.parameters()).device
    losses = []
    for step in tqdm(range(steps), desc="router recovery", unit="step", disable=not progress):
        start = (step * batch_size) % len(windows)
        batch = windows[start : start + batch_size].to(device)  # (B, S)
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=batch, use_cache=False).logits.float(), dim=-1)
        logits = student(input_ids=batch, use_cache=False).logits.float()
        log_probs = F.log_softmax(logits, dim=-1)  # (B, S, V)
        loss = F.kl_div(log_probs.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    report = {"kl_first_step": losses[0], "kl_last_step": losses[-1]} if losses else {}
    return {layer: w.detach().cpu() for layer, w in routers.items()}, report


def _write_native_card(out: Path, title: str, provenance: dict) -> None:
    c = provenance["compression"]
    lines = [
        f"# {title}",
        "",
        f"Compressed with `hf-moe compress` from `{provenance['source']['path']}` "
        f"(`model_type: {provenance['source']['model_type']}`); transformers loads it with its own class.",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| routed experts per layer | {c['experts_before']} | {c['experts_after']} |",
        f"| experts per token | {c['top_k_before']} | {c['top_k_after']} |",
        f"| total parameters | {c['params_before']['total']:,} | {c['params_after']['total']:,} |",
        f"| active parameters | {c['params_before']['active']:,} | {c['params_after']['active']:,} |",
        "",
        f"Method: `{c['method']}`{' (merging)' if c['merge'] else ' (pruning)'}; calibration: "
        f"{c['calibration']['tokens']} tokens, text sha256 `{c['calibration']['text_sha256']}`; router recovery: "
        f"{c['recover_router']} steps.",
        "",
        "| layer | removed | merged (new <- old) |",
        "|---|---|---|",
    ]
    for layer, info in c["layers"].items():
        merged = "; ".join(f"{j} <- {m}" for j, m in info["merged"].items()) or "-"
        lines.append(f"| {layer} | {info['removed'] or '-'} | {merged} |")
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def compress(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    keep: float = 0.75,
    method: str = "reap",
    calib: str | os.PathLike | Sequence[str] | None = None,
    calib_tokens: int = 65536,
    recover_router: int = 0,
    merge: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    statistics: CalibrationStatistics | None = None,
    seq_len: int = 512,
    batch_size: int = 4,
    recover_lr: float = 1e-3,
    max_shard_size: int | str = "2GB",
    progress: bool = True,
) -> Path:
    """Prune or merge the routed experts of an MoE checkpoint; the output keeps the input's format.

    Args:
        model: an hf_moe checkpoint or a native MoE checkpoint folder (safetensors + tokenizer).
        out_dir: the folder to create; it must not overlap `model`.
        keep: fraction of routed experts kept in every MoE layer (rounded; with `n_group` routing groups, per
            group). 1.0 keeps all (the output computes exactly what the input does).
        method: saliency: "reap" (router-weighted expert output norm, REAP), "frequency" or "random".
        calib: calibration text file or list of texts (not needed for method="random" without merging or
            router recovery).
        calib_tokens: calibration tokens used (the first ones of the text).
        recover_router: steps of router-only distillation against the original model (0 = none).
        merge: merge experts (cluster by output similarity, saliency-weighted average) instead of pruning.
            method="frequency" is HC-SMoE's frequency-weighted merging; "random" is refused.
        seed: seed of method="random".
        overwrite: replace an existing `out_dir` (only once the new one is complete).
        statistics: calibration statistics of this checkpoint from `calibrate(...)`, reused instead of
            calibrating again (several compressions of one model).
        seq_len: calibration window length in tokens.
        batch_size: calibration / recovery windows per forward.
        recover_lr: AdamW learning rate of router recovery.
        max_shard_size: largest output shard.
        progress: show progress bars.

    Returns:
        `out_dir`. Its `hf_moe_provenance.json` holds, under "compression", the kept / removed / merged experts
        of every layer, the calibration hash and size, and total / active parameters before and after.

    Raises:
        ValueError: bad options, an OUT_DIR overlapping the input, a checkpoint without MoE layers, or
            statistics from another checkpoint.
        FileNotFoundError: missing folder, weights or calibration file.
        FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    src, out = Path(model), Path(out_dir)
    _check_options(method=method, keep=keep, merge=merge, recover_router=recover_router)
    _check_out_dir(src, out, overwrite)
    text = _CalibrationText(calib, calib_tokens, seq_len, batch_size, progress)
    with CheckpointReader(src) as reader:
        plan = _plan_sizes(reader, keep)
        statistics, teacher, tokenizer = _calibration(
            src, plan, text, method=method, merge=merge, statistics=statistics, recover_router=recover_router
        )
        plan.layers = _layer_plans(reader, plan, statistics, method=method, merge=merge, seed=seed)
        record = _compression_record(reader, plan, statistics, method, merge, keep, seed, recover_router)
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            router_override = None
            if recover_router:
                router_override, report = _recover(
                    reader,
                    tmp,
                    plan,
                    text,
                    teacher,
                    tokenizer,
                    steps=recover_router,
                    lr=recover_lr,
                    max_shard_size=max_shard_size,
                )
                record["recovery"] = {"lr": recover_lr, "batch_size": batch_size, **report}
            del teacher
            _write_checkpoint(
                reader,
                tmp,
                plan,
                router_override=router_override,
                max_shard_size=max_shard_size,
                progress=progress,
            )
            _copy_side_files(src, tmp)
            with CheckpointReader(tmp) as written:
                new_kinds, _ = _classify(written, plan.num_new)
                record["params_after"] = _parameter_counts(written, new_kinds, plan.num_new, plan.new_top_k)
            options = {
                "keep": keep,
                "method": method,
                "merge": merge,
                "calib_tokens": calib_tokens,
                "recover_router": recover_router,
                "seed": seed,
                "calib": str(calib) if isinstance(calib, str | os.PathLike) else f"{len(calib or [])} texts",
            }
            finish_checkpoint(
                tmp,
                config=None,  # written with the weights
                source=reader,
                method="compress",
                options=options,
                extra={**source_history(src), **_provenance_entries(record)},
                card=lambda folder: _write_card(folder, reader.config, out.name),
            )
    logger.info("compressed %s to %s: %d -> %d experts per layer", src, out, plan.num_experts, plan.num_new)
    return out


def _check_options(*, method: str, keep: Any, merge: bool, recover_router: int) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(keep, int | float) or not 0 < keep <= 1:
        raise ValueError(f"keep={keep!r} must be a fraction in (0, 1], e.g. 0.75 to keep 75% of the experts")
    if merge and method == "random":
        raise ValueError(
            "merge=True weights each expert by its saliency; use method='frequency' (HC-SMoE) or 'reap'"
        )
    if recover_router < 0:
        raise ValueError(f"recover_router={recover_router} must be a number of steps >= 0")


@dataclass
class _Plan:
    """The shape of the compressed checkpoint, and per MoE layer which old experts make each new one."""

    num_experts: int
    top_k: int
    n_group: int
    keep_per_group: int
    num_new: int
    new_top_k: int
    kinds: dict[str, tuple[str, int]]  # per-layer expert and router tensors (_classify)
    moe_prefix: dict[int, str]  # layer -> module holding router and experts
    config: dict[str, Any]  # the new config.json
    layers: dict[int, LayerPlan] = field(default_factory=dict)


def _plan_sizes(reader: CheckpointReader, keep: float) -> _Plan:
    """Experts and top-k after compression, from config.json; the MoE tensors found by name."""
    config = reader.config
    num_experts = _num_experts(config)
    top_k = int(config.get(TOP_K_KEY) or 0)
    n_group = int(config.get("n_group") or 1)
    if num_experts % n_group:
        raise ValueError(f"config.json: {num_experts} experts do not split into n_group={n_group} groups")
    keep_per_group = max(1, round(keep * (num_experts // n_group)))
    if n_group > 1 and keep_per_group < 2:
        raise ValueError(
            f"keep={keep} leaves {keep_per_group} expert per routing group (n_group={n_group}); group-limited "
            "routing scores each group by its 2 best experts: keep at least 2 per group"
        )
    num_new = keep_per_group * n_group
    new_top_k = min(top_k, num_new) if top_k else top_k
    topk_group = int(config.get("topk_group") or n_group)
    if n_group > 1:
        new_top_k = min(new_top_k, topk_group * keep_per_group)  # only topk_group groups are eligible
    kinds, moe_prefix = _classify(reader, num_experts)
    if not moe_prefix:
        raise ValueError(
            f"{reader.root}: no routed-expert tensors (`...experts...`) found; is this an MoE checkpoint?"
        )
    new_config = _new_config(config, num_new, new_top_k)
    return _Plan(
        num_experts, top_k, n_group, keep_per_group, num_new, new_top_k, kinds, moe_prefix, new_config
    )


@dataclass(frozen=True)
class _CalibrationText:
    """The calibration options of compress."""

    calib: str | os.PathLike | Sequence[str] | None
    calib_tokens: int
    seq_len: int
    batch_size: int
    progress: bool


def _calibration(
    src: Path,
    plan: _Plan,
    text: _CalibrationText,
    *,
    method: str,
    merge: bool,
    statistics: CalibrationStatistics | None,
    recover_router: int,
) -> tuple[CalibrationStatistics | None, torch.nn.Module | None, Any]:
    """(statistics, the loaded original model or None, tokenizer or None): the given statistics checked, or new
    ones measured on the calibration text when the method needs them."""
    needs_calibration = method != "random" or merge
    if (needs_calibration or recover_router) and text.calib is None and statistics is None:
        raise ValueError(
            f"method={method!r}{' with merge' if merge else ''}{' with router recovery' if recover_router else ''} "
            "needs calibration text: pass calib= (CLI: --calib FILE)"
        )
    if recover_router and text.calib is None:
        raise ValueError(
            "recover_router needs the calibration text to distil on: pass calib= (CLI: --calib FILE)"
        )
    teacher = tokenizer = None
    if text.calib is not None and (recover_router or (needs_calibration and statistics is None)):
        tokenizer = _tokenizer(src, None)
    if needs_calibration and statistics is None:
        assert text.calib is not None  # checked above
        teacher = _load_model(src, torch.float32)
        statistics = calibrate(
            teacher,
            text.calib,
            calib_tokens=text.calib_tokens,
            seq_len=text.seq_len,
            batch_size=text.batch_size,
            need_outputs=merge,
            tokenizer=tokenizer,
            progress=text.progress,
        )
        statistics.source = str(src.resolve())
    if statistics is not None:
        if statistics.source and statistics.source != str(src.resolve()):
            raise ValueError(f"statistics were collected on {statistics.source}, not on {src.resolve()}")
        if statistics.num_experts != plan.num_experts:
            raise ValueError(
                f"statistics are for {statistics.num_experts} experts; {src} has {plan.num_experts}"
            )
    return statistics, teacher, tokenizer


def _layer_plans(
    reader: CheckpointReader,
    plan: _Plan,
    statistics: CalibrationStatistics | None,
    *,
    method: str,
    merge: bool,
    seed: int,
) -> dict[int, LayerPlan]:
    """Per MoE layer, the experts kept (pruning) or the clusters averaged (merging)."""
    plans: dict[int, LayerPlan] = {}
    for layer in sorted(plan.moe_prefix):
        if method == "random":
            saliency = random_saliency(plan.num_experts, layer, seed=seed)
        elif statistics is None:
            raise ValueError(f"method={method!r} needs calibration statistics")  # _calibration made them
        elif layer not in statistics.layers:
            # A layer transformers does not run (GLM-4.5's multi-token-prediction layer): no statistics.
            if merge:
                raise ValueError(
                    f"layer {layer} was not run during calibration, so its experts cannot be merged"
                )
            logger.warning(
                "layer %d was not run during calibration; keeping the experts with the largest router rows",
                layer,
            )
            saliency = reader.get_tensor(f"{plan.moe_prefix[layer]}.gate.weight").double().norm(dim=-1)
        else:
            saliency = statistics.saliency(method, layer, seed=seed)
        if merge:
            assert statistics is not None  # merging needs calibration (_calibration)
            mean_outputs = statistics.layers[layer].mean_outputs()
            plans[layer] = merge_plan(mean_outputs, saliency, plan.keep_per_group, plan.n_group)
        else:
            plans[layer] = prune_plan(saliency, plan.keep_per_group, plan.n_group)
    return plans


def _compression_record(
    reader: CheckpointReader,
    plan: _Plan,
    statistics: CalibrationStatistics | None,
    method: str,
    merge: bool,
    keep: float,
    seed: int,
    recover_router: int,
) -> dict[str, Any]:
    """The "compression" entry of the provenance, before the output exists (params_after comes later)."""
    record: dict[str, Any] = {
        "method": method,
        "merge": merge,
        "keep": keep,
        "seed": seed,
        "experts_before": plan.num_experts,
        "experts_after": plan.num_new,
        "top_k_before": plan.top_k,
        "top_k_after": plan.new_top_k,
        "recover_router": recover_router,
        "layers": {
            str(layer): plan.layers[layer].describe(plan.num_experts) for layer in sorted(plan.layers)
        },
        "params_before": _parameter_counts(reader, plan.kinds, plan.num_experts, plan.top_k),
        "calibration": {
            "tokens": statistics.tokens if statistics else 0,
            "text_sha256": statistics.text_sha256 if statistics else None,
            "token_sha256": statistics.token_sha256 if statistics else None,
        },
    }
    if merge:
        record["merge_weights"] = {str(la): [list(w) for w in p.weights] for la, p in plan.layers.items()}
    return record


def _recover(
    reader: CheckpointReader,
    tmp: Path,
    plan: _Plan,
    text: _CalibrationText,
    teacher: torch.nn.Module | None,
    tokenizer: Any,
    *,
    steps: int,
    lr: float,
    max_shard_size: int | str,
) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
    """Router recovery: write the compressed checkpoint to a stage folder inside `tmp`, distil its routers against
    the original model, remove the stage. Returns the new router weights per layer and a report."""
    stage = tmp / "stage1"
    stage.mkdir()
    _write_checkpoint(
        reader, stage, plan, router_override=None, max_shard_size=max_shard_size, progress=False
    )
    _copy_side_files(reader.root, stage)
    if teacher is None:
        teacher = _load_model(reader.root, torch.float32)
    assert text.calib is not None  # recovery needs calibration text (_calibration)
    seq = min(
        text.seq_len, getattr(teacher.config.get_text_config(), "max_position_embeddings", text.seq_len)
    )
    windows, _, _ = calibration_windows(
        tokenizer, _load_texts(text.calib), calib_tokens=text.calib_tokens, seq_len=seq
    )
    result = _recover_router(
        teacher, stage, windows, steps=steps, lr=lr, batch_size=text.batch_size, progress=text.progress
    )
    shutil.rmtree(stage)
    return result


def _provenance_entries(record: dict[str, Any]) -> dict[str, Any]:
    """The top-level provenance entries of a compression: the record, a summary per layer, the totals."""
    summary = [
        f"layer {la}: removed {info['removed']}" + (f", merged {info['merged']}" if info["merged"] else "")
        for la, info in record["layers"].items()
    ]
    return {
        "compression": record,
        "compression_summary": summary,
        "total_params_before": record["params_before"]["total"],
        "active_params_before": record["params_before"]["active"],
        "total_params_after": record["params_after"]["total"],
        "active_params_after": record["params_after"]["active"],
        "calibration_sha256": record["calibration"]["text_sha256"] or "none",
        "calibration_tokens": record["calibration"]["tokens"],
    }


def _write_card(out: Path, config: dict[str, Any], title: str) -> None:
    """hf_moe's model card for an hf_moe checkpoint; a short card of its own for a native one."""
    if config.get("model_type") == "hf_moe":
        write_hf_moe_card(out, title)
    else:
        _write_native_card(out, title, json.loads((out / PROVENANCE_NAME).read_text()))


__all__ = [
    "METHODS",
    "CalibrationStatistics",
    "LayerPlan",
    "LayerStatistics",
    "calibrate",
    "cluster_experts",
    "compress",
    "find_moe_blocks",
    "merge_plan",
    "prune_plan",
]


def compression_table(model_dir: str | os.PathLike) -> str | None:
    """Per layer, which experts a compression removed or merged (from the folder's provenance), as a text table for
    `hf-moe inspect`; None when the folder was not made by `compress`.

    Args:
        model_dir: a checkpoint folder.
    Returns:
        The table, or None.
    """
    path = Path(model_dir) / PROVENANCE_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    c = record.get("compression") if isinstance(record, dict) else None
    if not isinstance(c, dict) or not isinstance(c.get("layers"), dict):
        return None
    kind = "merged" if c.get("merge") else "pruned"
    lines = [
        f"compressed ({kind}, {c.get('method')}): {c.get('experts_before')} -> {c.get('experts_after')} experts per "
        f"layer, top-{c.get('top_k_before')} -> top-{c.get('top_k_after')}",
        f"{'layer':>5}  {'removed':<24} merged (new <- old)",
    ]
    for layer, info in c["layers"].items():
        merged = "; ".join(f"{new} <- {old}" for new, old in (info.get("merged") or {}).items()) or "-"
        removed = ", ".join(str(e) for e in info.get("removed") or []) or "-"
        lines.append(f"{layer:>5}  {removed:<24} {merged}")
    return "\n".join(lines)
