"""mergekit-moe configs: YAML in mergekit's documented format (docs/moe.md, mergekit 0.1.4) gives the same
checkpoint as the equivalent merge_experts call; cheap_embed rows equal a hand computation from the embedding
matrix; architecture exports; every unsupported key or value is refused by name before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe.cli import main as cli_main
from hf_moe.conversion.io import CheckpointReader
from hf_moe.conversion.merge import merge_experts
from hf_moe.conversion.mergekit import load_mergekit_config, merge_from_mergekit
from tests.helpers.dense import SMALL, make_dense_llama, make_fine_tune

PROMPTS = [
    ["To be, or not to be, that is the question."],
    ["The quick brown fox jumps over the lazy dog.", "Hello world!"],
    ["Numbers 0 1 2 3 4 5 6 7 8 9"],
]
NEGATIVE = {1: ["To be, or not to be"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mergekit")
    make_dense_llama(root / "base")
    for i in range(3):
        make_fine_tune(root / "base", root / f"ft{i}", seed=i)
    return {"root": root, "base": root / "base", "fts": [root / f"ft{i}" for i in range(3)]}


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def mergekit_yaml(models: dict, gate_mode: str, *, prompts: bool = True, extra: str = "") -> str:
    """A config as mergekit's docs write it (block lists, quoted prompts, comments)."""
    lines = [
        f"base_model: {models['base']}",
        f"gate_mode: {gate_mode} # one of hidden, cheap_embed, random",
        "dtype: float32",
        "experts_per_token: 2",
        "experts:",
    ]
    for i, ft in enumerate(models["fts"]):
        lines.append(f"  - source_model: {ft}")
        if prompts:
            lines.append("    positive_prompts:")
            lines += [f"      - {json.dumps(p)}" for p in PROMPTS[i]]
            if i in NEGATIVE:
                lines.append("    negative_prompts:")
                lines += [f"      - {json.dumps(p)}" for p in NEGATIVE[i]]
    return "\n".join(lines) + "\n" + extra


def hf_moe_prompts() -> dict:
    return {
        "experts": [
            {"positive_prompts": PROMPTS[i], **({"negative_prompts": NEGATIVE[i]} if i in NEGATIVE else {})}
            for i in range(3)
        ]
    }


def state(path: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as reader:
        return {name: reader.get_tensor(name) for name in reader.keys()}


def test_hidden_gate_mode_equals_merge_experts_with_prompts(models, tmp_path, capsys) -> None:
    config = write_yaml(tmp_path / "moe.yml", mergekit_yaml(models, "hidden"))
    out = tmp_path / "from-yaml"
    assert cli_main(["merge", "--mergekit-config", str(config), str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    direct = merge_experts(
        base=models["base"],
        experts=models["fts"],
        out_dir=tmp_path / "direct",
        top_k=2,
        router_init="prompts",
        prompts=hf_moe_prompts(),
        dtype="float32",
        progress=False,
    )
    got, want = state(out), state(direct)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # The negative prompt changed expert 1's row: the prompts reached the router init as written.
    positives_only = merge_experts(
        base=models["base"],
        experts=models["fts"],
        out_dir=tmp_path / "pos-only",
        top_k=2,
        router_init="prompts",
        prompts={"experts": [{"positive_prompts": p} for p in PROMPTS]},
        dtype="float32",
        progress=False,
    )
    rows, rows_pos = (
        got["model.layers.0.mlp.gate.weight"],
        state(positives_only)["model.layers.0.mlp.gate.weight"],
    )
    cos = torch.nn.functional.cosine_similarity(
        rows, rows_pos, dim=-1
    )  # (E,): the scale is shared, so compare directions
    assert cos[0] == pytest.approx(1.0, abs=1e-5) and cos[1] < 0.99
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["num_shared_experts"]) == (3, 2, 0)


def test_cheap_embed_rows_are_the_prompts_embedding_directions(models, tmp_path) -> None:
    config = write_yaml(tmp_path / "moe.yml", mergekit_yaml(models, "cheap_embed"))
    out = merge_from_mergekit(config, tmp_path / "moe", progress=False)
    # By hand: the base's input embeddings of each prompt's non-special tokens, summed, unit length;
    # positive minus negative, unit length again.
    base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(models["base"])
    embed = base.get_input_embeddings().weight.detach()  # (V, H)

    def direction(texts: list[str]) -> torch.Tensor:
        ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]]
        v = embed[ids].sum(dim=0)  # (H,)
        return v / v.norm()

    expected = []
    for i in range(3):
        row = direction(PROMPTS[i]) - (direction(NEGATIVE[i]) if i in NEGATIVE else 0)
        expected.append(row / row.norm())
    expected = torch.stack(expected)  # (E, H)
    merged = state(out)
    for layer in range(SMALL["num_hidden_layers"]):
        torch.testing.assert_close(
            merged[f"model.layers.{layer}.mlp.gate.weight"], expected, rtol=1e-5, atol=1e-6
        )
    # Without negatives a prompt's own row is its unit direction, so it scores highest there (rows are unit).
    for i in (0, 2):
        assert int((expected @ direction(PROMPTS[i])).argmax()) == i


