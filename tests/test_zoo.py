"""The zoo: every preset's counts (by hand, by formula, on a meta-device model), its rendered card, and that every
from-scratch preset builds, saves, loads and runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moe import HfMoeForCausalLM, cli
from hf_moe.hub import count_parameters
from hf_moe.zoo import PRESETS, card_path, create, get_preset, render_cards, upcycled_config
from tests.helpers.cards import assert_hub_ready, expert_share, tiny_dense_llama

FROM_SCRATCH = [name for name, p in PRESETS.items() if p.recipe.method == "from_scratch"]
UPCYCLE = [name for name, p in PRESETS.items() if p.recipe.method == "upcycle"]

# Published sizes of the dense bases (their model pages / papers), the anchor for the upcycled counts.
DENSE_PARAMS = {
    "smollm2-135m-8x-top2": 134_515_008,
    "qwen2.5-0.5b-8x-top2": 494_032_768,
    "llama-3.2-1b-8x-top2": 1_235_814_400,
    "qwen3-0.6b-8x-top2": 596_049_920,
}


def test_zoo_has_the_required_families() -> None:
    configs = {name: p.config() for name, p in PRESETS.items()}
    assert {c.router_type for c in configs.values()} >= {
        "topk_softmax",
        "softmax_topk",
        "sigmoid_topk",
        "switch",
        "expert_choice",
    }
    deepseek = configs["deepseek-style"]
    assert deepseek.num_shared_experts >= 1 and deepseek.n_group > 1 and deepseek.first_k_dense_replace >= 1
    assert (
        configs["qwen3-moe-style"].base_model_type == "qwen3"
        and configs["qwen3-moe-style"].num_experts_per_tok == 8
    )
    assert (
        configs["switch-style"].capacity_factor is not None
        and configs["switch-style"].num_experts_per_tok == 1
    )
    assert sorted(PRESETS[n].recipe.base_model for n in UPCYCLE) == [
        "HuggingFaceTB/SmolLM2-135M",
        "Qwen/Qwen2.5-0.5B",
        "Qwen/Qwen3-0.6B",
        "meta-llama/Llama-3.2-1B",
    ]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_counts(name: str) -> None:
    preset = PRESETS[name]
    counts = preset.parameter_counts()
    assert (counts.total, counts.active) == (preset.expected_total, preset.expected_active)
    with torch.device("meta"):
        model = HfMoeForCausalLM(preset.config())
    assert sum(p.numel() for p in model.parameters()) == preset.expected_total
    assert expert_share(model) == preset.expected_active


@pytest.mark.parametrize("name", UPCYCLE)
def test_upcycled_config_keeps_the_dense_model(name: str) -> None:
    """The upcycled model has exactly the dense model's tensors outside the MLPs, and E copies of its MLP."""
    preset = PRESETS[name]
    dense_fields = dict(preset.recipe.dense_config)
    dense_config = AutoConfig.for_model(dense_fields.pop("model_type"), **dense_fields)
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(dense_config)
        moe = HfMoeForCausalLM(preset.config())
    assert sum(p.numel() for p in dense.parameters()) == DENSE_PARAMS[name]
    dense_shapes = {k: v.shape for k, v in dense.state_dict().items() if ".mlp." not in k}
    moe_shapes = {k: v.shape for k, v in moe.state_dict().items() if ".mlp." not in k}
    assert moe_shapes == dense_shapes  # attention (biases, q/k norms), norms, embeddings, tied head
    config = preset.config()
    mlp = 3 * config.hidden_size * config.intermediate_size
    layers, experts, k = config.num_hidden_layers, config.num_experts, config.num_experts_per_tok
    router = layers * experts * config.hidden_size
    assert preset.expected_total == DENSE_PARAMS[name] + layers * (experts - 1) * mlp + router
    assert preset.expected_active == DENSE_PARAMS[name] + layers * (k - 1) * mlp + router
    assert config.rope_parameters["rope_theta"] == preset.recipe.dense_config["rope_theta"]


def test_upcycled_config_refuses_unknown_bases() -> None:
    with pytest.raises(ValueError, match="unsupported source architecture"):
        upcycled_config({"model_type": "mamba"}, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="not gated"):
        upcycled_config({"model_type": "gpt2"}, num_experts=8, top_k=2)


