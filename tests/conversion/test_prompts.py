"""Router initialisation from prompts: rows equal the hand-computed mean hidden states, a prompt routes to its
own expert, collinear rows warn, exactness of copy-upcycling still holds, bad prompt files fail before any
output, CLI.
"""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_moe.cli import main as cli_main
from hf_moe.conversion.init import ROUTER_INITS
from hf_moe.conversion.prompts import (
    COLLINEAR_COSINE,
    DEFAULT_LOGIT_SCALE,
    load_prompts,
    prompts_router,
    router_rows_from_dir,
)
from hf_moe.conversion.upcycle import upcycle
from tests.helpers.dense import ROUTING_PROMPTS, make_dense_llama

# Distinct texts (made of words the tiny tokenizer was trained on).
PROMPTS = {
    "experts": [
        {
            "name": "bard",
            "positive_prompts": [
                "To be, or not to be, that is the question.",
                "Shall I compare thee to a summer's day?",
            ],
        },
        {
            "name": "fox",
            "positive_prompts": ["The quick brown fox jumps over the lazy dog."],
            "negative_prompts": ["Hello world!"],
        },
        {"name": "numbers", "positive_prompts": ["Numbers 0 1 2 3 4 5 6 7 8 9"]},
    ]
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("prompts") / "dense"
    return path, make_dense_llama(path)


def hand_rows(model: LlamaForCausalLM, tokenizer, spec: dict, layer: int) -> torch.Tensor:
    """The router rows of `layer`, computed independently: forward hooks on post_attention_layernorm (not the
    MLP-input hook the library uses), BOS dropped by position."""
    grabbed = {}
    norm = model.model.layers[layer].post_attention_layernorm
    handle = norm.register_forward_hook(lambda m, a, out: grabbed.__setitem__("h", out[0]))
    sq, n_tok = 0.0, 0

    def mean_of(texts: list[str]) -> torch.Tensor:
        nonlocal sq, n_tok
        per_prompt = []
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            assert ids[0, 0].item() == tokenizer.bos_token_id and ids[0, 1:].ne(tokenizer.bos_token_id).all()
            with torch.no_grad():
                model(ids)
            h = grabbed["h"][1:]  # (S-1, H) without BOS
            per_prompt.append(h.mean(0))
            sq, n_tok = sq + h.pow(2).sum(-1).mean().item(), n_tok + 1
        return torch.stack(per_prompt).mean(0)

    try:
        dirs = []
        for entry in spec["experts"]:
            d = mean_of(entry["positive_prompts"])
            if entry.get("negative_prompts"):
                d = d - mean_of(entry["negative_prompts"])
            dirs.append(d / d.norm())
    finally:
        handle.remove()
    # sq/n_tok: mean over prompts of the per-prompt mean squared token norm.
    return torch.stack(dirs) * spec.get("logit_scale", DEFAULT_LOGIT_SCALE) / (sq / n_tok) ** 0.5


def test_rows_equal_hand_computed_means(dense):
    from transformers import AutoTokenizer

    path, model = dense
    rows = router_rows_from_dir(path, PROMPTS, num_experts=3, layers=[0, 1])
    tokenizer = AutoTokenizer.from_pretrained(path)
    for layer in (0, 1):
        torch.testing.assert_close(
            rows[layer], hand_rows(model, tokenizer, PROMPTS, layer), rtol=1e-5, atol=1e-6
        )
    assert not torch.allclose(rows[0], rows[1])  # per-layer rows, not one copy


def test_upcycle_with_prompts_routes_each_prompt_to_its_expert_and_stays_exact(dense, tmp_path):
    path, model = dense
    prompts_file = tmp_path / "prompts.yaml"
    prompts_file.write_text(yaml.safe_dump(ROUTING_PROMPTS))
    out = upcycle(
        path,
        tmp_path / "moe",
        num_experts=3,
        top_k=2,
        router_init="prompts",
        prompts=prompts_file,
        progress=False,
    )
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    # Each expert's prompt: its mean router logits (over the non-BOS tokens) are highest at its own expert.
    for e, entry in enumerate(ROUTING_PROMPTS["experts"]):
        ids = tokenizer(entry["positive_prompts"][0], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            output = moe(ids, output_router_logits=True)
            dense_logits = model(ids).logits
        for layer, logits in enumerate(output.router_logits):  # (T, E) per MoE layer
            assert logits[1:].mean(0).argmax().item() == e, (layer, e, logits[1:].mean(0))
        # Copy-upcycling is exact whatever the routing.
        torch.testing.assert_close(output.logits, dense_logits, rtol=1e-5, atol=1e-5)
    rows = router_rows_from_dir(path, prompts_file, num_experts=3, layers=[0, 1])
    state = moe.state_dict()
    for layer in (0, 1):
        torch.testing.assert_close(state[f"model.layers.{layer}.mlp.gate.weight"], rows[layer])


def test_identical_prompts_warn_collinear(dense):
    same = {
        "experts": [
            {"positive_prompts": ["Hello world!"]},
            {"positive_prompts": ["Hello world!"]},
            {"positive_prompts": ["The quick brown fox."]},
        ]
    }
    with pytest.warns(
        UserWarning, match=rf"layer 0: .*cosine > {COLLINEAR_COSINE}.*experts 0 and 1 \(cos 1\.000\)"
    ):
        router_rows_from_dir(dense[0], same, num_experts=3, layers=[0])


def test_distinct_prompts_do_not_warn(dense, recwarn):
    router_rows_from_dir(dense[0], PROMPTS, num_experts=3, layers=[0, 1])
    assert not [w for w in recwarn if "collinear" in str(w.message)]


def test_virtual_groups_share_a_row_and_stay_exact(dense, tmp_path):
    path, model = dense
    two = {"experts": PROMPTS["experts"][:2]}
    out = upcycle(
        path,
        tmp_path / "moe",
        num_experts=4,
        top_k=2,
        granularity=2,
        router_init="prompts",
        prompts=two,
        progress=False,
        require_exact=True,
    )
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    gate = moe.state_dict()["model.layers.0.mlp.gate.weight"]  # (4, H)
    torch.testing.assert_close(gate[0], gate[1])
    torch.testing.assert_close(gate[2], gate[3])
    assert not torch.allclose(gate[0], gate[2])
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "does not exist"),
        ("experts: [positive_prompts: [unclosed", "not valid YAML"),
        (
            "experts:\n  - positive_prompts: [a]\n  - positive_prompts: [b]\n",
            "list 2 experts but the model has 3",
        ),
        (
            "experts:\n  - positive_prompts: []\n  - {positive_prompts: [b]}\n  - {positive_prompts: [c]}\n",
            "expert 0: `positive_prompts` is empty",
        ),
        ("experts:\n  - positive_prompts: ['  ']\n", r"positive_prompts`\[0\] is '  '"),
        ("experts:\n  - negative_prompts: [x]\n", "expert 0: `positive_prompts` is missing"),
        (
            "experts:\n  - {positive_prompts: [a], negativ_prompts: [b]}\n",
            "unknown keys \\['negativ_prompts'\\]",
        ),
        ("- just a list\n", "list 1 experts"),
        ("logit_scale: -1\nexperts: [{positive_prompts: [a]}]\n", "logit_scale=-1 must be a positive number"),
        ("hello", "must be a mapping with an `experts` list"),
    ],
)
def test_bad_prompts_fail_before_writing(dense, tmp_path, content, match):
    prompts_file = tmp_path / "prompts.yaml"
    if content is not None:
        prompts_file.write_text(content)
    out = tmp_path / "moe"
    with pytest.raises(ValueError, match=match):
        upcycle(
            dense[0], out, num_experts=3, top_k=2, router_init="prompts", prompts=prompts_file, progress=False
        )
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == (
        [] if content is None else ["prompts.yaml"]
    )


