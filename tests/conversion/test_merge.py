"""merge_experts (Branch-Train-MiX): experts are the fine-tunes' MLPs bit for bit, the rest is the base or the
average, identical fine-tunes reproduce the base logits, prompts route to their fine-tune's expert, mismatches
fail with the model and the field named and nothing written, CLI."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config

import hf_moe
from hf_moe.cli import main as cli_main
from hf_moe.conversion.io import CheckpointReader, sha256_file
from hf_moe.conversion.merge import merge_experts
from hf_moe.conversion.prompts import router_rows_from_dir
from tests.helpers.dense import ROUTING_PROMPTS, SMALL, make_dense_llama, make_fine_tune, save_dense

NUM_FT = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("merge")
    base_model = make_dense_llama(root / "base")
    fts = [make_fine_tune(root / "base", root / f"ft{i}", seed=i) for i in range(NUM_FT)]
    return {
        "root": root,
        "base": root / "base",
        "base_model": base_model,
        "fts": [root / f"ft{i}" for i in range(NUM_FT)],
        "ft_models": fts,
    }


def state(path: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as reader:
        return {name: reader.get_tensor(name) for name in reader.keys()}


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def test_experts_are_the_fine_tunes_mlps_and_the_rest_is_the_base(models, tmp_path):
    out = merge_experts(
        base=models["base"],
        experts=models["fts"],
        out_dir=tmp_path / "moe",
        top_k=2,
        progress=False,
        max_shard_size="30KB",
    )
    assert hf_moe.merge_experts is merge_experts
    merged, base = state(out), state(models["base"])
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    for e, ft_path in enumerate(models["fts"]):
        ft = state(ft_path)
        for i in range(SMALL["num_hidden_layers"]):
            p = f"model.layers.{i}.mlp."
            gate_up = torch.cat([ft[p + "gate_proj.weight"], ft[p + "up_proj.weight"]])
            assert torch.equal(merged[p + "experts.gate_up_proj"][e], gate_up)
            assert torch.equal(merged[p + "experts.down_proj"][e], ft[p + "down_proj.weight"])
    for name, tensor in base.items():
        if ".mlp." not in name:
            assert torch.equal(merged[name], tensor), name
            assert not torch.equal(merged[name], state(models["fts"][0])[name])  # the fine-tunes differ there
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["num_experts_per_tok"]) == ("hf_moe", 3, 2)
    assert config["moe_intermediate_size"] == SMALL["intermediate_size"] and config["mlp_only_layers"] == []
    assert (out / "tokenizer.json").is_file() and (out / "modeling_hf_moe.py").is_file()
    prov = json.loads((out / "hf_moe_provenance.json").read_text())
    assert prov["method"] == "merge_experts" and prov["options"]["shared"] == "base"
    assert prov["source"]["files_sha256"]["tokenizer.json"] == sha256_file(models["base"] / "tokenizer.json")
    for record, ft_path in zip(prov["experts"], models["fts"], strict=True):
        assert record["path"] == str(ft_path.resolve())
        shards = sorted(ft_path.glob("*.safetensors"))
        assert {n: record["files_sha256"][n] for n in (s.name for s in shards)} == {
            s.name: sha256_file(s) for s in shards
        }
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 13]])).logits).all()


def test_shared_average_is_the_element_wise_mean(models, tmp_path):
    out = merge_experts(
        base=models["base"], experts=models["fts"], out_dir=tmp_path / "moe", shared="average", progress=False
    )
    merged, fts = state(out), [state(p) for p in models["fts"]]
    for name in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ):
        expected = torch.stack([ft[name] for ft in fts]).mean(0)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-7)
        assert not torch.allclose(merged[name], state(models["base"])[name])


@pytest.mark.parametrize(
    "router_type, shared, num_shared_experts",
    [("softmax_topk", "base", 0), ("topk_softmax", "average", 0), ("softmax_topk", "base", 1)],
)
def test_identical_fine_tunes_reproduce_the_base_logits(
    models, tmp_path, router_type, shared, num_shared_experts
):
    base = models["base"]
    out = merge_experts(
        base=base,
        experts=[base] * NUM_FT,
        out_dir=tmp_path / "moe",
        top_k=2,
        router_type=router_type,
        shared=shared,
        num_shared_experts=num_shared_experts,
        progress=False,
    )
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 99, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, models["base_model"](ids).logits, rtol=1e-5, atol=1e-5)


def test_prompts_route_each_fine_tunes_prompt_to_its_expert(models, tmp_path):
    prompts_file = tmp_path / "prompts.yaml"
    prompts_file.write_text(yaml.safe_dump(ROUTING_PROMPTS))
    out = merge_experts(
        base=models["base"],
        experts=models["fts"],
        out_dir=tmp_path / "moe",
        top_k=1,
        router_init="prompts",
        prompts=prompts_file,
        progress=False,
    )
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    for e, entry in enumerate(ROUTING_PROMPTS["experts"]):
        ids = tokenizer(entry["positive_prompts"][0], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            router_logits = moe(ids, output_router_logits=True).router_logits
        # Layer 0 reads the base's hidden states exactly (embeddings/attention from the base), where the rows
        # were measured; deeper layers see the mixture of fine-tuned MLPs below them.
        assert router_logits[0][1:].mean(0).argmax().item() == e
    rows = router_rows_from_dir(models["base"], ROUTING_PROMPTS, num_experts=NUM_FT, layers=[0, 1])
    merged = state(out)
    for i in (0, 1):
        torch.testing.assert_close(merged[f"model.layers.{i}.mlp.gate.weight"], rows[i])


def _variant(models, tmp_path: Path, kind: str) -> Path:
    path = tmp_path / kind
    if kind == "qwen2":
        save_dense(path, Qwen2Config(**SMALL), randomised=False, max_shard_size=None)
    elif kind in ("hidden", "layers", "vocab"):
        overrides = {
            "hidden": {"hidden_size": 48},
            "layers": {"num_hidden_layers": 3},
            "vocab": {"vocab_size": 101},
        }
        make_dense_llama(path, **overrides[kind])
    elif kind in ("missing", "extra", "shape"):
        shutil.copytree(models["fts"][0], path)
        tensors = {}
        for shard in path.glob("*.safetensors"):
            tensors.update(load_file(shard))
            shard.unlink()
        (path / "model.safetensors.index.json").unlink()
        if kind == "missing":
            del tensors["model.layers.1.self_attn.k_proj.weight"]
        elif kind == "extra":
            tensors["model.layers.1.self_attn.k_proj.bias"] = torch.zeros(16)
        else:
            tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1]
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    "kind, match",
    [
        ("qwen2", r"fine-tune 1 \(.*qwen2\) has model_type='qwen2' but the base .* has 'llama'"),
        ("hidden", r"fine-tune 1 \(.*hidden\) has hidden_size=48 but the base .* has 32"),
        ("layers", r"fine-tune 1 \(.*layers\) has num_hidden_layers=3 but the base .* has 2"),
        ("vocab", r"fine-tune 1 \(.*vocab\) has vocab_size=101 but the base .* has 99"),
        ("missing", r"fine-tune 1 \(.*missing\) lacks tensor 'model.layers.1.self_attn.k_proj.weight'"),
        ("extra", r"fine-tune 1 \(.*extra\) has tensor 'model.layers.1.self_attn.k_proj.bias' that the base"),
        (
            "shape",
            r"fine-tune 1 \(.*shape\): tensor 'model.layers.0.mlp.up_proj.weight' has shape \[63, 32\]",
        ),
    ],
)
def test_mismatched_fine_tune_is_refused_naming_model_and_field(models, tmp_path, kind, match):
    bad = _variant(models, tmp_path / "inputs", kind)
    out = tmp_path / "out" / "moe"
    out.parent.mkdir()
    with pytest.raises(ValueError, match=match):
        merge_experts(
            base=models["base"], experts=[models["fts"][0], bad], out_dir=out, top_k=1, progress=False
        )
    assert_nothing_written(out)


def test_failure_mid_write_leaves_nothing_and_keeps_an_old_output(models, tmp_path):
    out = tmp_path / "moe"
    # A prompt of special tokens only passes validation and fails when the first router is computed, i.e.
    # after the embeddings and layer 0's experts were written to the temporary folder.
    bad_prompts = [["To be"], ["<s>"], ["fox"]]
    with pytest.raises(ValueError, match="special tokens only"):
        merge_experts(
            base=models["base"],
            experts=models["fts"],
            out_dir=out,
            router_init="prompts",
            prompts=bad_prompts,
            progress=False,
        )
    assert_nothing_written(out)
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="special tokens only"):
        merge_experts(
            base=models["base"],
            experts=models["fts"],
            out_dir=out,
            router_init="prompts",
            prompts=bad_prompts,
            progress=False,
            overwrite=True,
        )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_bad_options(models, tmp_path):
    kw = dict(base=models["base"], experts=models["fts"], progress=False)
    out = tmp_path / "moe"
    with pytest.raises(ValueError, match="top_k=4 must be between 1 and the number of experts"):
        merge_experts(**kw, out_dir=out, top_k=4)
    with pytest.raises(ValueError, match="shared='mean' is not supported"):
        merge_experts(**kw, out_dir=out, shared="mean")
    with pytest.raises(ValueError, match="experts must be a non-empty list"):
        merge_experts(base=models["base"], experts=[], out_dir=out)
    with pytest.raises(ValueError, match="prompts were given but router_init='random'"):
        merge_experts(**kw, out_dir=out, prompts=ROUTING_PROMPTS)
    with pytest.raises(ValueError, match="list 2 experts but the model has 3"):
        merge_experts(**kw, out_dir=out, router_init="prompts", prompts=ROUTING_PROMPTS["experts"][:2])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_experts(base=models["base"], experts=[tmp_path / "nope"], out_dir=out, top_k=1)
    assert_nothing_written(out)
    out.mkdir()
    with pytest.raises(FileExistsError):
        merge_experts(**kw, out_dir=out)
    for folder in (models["base"], *models["fts"]):  # inputs untouched: still loadable, nothing added
        assert not any(p.name.startswith(".") for p in folder.iterdir())


def test_cli_merge(models, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.yaml"
    prompts_file.write_text(yaml.safe_dump(ROUTING_PROMPTS))
    out = tmp_path / "moe"
    argv = [
        "merge",
        "--base",
        str(models["base"]),
        *[a for p in models["fts"] for a in ("--expert", str(p))],
        str(out),
        "--top-k",
        "1",
        "--shared",
        "average",
        "--prompts",
        str(prompts_file),
        "--no-progress",
    ]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    prov = json.loads((out / "hf_moe_provenance.json").read_text())
    assert prov["options"]["router_init"] == "prompts" and prov["options"]["shared"] == "average"
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 1
    assert cli_main(argv) == 2  # OUT_DIR exists
    assert "already exists" in capsys.readouterr().err
    bad = [
        "merge",
        "--base",
        str(models["base"]),
        "--expert",
        str(models["fts"][0]),
        "--expert",
        str(tmp_path / "missing"),
        str(tmp_path / "moe2"),
        "--top-k",
        "1",
        "--no-progress",
    ]
    assert cli_main(bad) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "moe2").exists()


@pytest.mark.slow
def test_smollm2_merge_of_identical_copies_is_exact_and_prompts_route(smollm2_dir, tmp_path):
    """The real SmolLM2-135M (30 layers, tied embeddings) merged with itself: the key mapping holds on a real
    checkpoint (same logits as the dense model) and prompt rows send each prompt to its own expert at layer 0."""
    from transformers import AutoTokenizer

    spec = [["To be, or not to be, that is the question"], ["def main():\n    return parse_args()"]]
    out = merge_experts(
        base=smollm2_dir,
        experts=[smollm2_dir, smollm2_dir],
        out_dir=tmp_path / "moe",
        top_k=1,
        router_init="prompts",
        prompts=spec,
        shared="average",
        progress=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    batches = [tokenizer(text[0], return_tensors="pt")["input_ids"] for text in spec]
    with torch.no_grad():
        expected = [dense(ids).logits for ids in batches]
    del dense
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert moe.config.num_experts == 2 and len(moe.config.moe_layers) == 30
    for e, ids in enumerate(batches):
        with torch.no_grad():
            output = moe(ids, output_router_logits=True)
        torch.testing.assert_close(output.logits, expected[e], rtol=1e-4, atol=1e-3)
        assert output.router_logits[0][1:].mean(0).argmax().item() == e
