"""The hf-moe model zoo: named presets, each an `HfMoeConfig` + a recipe (how to build it) + a rendered card in
`hf_moe/model_cards/<name>.md`.

Two kinds of recipe:
- `from_scratch`: an architecture in the style of a published MoE family, at a size that trains on one GPU
  (and builds in seconds on a CPU). `create` initialises it at random and saves a loadable checkpoint + card.
- `upcycle`: a real dense base model turned into an MoE (sparse upcycling, Komatsuzaki et al. 2022) with the
  recipe's expert count and top-k. The dense config is written down here (from the base's public
  config.json), so the exact total/active parameter counts are known before any download. `create` runs the
  upcycling when given the dense checkpoint folder, else explains the command.

`hf-moe zoo render-cards` regenerates every `hf_moe/model_cards/<name>.md`; a test keeps them in sync.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .conversion.io import atomic_output_dir, atomic_write, write_provenance
from .conversion.sources import translate_config
from .conversion.upcycle import upcycle
from .hub import ParameterCounts, count_parameters, render_model_card, write_model_card
from .modeling import HfMoeConfig, HfMoeForCausalLM

logger = logging.getLogger(__name__)

# Package data (pyproject.toml), so that `hf-moe zoo show` points at a file every install has.
CARDS_DIR = Path(__file__).resolve().parent / "model_cards"


@dataclass(frozen=True)
class Recipe:
    """How a preset is built.

    Attributes:
        method: "from_scratch" (random init) or "upcycle" (dense base -> MoE).
        options: for from_scratch the HfMoeConfig fields; for upcycle the MoE options applied to the base.
        base_model: Hub id of the dense base (upcycle only).
        dense_config: the base's transformers config.json fields (upcycle only).
        license: Hub license id of the result (the base's license for upcycling).
    """

    method: str
    options: dict[str, Any]
    base_model: str | None = None
    dense_config: dict[str, Any] | None = None
    license: str = "apache-2.0"


@dataclass(frozen=True)
class Preset:
    """A named zoo entry. `expected_total` / `expected_active` are the parameter counts written down by hand
    (checked against `count_parameters` and a meta-device model in the tests)."""

    name: str
    description: str
    recipe: Recipe
    expected_total: int
    expected_active: int
    tags: tuple[str, ...] = field(default_factory=tuple)

    def config(self) -> HfMoeConfig:
        """The HfMoeConfig of the model this preset produces."""
        if self.recipe.method == "upcycle":
            return upcycled_config(self.recipe.dense_config or {}, **self.recipe.options)
        return HfMoeConfig(**self.recipe.options)

    def parameter_counts(self) -> ParameterCounts:
        return count_parameters(self.config())

    def provenance(self) -> dict[str, Any]:
        """The recipe as a provenance record, in the schema `conversion.io.write_provenance` writes (no path,
        versions or checksums: those belong to a built folder)."""
        dense_type = (self.recipe.dense_config or {}).get("model_type")
        record: dict[str, Any] = {
            "source": {"path": None, "model_type": dense_type, "files_sha256": {}},
            "method": self.recipe.method,
            "options": self.recipe.options,
            "zoo_preset": self.name,
            "license": self.recipe.license,
        }
        if self.recipe.base_model:
            record["base_model"] = self.recipe.base_model
        return record

    def render_card(self) -> str:
        """The model card of this preset (what `hf_moe/model_cards/<name>.md` holds)."""
        return render_model_card(
            self.config(),
            provenance=self.provenance(),
            model_name=f"hf-moe zoo: {self.name}",
            license=self.recipe.license,
            base_model=self.recipe.base_model,
            description=self.description + "\n\n" + _build_note(self),
        )


def _build_note(preset: Preset) -> str:
    if preset.recipe.method == "upcycle":
        return (
            f"Build it with `hf-moe zoo create {preset.name} OUT_DIR --source DENSE_DIR`, where DENSE_DIR holds "
            f"`{preset.recipe.base_model}` (e.g. `hf download {preset.recipe.base_model} --local-dir DENSE_DIR`)."
        )
    return f"Build it (random initialisation) with `hf-moe zoo create {preset.name} OUT_DIR`. {_no_tokenizer(preset)}"


def _no_tokenizer(preset: Preset) -> str:
    return (
        f"The folder ships no tokenizer (there is no trained one for random weights): bring one whose vocabulary has "
        f"{preset.config().get_text_config().vocab_size} entries and save it into the folder."
    )


# ================================================================================================================
# Dense base -> upcycled config.
# ================================================================================================================


def upcycled_config(
    dense_config: dict[str, Any],
    *,
    num_experts: int,
    top_k: int,
    router_type: str = "softmax_topk",
    **config_overrides: Any,
) -> HfMoeConfig:
    """The HfMoeConfig that `hf_moe.upcycle(src, out, num_experts=..., top_k=..., router_type=...)` produces for a
    dense Llama / Mistral / Qwen2 / Qwen3 config (every layer MoE, experts as wide as the dense MLP), computed
    without any weights. The decoder fields come from the upcycler's own source table (`conversion.sources`).

    Args:
        dense_config: the dense model's config.json fields (needs `model_type`).
        num_experts: routed experts per layer.
        top_k: experts per token.
        router_type: a key of the router registry.
        config_overrides: further HfMoeConfig fields.
    Returns:
        The HfMoeConfig.
    """
    dense_kwargs = translate_config(dense_config)
    return HfMoeConfig(
        **{
            **dense_kwargs,
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            "moe_intermediate_size": dense_kwargs["text_config"].intermediate_size,
            "router_type": router_type,
            **config_overrides,
        }
    )


# Public config.json fields of the dense bases (from their Hub repos).
SMOLLM2_135M = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
QWEN2_5_0_5B = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
LLAMA_3_2_1B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
QWEN3_0_6B = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

# ================================================================================================================
# The presets.
# ================================================================================================================

# From-scratch presets share a small decoder so that they build, save and run in seconds on a CPU: a 32k
# vocabulary (bring a tokenizer with vocab_size 32000, e.g. Mistral's), hidden 256, 4 layers, GQA 8/2 heads.
_SMALL = dict(
    vocab_size=32000,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    bos_token_id=1,
    eos_token_id=2,
)
_TOPK2 = dict(num_experts=8, num_experts_per_tok=2)
# The upcycler's defaults: softmax over all experts, top-k renormalised, so copies reproduce the dense MLP.
_UPCYCLE = dict(num_experts=8, top_k=2, router_type="softmax_topk")
_UPCYCLE_NOTE = " (softmax router, top-2 weights renormalised)."

_PRESETS = [
    Preset(
        name="tiny",
        description="The tiny test model (vocab 99, hidden 32, 2 layers, 4 experts, top-2), as in hf-moe's tests.",
        recipe=Recipe(
            method="from_scratch",
            options=dict(
                vocab_size=99,
                hidden_size=32,
                intermediate_size=64,
                moe_intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_experts=4,
                num_experts_per_tok=2,
                max_position_embeddings=128,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
        ),
        expected_total=25_184,
        expected_active=19_040,
    ),
    Preset(
        name="mixtral-style",
        description=(
            "Mixtral-style (Jiang et al. 2024): 8 experts, top-2 with softmax over the two kept logits, every layer "
            "MoE, untied embeddings, experts 2x the hidden size."
        ),
        recipe=Recipe(
            method="from_scratch",
            options=dict(
                **_SMALL,
                **_TOPK2,
                router_type="topk_softmax",
                moe_intermediate_size=512,
                intermediate_size=512,
                router_aux_loss_coef=0.02,
            ),
        ),
        expected_total=29_632_768,
        expected_active=20_195_584,
    ),
    Preset(
        name="qwen3-moe-style",
        description=(
            "Qwen3-MoE-style fine-grained experts: 64 narrow experts, top-8 (softmax, then top-k renormalised), "
            "query/key RMSNorm, head_dim 64 (wider than hidden / heads, as Qwen3)."
        ),
        recipe=Recipe(
            method="from_scratch",
            options=dict(
                **{**_SMALL, "head_dim": 64},
                num_experts=64,
                num_experts_per_tok=8,
                router_type="softmax_topk",
                norm_topk_prob=True,
                base_model_type="qwen3",
                moe_intermediate_size=96,
                intermediate_size=768,
                router_aux_loss_coef=0.001,
            ),
        ),
        expected_total=36_637_440,
        expected_active=20_122_368,
    ),
    Preset(
        name="deepseek-style",
        description=(
            "DeepSeek-V3-style routing on GQA attention: sigmoid scores with aux-loss-free bias balancing, 32 routed "
            "experts in 4 groups (2 groups picked per token), top-4, one shared expert, routed scaling 2.5, the "
            "first layer dense."
        ),
        recipe=Recipe(
            method="from_scratch",
            options=dict(
                **_SMALL,
                num_experts=32,
                num_experts_per_tok=4,
                router_type="sigmoid_topk",
                n_group=4,
                topk_group=2,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
                num_shared_experts=1,
                moe_intermediate_size=128,
                intermediate_size=1024,
                first_k_dense_replace=1,
                router_bias_update_rate=0.001,
                router_aux_loss_coef=0.0001,
            ),
        ),
        expected_total=27_584_768,
        expected_active=19_327_232,
    ),
    Preset(
        name="switch-style",
        description=(
            "Switch-Transformer-style (Fedus et al. 2021): top-1 routing with capacity factor 1.25 (over-capacity "
            "tokens skip the layer through the residual), MoE in every other layer, 8 experts as wide as the dense "
            "MLP, z-loss on."
        ),
        recipe=Recipe(
            method="from_scratch",
            options=dict(
                **_SMALL,
                num_experts=8,
                num_experts_per_tok=1,
                router_type="switch",
                capacity_factor=1.25,
                decoder_sparse_step=2,
                moe_intermediate_size=1024,
                intermediate_size=1024,
                router_aux_loss_coef=0.01,
                router_z_loss_coef=0.001,
            ),
        ),
        expected_total=31_201_536,
        expected_active=20_191_488,
    ),
    Preset(
        name="expert-choice",
        description=(
            "Expert-choice routing (Zhou et al. 2022): each of 8 experts takes the top 2 x tokens / 8 tokens of "
            "the batch, so load is balanced by construction; not causal, so use_cache is off and vLLM cannot "
            "serve it."
        ),
        recipe=Recipe(
            method="from_scratch",
            options=dict(
                **_SMALL,
                **_TOPK2,
                router_type="expert_choice",
                capacity_factor=2.0,
                use_cache=False,
                moe_intermediate_size=512,
                intermediate_size=512,
            ),
        ),
        expected_total=29_632_768,
        expected_active=20_195_584,
    ),
    Preset(
        name="smollm2-135m-8x-top2",
        description="SmolLM2-135M upcycled: every MLP copied into 8 experts, top-2" + _UPCYCLE_NOTE,
        recipe=Recipe(
            method="upcycle",
            options=_UPCYCLE,
            base_model="HuggingFaceTB/SmolLM2-135M",
            dense_config=SMOLLM2_135M,
            license="apache-2.0",
        ),
        expected_total=692_036_928,
        expected_active=214_279_488,
    ),
    Preset(
        name="qwen2.5-0.5b-8x-top2",
        description="Qwen2.5-0.5B upcycled: every MLP copied into 8 experts, top-2" + _UPCYCLE_NOTE,
        recipe=Recipe(
            method="upcycle",
            options=_UPCYCLE,
            base_model="Qwen/Qwen2.5-0.5B",
            dense_config=QWEN2_5_0_5B,
            license="apache-2.0",
        ),
        expected_total=2_690_709_376,
        expected_active=807_991_168,
    ),
    Preset(
        name="llama-3.2-1b-8x-top2",
        description=(
            "Llama-3.2-1B upcycled: every MLP copied into 8 experts, top-2"
            + _UPCYCLE_NOTE
            + " The Llama 3.2 "
            "Community License applies to the result."
        ),
        recipe=Recipe(
            method="upcycle",
            options=_UPCYCLE,
            base_model="meta-llama/Llama-3.2-1B",
            dense_config=LLAMA_3_2_1B,
            license="llama3.2",
        ),
        expected_total=6_873_221_120,
        expected_active=2_041_382_912,
    ),
    Preset(
        name="qwen3-0.6b-8x-top2",
        description="Qwen3-0.6B upcycled: every MLP copied into 8 experts, top-2" + _UPCYCLE_NOTE,
        recipe=Recipe(
            method="upcycle",
            options=_UPCYCLE,
            base_model="Qwen/Qwen3-0.6B",
            dense_config=QWEN3_0_6B,
            license="apache-2.0",
        ),
        expected_total=2_445_967_360,
        expected_active=860_520_448,
    ),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown zoo preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def list_presets() -> list[Preset]:
    """All presets, in zoo order."""
    return list(PRESETS.values())


def card_path(name: str) -> Path:
    return CARDS_DIR / f"{name}.md"


def render_cards(cards_dir: str | os.PathLike | None = None) -> list[Path]:
    """(Re)write `hf_moe/model_cards/<name>.md` for every preset.

    Returns:
        The paths written.
    """
    out_dir = Path(cards_dir) if cards_dir is not None else CARDS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for preset in PRESETS.values():
        path = out_dir / f"{preset.name}.md"
        atomic_write(path, preset.render_card())
        written.append(path)
    return written


def upcycle_command(preset: Preset, out_dir: str = "OUT_DIR", source: str = "DENSE_DIR") -> str:
    """The shell command that builds an upcycling preset from a local copy of its dense base."""
    opts = preset.recipe.options
    return (
        f"hf-moe upcycle {source} {out_dir} --num-experts {opts['num_experts']} --top-k {opts['top_k']} "
        f"--router {opts['router_type']}"
    )


def create(
    name: str,
    out_dir: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build a preset into `out_dir`: a loadable checkpoint, `hf_moe_provenance.json` and a README.md card.

    From-scratch presets are initialised at random (`seed`). Upcycling presets need `source`, a local folder with
    the dense base (its config must match the recipe's dense config).

    Args:
        name: preset name (see `list_presets()`).
        out_dir: destination folder (written atomically).
        source: dense base folder, for upcycling presets.
        seed: random seed for from-scratch initialisation.
        overwrite: replace an existing `out_dir`.
    Returns:
        `out_dir`.
    Raises:
        ValueError: unknown preset, or an upcycling preset without `source` (the message gives the command), or a
            source whose config differs from the recipe.
        FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    preset = get_preset(name)
    out_dir = Path(out_dir)
    if preset.recipe.method == "upcycle":
        if source is None:
            raise ValueError(
                f"zoo preset {name!r} is upcycled from {preset.recipe.base_model}: download that model, then pass "
                f"--source DENSE_DIR, or run: {upcycle_command(preset, str(out_dir))}"
            )
        return _create_upcycled(preset, out_dir, Path(source), overwrite=overwrite)

    config = preset.config()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        torch.manual_seed(seed)
        model = HfMoeForCausalLM(config).eval()
        model.save_pretrained(tmp)
        # The one provenance writer the conversions use. A random initialisation has no source checkpoint: the
        # recipe is, so the source recorded is hf_moe's package folder with the sha256 of this file.
        write_provenance(
            tmp,
            source=Path(__file__).resolve().parent,
            method="from_scratch",
            options={"seed": seed, **preset.recipe.options},
            source_files=[Path(__file__).resolve()],
            extra={"zoo_preset": name, "license": preset.recipe.license},
        )
        write_model_card(
            tmp,
            model_name=out_dir.name,
            license=preset.recipe.license,
            description=f"Built from the hf-moe zoo preset `{name}` with random weights (seed {seed}). "
            + preset.description
            + " "
            + _no_tokenizer(preset),
        )
    return out_dir


def _create_upcycled(preset: Preset, out_dir: Path, source: Path, *, overwrite: bool) -> Path:
    config_path = source / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; --source must be the dense model's folder")
    dense = json.loads(config_path.read_text())
    want = preset.recipe.dense_config or {}
    differ = {
        k: (dense.get(k), want[k])
        for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        if dense.get(k) != want[k]
    }
    if differ:
        raise ValueError(
            f"{source} is not {preset.recipe.base_model}: "
            + ", ".join(f"{k}={got!r} (recipe: {exp!r})" for k, (got, exp) in differ.items())
        )
    upcycle(source, out_dir, overwrite=overwrite, **preset.recipe.options)
    write_model_card(
        out_dir,
        model_name=out_dir.name,
        license=preset.recipe.license,
        base_model=preset.recipe.base_model,
        description=f"Built from the hf-moe zoo recipe `{preset.name}`. " + preset.description,
    )
    return out_dir


__all__ = [
    "Preset",
    "Recipe",
    "PRESETS",
    "get_preset",
    "list_presets",
    "upcycled_config",
    "render_cards",
    "create",
    "upcycle_command",
]