@pytest.mark.parametrize("name", list(PRESETS))
def test_rendered_card_in_sync_and_valid(name: str) -> None:
    preset = PRESETS[name]
    path = card_path(name)
    assert path.is_file(), f"{path} missing: run hf-moe zoo render-cards"
    assert path.read_text(encoding="utf-8") == preset.render_card(), (
        f"{path} is stale: run hf-moe zoo render-cards"
    )
    card = ModelCard.load(path)
    assert card.data.license == preset.recipe.license
    assert card.data.base_model == preset.recipe.base_model
    if preset.recipe.method == "upcycle":
        assert card.data.base_model_relation == "finetune"
    assert f"| Total | {preset.expected_total:,} " in card.text
    assert f"| Active per token | {preset.expected_active:,} " in card.text


def test_render_cards_writes_every_preset(tmp_path: Path) -> None:
    written = render_cards(tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{n}.md" for n in PRESETS)
    assert all(p.read_text() == card_path(p.stem).read_text() for p in written)


@pytest.mark.parametrize("name", FROM_SCRATCH)
def test_create_builds_saves_loads_and_runs(name: str, tmp_path: Path) -> None:
    out = create(name, tmp_path / name, seed=3)
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # strict: every tensor present and matching
    want = PRESETS[name].config()
    got = model.config.to_diff_dict()
    assert {k: got.get(k) for k in want.to_diff_dict()} == want.to_diff_dict()
    input_ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, 5, model.config.vocab_size) and torch.isfinite(logits).all()
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0"
    assert f"{PRESETS[name].expected_total:,}" in card.text
    provenance = json.loads((out / "hf_moe_provenance.json").read_text())
    assert provenance["method"] == "from_scratch" and provenance["options"]["seed"] == 3
    with pytest.raises(FileExistsError):
        create(name, out)


def test_create_is_reproducible(tmp_path: Path) -> None:
    first = AutoModelForCausalLM.from_pretrained(create("tiny", tmp_path / "a", seed=3))
    again = AutoModelForCausalLM.from_pretrained(create("tiny", tmp_path / "b", seed=3))
    other = AutoModelForCausalLM.from_pretrained(create("tiny", tmp_path / "c", seed=4))
    torch.testing.assert_close(again.state_dict(), first.state_dict())
    assert not torch.equal(other.model.embed_tokens.weight, first.model.embed_tokens.weight)


def test_upcycle_presets_explain_or_check_their_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hf-moe upcycle DENSE_DIR .* --num-experts 8 --top-k 2"):
        create("qwen3-0.6b-8x-top2", tmp_path / "out")
    source = tmp_path / "not-smollm2"
    source.mkdir()
    (source / "config.json").write_text(
        json.dumps({**get_preset("smollm2-135m-8x-top2").recipe.dense_config, "hidden_size": 64})
    )
    with pytest.raises(ValueError, match="hidden_size=64"):
        create("smollm2-135m-8x-top2", tmp_path / "out", source=source)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown zoo preset 'nope'; available: tiny"):
        get_preset("nope")