def test_random_shared_expert_and_dtype(models, tmp_path) -> None:
    text = mergekit_yaml(models, "random", prompts=False).replace("dtype: float32", "dtype: bfloat16")
    text += f"shared_experts:\n  - source_model: {models['base']}\n"
    config = write_yaml(tmp_path / "moe.yml", text)
    plan = load_mergekit_config(config)
    assert (plan.router_init, plan.num_shared_experts, plan.dtype, plan.top_k) == ("random", 1, "bfloat16", 2)
    out = merge_from_mergekit(config, tmp_path / "moe", seed=3, progress=False)
    direct = merge_experts(
        base=models["base"],
        experts=models["fts"],
        out_dir=tmp_path / "direct",
        top_k=2,
        num_shared_experts=1,
        dtype="bfloat16",
        seed=3,
        progress=False,
    )
    got, want = state(out), state(direct)
    assert got.keys() == want.keys() and "model.layers.0.mlp.shared_experts.down_proj.weight" in got
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert got["model.layers.0.mlp.experts.down_proj"].dtype == torch.bfloat16


def test_architecture_exports_the_merge(models, tmp_path) -> None:
    text = mergekit_yaml(models, "random", prompts=False) + "architecture: mixtral\n"
    out = merge_from_mergekit(write_yaml(tmp_path / "moe.yml", text), tmp_path / "mixtral", progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    merged = merge_experts(
        base=models["base"],
        experts=models["fts"],
        out_dir=tmp_path / "hf_moe",
        top_k=2,
        dtype="float32",
        progress=False,
    )
    ids = torch.tensor([[1, 7, 30, 12, 55, 4]])
    with torch.no_grad():
        native = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        ours = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    torch.testing.assert_close(native, ours, rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if ".mergekit-" in p.name] == []  # the scratch merge is gone


# Each: (edit applied to a valid hidden-mode YAML, the message expected). All refused before any output exists.
REFUSALS = {
    "unknown top-level key": (
        lambda t: t + "tokenizer_source: union\n",
        r"tokenizer_source is not a mergekit-moe key",
    ),
    "noise_scale": (
        lambda t: t.replace("  - source_model:", "  - noise_scale: 0.01\n    source_model:", 1),
        r"experts\[0\]\.noise_scale is not supported.*remove noise_scale",
    ),
    "residual_scale": (
        lambda t: t.replace("  - source_model:", "  - residual_scale: 0.5\n    source_model:", 1),
        r"experts\[0\]\.residual_scale is not supported",
    ),
    "uniform_random": (
        lambda t: t.replace("gate_mode: hidden", "gate_mode: uniform_random"),
        r"gate_mode='uniform_random' is not supported: use gate_mode: random",
    ),
    "unknown gate mode": (
        lambda t: t.replace("gate_mode: hidden", "gate_mode: learned"),
        r"gate_mode='learned' is not a gate mode",
    ),
    "prompts under random": (
        lambda t: t.replace("gate_mode: hidden", "gate_mode: random"),
        r"experts\[0\] has prompts but gate_mode: random",
    ),
    "too many per token": (
        lambda t: t.replace("experts_per_token: 2", "experts_per_token: 4"),
        r"experts_per_token=4 must be an integer from 1 to the number of experts \(3\)",
    ),
    "dtype": (lambda t: t.replace("dtype: float32", "dtype: int8"), r"dtype='int8' is not supported"),
    "lora reference": (
        lambda t: t.replace("  - source_model: ", "  - source_model: some/adapter+", 1),
        r"model\+LoRA reference",
    ),
    "deepseek": (lambda t: t + "architecture: deepseek\n", r"architecture='deepseek' is not supported"),
    "shared prompts": (
        lambda t: t + "shared_experts:\n  - source_model: x\n    positive_prompts: ['hi']\n",
        r"shared_experts\[0\]: prompts are not supported",
    ),
    "same prompts": (
        lambda t: t.replace("Numbers 0 1 2 3 4 5 6 7 8 9", "x").replace(
            "To be, or not to be, that is the question.", "x"
        ),
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unsupported_keys_are_refused_by_name(case, models, tmp_path, capsys) -> None:
    edit, pattern = REFUSALS[case]
    text = edit(mergekit_yaml(models, "hidden"))
    config = write_yaml(tmp_path / "moe.yml", text)
    if pattern is None:  # expert 1 still differs (two prompts, a negative): make all three identical
        text = yaml.safe_load(text)
        for e in text["experts"]:
            e["positive_prompts"], e["negative_prompts"] = ["x"], ["y"]
        config = write_yaml(config, yaml.safe_dump(text))
        pattern = r"every expert has the same prompts"
    with pytest.raises(ValueError, match=pattern):
        merge_from_mergekit(config, tmp_path / "out", progress=False)
    assert cli_main(["merge", "--mergekit-config", str(config), str(tmp_path / "out")]) == 2
    assert "mergekit config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_prompts_and_shared_source_not_base(models, tmp_path) -> None:
    text = mergekit_yaml(models, "hidden", prompts=False)
    with pytest.raises(
        ValueError, match=r"experts\[0\]\.positive_prompts is missing; gate_mode: hidden needs"
    ):
        load_mergekit_config(yaml.safe_load(text))
    text = (
        mergekit_yaml(models, "random", prompts=False)
        + f"shared_experts:\n  - source_model: {models['fts'][0]}\n"
    )
    with pytest.raises(ValueError, match=r"shared_experts\[0\]\.source_model=.* is not the base model"):
        merge_from_mergekit(yaml.safe_load(text), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_flags_the_config_sets(models, tmp_path, capsys) -> None:
    config = write_yaml(tmp_path / "moe.yml", mergekit_yaml(models, "random", prompts=False))
    assert cli_main(["merge", "--mergekit-config", str(config), str(tmp_path / "o"), "--top-k", "1"]) == 2
    assert "--top-k: the mergekit config sets these" in capsys.readouterr().err
    assert cli_main(["merge", str(tmp_path / "o")]) == 2
    assert "--mergekit-config" in capsys.readouterr().err


def test_cli_router_init_cheap_embed_matches_the_mergekit_route(models, tmp_path) -> None:
    config = write_yaml(tmp_path / "moe.yml", mergekit_yaml(models, "cheap_embed"))
    via_yaml = merge_from_mergekit(config, tmp_path / "yaml", progress=False)
    prompts = write_yaml(tmp_path / "prompts.yml", yaml.safe_dump(hf_moe_prompts()))
    argv = [
        "merge",
        str(tmp_path / "cli"),
        "--base",
        str(models["base"]),
        "--router-init",
        "cheap_embed",
        "--prompts",
        str(prompts),
        "--dtype",
        "float32",
        "--no-progress",
    ]
    for ft in models["fts"]:
        argv += ["--expert", str(ft)]
    assert cli_main(argv) == 0
    got, want = state(tmp_path / "cli"), state(via_yaml)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