def test_prompts_required_and_missing_file_is_file_not_found(dense, tmp_path):
    with pytest.raises(ValueError, match="needs prompts"):
        upcycle(dense[0], tmp_path / "moe", num_experts=3, top_k=2, router_init="prompts", progress=False)
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "nope.yaml")
    assert ROUTER_INITS["prompts"] is prompts_router  # the registry lists the prompts module's own entry


def test_special_tokens_only_prompt_is_refused(dense):
    with pytest.raises(ValueError, match="special tokens only"):
        router_rows_from_dir(dense[0], ["<s>", "a", "b"], num_experts=3, layers=[0])


def test_same_positive_and_negative_is_refused(dense):
    spec = [{"positive_prompts": ["Hello world!"], "negative_prompts": ["Hello world!"]}, "a", "b"]
    with pytest.raises(ValueError, match="expert 0: the positive and negative prompts give the same mean"):
        router_rows_from_dir(dense[0], spec, num_experts=3, layers=[0])


def test_missing_tokenizer_is_refused(tmp_path):
    path = tmp_path / "dense"
    make_dense_llama(path, randomised=False, max_shard_size=None, tokenizer=False)
    with pytest.raises(ValueError, match="no tokenizer files"):
        router_rows_from_dir(path, PROMPTS, num_experts=3, layers=[0])


def test_cli_upcycle_router_init_prompts(dense, tmp_path, capsys):
    path, _ = dense
    prompts_file = tmp_path / "prompts.yaml"
    prompts_file.write_text(yaml.safe_dump(PROMPTS))
    out = tmp_path / "moe"
    code = cli_main(
        [
            "upcycle",
            str(path),
            str(out),
            "--num-experts",
            "3",
            "--top-k",
            "2",
            "--router-init",
            "prompts",
            "--prompts",
            str(prompts_file),
            "--no-progress",
        ]
    )
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    rows = router_rows_from_dir(path, prompts_file, num_experts=3, layers=[0, 1])
    moe = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(moe.state_dict()["model.layers.1.mlp.gate.weight"], rows[1])
    code = cli_main(
        [
            "upcycle",
            str(path),
            str(tmp_path / "moe2"),
            "--num-experts",
            "4",
            "--top-k",
            "2",
            "--router-init",
            "prompts",
            "--prompts",
            str(prompts_file),
            "--no-progress",
        ]
    )
    assert code == 2 and "list 3 experts but the model has 4" in capsys.readouterr().err
    assert not (tmp_path / "moe2").exists()