def test_cli_zoo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["zoo", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PRESETS)
    assert cli.main(["zoo", "show", "llama-3.2-1b-8x-top2"]) == 0
    shown = capsys.readouterr().out
    assert "6,873,221,120 total, 2,041,382,912 active per token" in shown and "llama3" in shown
    assert cli.main(["zoo", "create", "tiny", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "README.md").is_file()
    count = count_parameters(AutoConfig.from_pretrained(tmp_path / "tiny")).total
    assert count == PRESETS["tiny"].expected_total
    capsys.readouterr()
    assert cli.main(["zoo", "create", "smollm2-135m-8x-top2", str(tmp_path / "x")]) == 2
    assert "--source DENSE_DIR" in capsys.readouterr().err
    assert cli.main(["zoo", "show", "nope"]) == 2


def test_create_runs_an_upcycling_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`zoo create NAME OUT --source DIR` for an upcycling recipe, on a tiny dense base registered as a preset."""
    from hf_moe.zoo import Preset, Recipe

    dense = tiny_dense_llama(tmp_path / "dense")
    dense_config = json.loads((dense / "config.json").read_text())
    preset = Preset(
        name="tiny-llama-4x-top2",
        description="A tiny dense Llama upcycled to 4 experts, top-2.",
        recipe=Recipe(
            method="upcycle",
            options=dict(num_experts=4, top_k=2, router_type="softmax_topk"),
            base_model="someone/tiny-llama",
            dense_config=dense_config,
            license="mit",
        ),
        expected_total=0,
        expected_active=0,
    )
    monkeypatch.setitem(PRESETS, preset.name, preset)
    assert cli.main(["zoo", "create", preset.name, str(tmp_path / "moe"), "--source", str(dense)]) == 0
    out = tmp_path / "moe"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == preset.parameter_counts().total
    # The preset's config (computed without weights) is what the upcycler wrote.
    want = preset.config().to_diff_dict()
    got = model.config.to_diff_dict()
    assert {k: got.get(k) for k in want if k not in ("dtype",)} == {
        k: v for k, v in want.items() if k not in ("dtype",)
    }
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.base_model == "someone/tiny-llama"
    assert f"| Total | {preset.parameter_counts().total:,} " in card.text


@pytest.mark.slow
def test_smollm2_recipe_on_real_weights(
    smollm2_dir: Path, shakespeare_heldout_text: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The SmolLM2 recipe on the real SmolLM2-135M(-Instruct) weights: the card's counts are the preset's (and the
    safetensors agree), the licence comes from the recipe, and inspect runs on Shakespeare."""
    preset = get_preset("smollm2-135m-8x-top2")
    out = create(preset.name, tmp_path / "smol-moe", source=smollm2_dir)
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert f"| Total | {preset.expected_total:,} " in card.text
    assert f"| Active per token | {preset.expected_active:,} " in card.text
    text = tmp_path / "heldout.txt"
    text.write_text(shakespeare_heldout_text[:20_000])
    assert (
        cli.main(
            [
                "inspect",
                str(out),
                "--text",
                str(text),
                "--max-tokens",
                "256",
                "--seq-len",
                "128",
                "--json",
                str(tmp_path / "stats.json"),
            ]
        )
        == 0
    )
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["num_tokens"] == 256 and len(stats["layers"]) == 30
    assert all(sum(row) == 2 * 256 for row in stats["tokens_per_expert"])  # dropless top-2
    assert all(0 < h <= math.log(8) + 1e-6 for h in stats["entropy"])


@pytest.mark.parametrize("name", list(PRESETS))
def test_zoo_cards_are_hub_ready(name: str) -> None:
    assert_hub_ready(card_path(name).read_text(encoding="utf-8"))


def test_created_card_is_hub_ready_and_provenance_has_the_one_schema(tmp_path: Path) -> None:
    out = create("tiny", tmp_path / "tiny", seed=1)
    record = json.loads((out / "hf_moe_provenance.json").read_text())
    assert set(record["source"]) == {"path", "model_type", "files_sha256"}  # conversion.io.write_provenance's
    assert list(record["source"]["files_sha256"]) == ["zoo.py"] and record["zoo_preset"] == "tiny"
    text = (out / "README.md").read_text()
    assert_hub_ready(text, tmp_path)
    assert "ships no tokenizer" in text and "99 entries" in text


@pytest.mark.slow  # builds a wheel (about 20 s)
def test_a_wheel_ships_what_the_library_points_at(tmp_path: Path) -> None:
    """A non-editable install has the cards `hf-moe zoo show` names and the card templates, and not the demo's
    asset fetcher (which runs pip: it lives in examples/)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "hf_moe", src / "hf_moe", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=src,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hf_moe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"hf_moe/model_cards/{name}.md" for name in PRESETS} <= names
    assert {
        "hf_moe/templates/model_card.md",
        "hf_moe/templates/usage_hf_moe.md",
        "hf_moe/templates/usage_export.md",
    } <= names
    assert not any("assets" in n for n in names)
    library = "".join(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith(".py"))
    assert 'parent.parent / "model_cards"' not in library
