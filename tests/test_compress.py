"""hf_moe.compress: saliency formulas, plans, and round trips through hf_moe and native checkpoints (tiny, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import hf_moe
from hf_moe import HfMoeForCausalLM
from hf_moe.compression import (
    LayerPlan,
    calibrate,
    cluster_experts,
    compress,
    find_moe_blocks,
    merge_plan,
    prune_plan,
)
from hf_moe.conversion.io import PROVENANCE_NAME
from tests.helpers.native import tiny_target_model
from tests.helpers.tiny_tokenizer import CORPUS, build_tiny_tokenizer

CALIB = [" ".join(CORPUS) * 4, " ".join(reversed(CORPUS)) * 4]


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    build_tiny_tokenizer(path, vocab_size=model.config.vocab_size)
    return path


@pytest.fixture(scope="module")
def hf_moe_dir(tmp_path_factory) -> Path:
    # 8 experts top-2, one dense layer: pruning must leave dense layers and attention alone.
    model = tiny_target_model("qwen3_moe", num_experts=8, num_experts_per_tok=2)
    return _save(model, tmp_path_factory.mktemp("src") / "moe")


def _logits(model_dir: Path, cls=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = (cls or AutoModelForCausalLM).from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 17, 42, 5, 63, 8, 21, 33, 9, 70]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _capture(store: dict):
    def hook(module, args) -> None:  # the MoE block's input, (T, H)
        store.setdefault("h", args[0].reshape(-1, args[0].shape[-1]).detach())

    return hook


# ------------------------------------------------------------------------------------------------------------
# Saliency formulas against a hand computation.
# ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_saliency_matches_hand_computation(hf_moe_dir):
    model = HfMoeForCausalLM.from_pretrained(hf_moe_dir, dtype=torch.float32).eval()
    layer = model.config.moe_layers[0]
    block = model.model.layers[layer].mlp
    captured = {}
    handle = block.register_forward_pre_hook(_capture(captured))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_moe_dir)
    stats = calibrate(model, CALIB, tokenizer=tok, calib_tokens=40, seq_len=40, batch_size=1, progress=False)
    handle.remove()
    assert stats.tokens == 40
    # By hand: route the captured tokens, run each chosen expert as explicit matrices.
    h = captured["h"]  # (T, H)
    logits = h @ block.gate.weight.T  # (T, E)
    probs = logits.softmax(-1)
    w, idx = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)  # norm_topk_prob
    E = block.experts.num_experts
    count, reap = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
    for t in range(h.shape[0]):
        for k in range(2):
            e = int(idx[t, k])
            gate, up = (block.experts.gate_up_proj[e] @ h[t]).chunk(2)
            y = block.experts.down_proj[e] @ (F.silu(gate) * up)
            count[e] += 1
            reap[e] += float(w[t, k]) * float(y.norm())
    got = stats.layers[layer]
    torch.testing.assert_close(got.count, count)
    want_reap = torch.where(count > 0, reap / count.clamp_min(1), torch.zeros_like(reap))
    torch.testing.assert_close(stats.saliency("reap", layer), want_reap, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.saliency("frequency", layer), count)
    assert count.sum() == 2 * 40 and (count > 0).sum() >= 3  # the test routes to several experts


def test_merge_statistics_are_mean_expert_outputs(hf_moe_dir):
    from transformers import AutoTokenizer

    model = HfMoeForCausalLM.from_pretrained(hf_moe_dir, dtype=torch.float32).eval()
    layer = model.config.moe_layers[-1]
    block = model.model.layers[layer].mlp
    captured = {}
    block.register_forward_pre_hook(_capture(captured))
    tok = AutoTokenizer.from_pretrained(hf_moe_dir)
    stats = calibrate(
        model, CALIB, tokenizer=tok, calib_tokens=24, seq_len=24, need_outputs=True, progress=False
    )
    h = captured["h"]
    for e in range(block.experts.num_experts):
        gate, up = (h @ block.experts.gate_up_proj[e].T).chunk(2, dim=-1)
        want = ((F.silu(gate) * up) @ block.experts.down_proj[e].T).mean(0)
        torch.testing.assert_close(stats.layers[layer].mean_outputs()[e].float(), want, rtol=1e-4, atol=1e-5)


def test_prune_plan_keeps_most_salient_per_group():
    s = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3, 0.0, 2.0, 0.2], dtype=torch.float64)
    assert prune_plan(s, 3).groups == ((1,), (2,), (6,))
    # Two groups of 4: two per group, ties go to the lower index; group membership is kept.
    assert prune_plan(s, 2, n_group=2).groups == ((1,), (2,), (4,), (6,))


def test_cluster_and_merge_plan():
    base = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    # Experts 0 and 3 nearly alike, 1 and 4 alike, 2 alone.
    features = torch.stack([base[0], base[1], base[2], base[0] + 0.01, base[1] * 2])
    assert cluster_experts(features, 3) == [[0, 3], [1, 4], [2]]
    plan = merge_plan(features, torch.tensor([3.0, 1.0, 5.0, 1.0, 0.0]), 3)
    assert plan.groups == ((0, 3), (1, 4), (2,))
    assert plan.weights[0] == pytest.approx((0.75, 0.25)) and plan.weights[1] == pytest.approx((1.0, 0.0))


# ------------------------------------------------------------------------------------------------------------
# hf_moe checkpoints.
# ------------------------------------------------------------------------------------------------------------


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for name in fa.keys():
            assert torch.equal(fa.get_tensor(name), fb.get_tensor(name)), name


# Same weights give logits equal to ~1 ulp, not bit for bit: the CPU GEMM kernels' summation order depends on the
# alignment of the memory-mapped tensors, which differs between two files.
SAME = dict(rtol=1e-6, atol=1e-6)


def test_keep_all_is_identical(hf_moe_dir, tmp_path):
    out = compress(
        hf_moe_dir, tmp_path / "all", keep=1.0, method="reap", calib=CALIB, calib_tokens=64, progress=False
    )
    _assert_same_checkpoint(out, hf_moe_dir)
    torch.testing.assert_close(_logits(out), _logits(hf_moe_dir), **SAME)


@pytest.mark.parametrize("method", ["reap", "frequency", "random"])
def test_prune_hf_moe(hf_moe_dir, tmp_path, method):
    out = compress(
        hf_moe_dir, tmp_path / method, keep=0.5, method=method, calib=CALIB, calib_tokens=64, progress=False
    )
    model = HfMoeForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 2
    provenance = json.loads((out / PROVENANCE_NAME).read_text())
    comp = provenance["compression"]
    src = HfMoeForCausalLM.from_pretrained(hf_moe_dir)
    for layer, info in comp["layers"].items():
        kept = [g[0] for g in info["new_to_old"]]
        assert len(kept) == 4 and sorted(kept + info["removed"]) == list(range(8))
        new, old = model.model.layers[int(layer)].mlp, src.model.layers[int(layer)].mlp
        torch.testing.assert_close(new.experts.gate_up_proj, old.experts.gate_up_proj[kept], rtol=0, atol=0)
        torch.testing.assert_close(new.experts.down_proj, old.experts.down_proj[kept], rtol=0, atol=0)
        torch.testing.assert_close(new.gate.weight, old.gate.weight[kept], rtol=0, atol=0)
    assert comp["params_after"]["total"] < comp["params_before"]["total"]
    # Same top-k: the active parameters lose only the removed router rows (4 of 64 numbers, 2 MoE layers).
    assert comp["params_after"]["active"] == comp["params_before"]["active"] - 4 * 64 * 2
    if method != "random":
        assert comp["calibration"]["tokens"] == 64 and len(comp["calibration"]["text_sha256"]) == 64
    assert "compress" in (out / "README.md").read_text()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left behind


def test_reap_keeps_the_salient_experts(hf_moe_dir, tmp_path):
    stats = calibrate(hf_moe_dir, CALIB, calib_tokens=64, seq_len=64, progress=False)
    out = compress(hf_moe_dir, tmp_path / "reap", keep=0.25, statistics=stats, calib=CALIB, progress=False)
    comp = json.loads((out / PROVENANCE_NAME).read_text())["compression"]
    for layer, info in comp["layers"].items():
        best = torch.argsort(-stats.saliency("reap", int(layer)), stable=True)[:2].sort().values.tolist()
        assert [g[0] for g in info["new_to_old"]] == best


def test_prune_clips_top_k(hf_moe_dir, tmp_path):
    out = compress(
        hf_moe_dir,
        tmp_path / "one",
        keep=0.125,
        method="frequency",
        calib=CALIB,
        calib_tokens=32,
        progress=False,
    )
    model = HfMoeForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 1 and model.config.num_experts_per_tok == 1
    assert torch.isfinite(_logits(out)).all()


def test_merge_hf_moe(hf_moe_dir, tmp_path):
    out = compress(
        hf_moe_dir,
        tmp_path / "merged",
        keep=0.5,
        method="frequency",
        merge=True,
        calib=CALIB,
        calib_tokens=64,
        progress=False,
    )
    model = HfMoeForCausalLM.from_pretrained(out)
    src = HfMoeForCausalLM.from_pretrained(hf_moe_dir)
    comp = json.loads((out / PROVENANCE_NAME).read_text())["compression"]
    assert model.config.num_experts == 4
    for layer, info in comp["layers"].items():
        weights = comp["merge_weights"][layer]
        for j, (members, w) in enumerate(zip(info["new_to_old"], weights, strict=True)):
            assert sum(w) == pytest.approx(1.0)
            old = src.model.layers[int(layer)].mlp
            want = sum(wm * old.experts.down_proj[m] for m, wm in zip(members, w, strict=True))
            torch.testing.assert_close(model.model.layers[int(layer)].mlp.experts.down_proj[j], want)
            want_row = sum(wm * old.gate.weight[m] for m, wm in zip(members, w, strict=True))
            torch.testing.assert_close(model.model.layers[int(layer)].mlp.gate.weight[j], want_row)
        assert sum(len(m) for m in info["new_to_old"]) == 8 and info["removed"] == []
    assert torch.isfinite(_logits(out)).all()


def test_merge_identical_experts_is_exact(tmp_path):
    # Four experts that are two pairs of copies (same router rows too): merging each pair changes nothing.
    model = tiny_target_model("mixtral", num_experts=4, num_experts_per_tok=1)
    with torch.no_grad():
        for i in model.config.moe_layers:
            mlp = model.model.layers[i].mlp
            for dst, srcs in ((2, 0), (3, 1)):
                mlp.experts.gate_up_proj[dst] = mlp.experts.gate_up_proj[srcs]
                mlp.experts.down_proj[dst] = mlp.experts.down_proj[srcs]
    src = _save(model, tmp_path / "src")
    out = compress(
        src,
        tmp_path / "out",
        keep=0.5,
        merge=True,
        method="frequency",
        calib=CALIB,
        calib_tokens=64,
        progress=False,
    )
    comp = json.loads((out / PROVENANCE_NAME).read_text())["compression"]
    assert all(info["new_to_old"] == [[0, 2], [1, 3]] for info in comp["layers"].values())


def test_router_recovery_changes_only_routers_and_lowers_kl(hf_moe_dir, tmp_path):
    out = compress(
        hf_moe_dir,
        tmp_path / "rr",
        keep=0.5,
        method="random",
        calib=CALIB,
        calib_tokens=64,
        seq_len=32,
        recover_router=6,
        recover_lr=1e-2,
        batch_size=2,
        progress=False,
    )
    plain = compress(hf_moe_dir, tmp_path / "plain", keep=0.5, method="random", progress=False)
    recovery = json.loads((out / PROVENANCE_NAME).read_text())["compression"]["recovery"]
    assert recovery["kl_last_step"] < recovery["kl_first_step"]
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(plain / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        changed = {n for n in a.keys() if not torch.equal(a.get_tensor(n), b.get_tensor(n))}
    assert changed and all(n.endswith("mlp.gate.weight") for n in changed)


def test_errors(hf_moe_dir, tmp_path):
    with pytest.raises(ValueError, match="overlaps the input"):
        compress(hf_moe_dir, hf_moe_dir / "inside", method="random")
    with pytest.raises(ValueError, match="needs calibration text"):
        compress(hf_moe_dir, tmp_path / "x", method="reap")
    with pytest.raises(ValueError, match="with router recovery needs calibration text"):
        compress(hf_moe_dir, tmp_path / "x", method="random", recover_router=2)
    with pytest.raises(ValueError, match="merge=True"):
        compress(hf_moe_dir, tmp_path / "x", method="random", merge=True, calib=CALIB)
    with pytest.raises(ValueError, match="keep=0"):
        compress(hf_moe_dir, tmp_path / "x", keep=0, method="random")
    with pytest.raises(ValueError, match="unknown method"):
        compress(hf_moe_dir, tmp_path / "x", method="magnitude")
    with pytest.raises(FileNotFoundError, match="calibration file"):
        compress(hf_moe_dir, tmp_path / "x", calib=tmp_path / "missing.txt")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        compress(hf_moe_dir, tmp_path / "exists", method="random")


def test_cli_and_lazy_export(hf_moe_dir, tmp_path):
    from hf_moe.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB))
    assert (
        main(
            [
                "compress",
                str(hf_moe_dir),
                str(tmp_path / "cli"),
                "--keep",
                "0.5",
                "--method",
                "frequency",
                "--calib",
                str(calib),
                "--calib-tokens",
                "64",
            ]
        )
        == 0
    )
    assert HfMoeForCausalLM.from_pretrained(tmp_path / "cli").config.num_experts == 4
    assert hf_moe.compress is compress

    # `hf-moe inspect` shows, per layer, which experts were removed.
    provenance = json.loads((tmp_path / "cli" / "hf_moe_provenance.json").read_text())
    layers = provenance["compression"]["layers"]
    (tmp_path / "text.txt").write_text(" ".join(CORPUS) * 3)
    done = subprocess.run(
        [sys.executable, "-m", "hf_moe.cli", "inspect", str(tmp_path / "cli"), "--text", str(tmp_path / "text.txt"),
         "--max-tokens", "32", "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compressed (pruned, frequency): 8 -> 4 experts per layer" in done.stdout
    for layer, info in layers.items():
        removed = ", ".join(str(e) for e in info["removed"])
        assert any(line.split()[:1] == [layer] and removed in line for line in done.stdout.splitlines()), (
            layer
        )


# ------------------------------------------------------------------------------------------------------------
# Native checkpoints: the output stays native and loads in transformers' own class.
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["mixtral", "qwen3_moe"])
def test_native_round_trip(tmp_path, target):
    import transformers

    from hf_moe import export

    src = _save(tiny_target_model(target, num_experts=8, num_experts_per_tok=2), tmp_path / "hf")
    native = export(src, tmp_path / "native", to=target)
    cls = getattr(transformers, {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[target])
    same = compress(native, tmp_path / "same", keep=1.0, calib=CALIB, calib_tokens=64, progress=False)
    _assert_same_checkpoint(same, native)
    torch.testing.assert_close(_logits(same, cls), _logits(native, cls), **SAME)
    out = compress(
        native, tmp_path / "out", keep=0.5, method="reap", calib=CALIB, calib_tokens=64, progress=False
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == target and config["architectures"] == [cls.__name__]
    model = cls.from_pretrained(out)
    assert type(model) is cls and model.config.num_experts_per_tok == 2
    blocks = find_moe_blocks(model)
    assert blocks and all(b.experts.gate_up_proj.shape[0] == 4 for b in blocks.values())
    # The compressed native model equals the same pruning applied to the hf_moe model (compress of the source).
    ours = compress(
        src, tmp_path / "ours", keep=0.5, method="reap", calib=CALIB, calib_tokens=64, progress=False
    )
    torch.testing.assert_close(_logits(out, cls), _logits(ours), rtol=1e-4, atol=1e-5)
    merged = compress(
        native,
        tmp_path / "merged",
        keep=0.5,
        merge=True,
        method="frequency",
        calib=CALIB,
        calib_tokens=64,
        progress=False,
    )
    assert torch.isfinite(_logits(merged, cls)).all()
    assert "| layer | removed |" in (out / "README.md").read_text()


def test_deepseek_v3_round_trip(tmp_path):
    import transformers

    config = transformers.DeepseekV3Config(
        vocab_size=99,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for block in find_moe_blocks(model).values():
            block.gate.weight.normal_(0, 0.5)
            block.gate.e_score_correction_bias.normal_(0, 0.1)
    src = _save(model, tmp_path / "ds")
    same = compress(src, tmp_path / "same", keep=1.0, calib=CALIB, calib_tokens=64, progress=False)
    cls = transformers.DeepseekV3ForCausalLM
    _assert_same_checkpoint(same, src)
    torch.testing.assert_close(_logits(same, cls), _logits(src, cls), **SAME)
    out = compress(
        src, tmp_path / "out", keep=0.5, method="reap", calib=CALIB, calib_tokens=64, progress=False
    )
    pruned = cls.from_pretrained(out)
    comp = json.loads((out / PROVENANCE_NAME).read_text())["compression"]
    src_model = cls.from_pretrained(src)
    for layer, info in comp["layers"].items():
        kept = [g[0] for g in info["new_to_old"]]
        # Two of each group of four: the groups survive.
        assert sum(e < 4 for e in kept) == 2 and sum(e >= 4 for e in kept) == 2
        new, old = pruned.model.layers[int(layer)].mlp, src_model.model.layers[int(layer)].mlp
        torch.testing.assert_close(new.gate.e_score_correction_bias, old.gate.e_score_correction_bias[kept])
        torch.testing.assert_close(new.experts.down_proj, old.experts.down_proj[kept])
    assert pruned.config.n_routed_experts == 4 and pruned.config.n_group == 2
    assert torch.isfinite(_logits(out, cls)).all()


def test_layer_plan_describe():
    plan = LayerPlan(groups=((0, 3), (1,)), weights=((0.5, 0.5), (1.0,)))
    assert plan.describe(4) == {"new_to_old": [[0, 3], [1]], "removed": [2], "merged": {"0": [0, 3]}}


@pytest.mark.parametrize("target", ["qwen2_moe", "glm4_moe"])
def test_native_shared_expert_families(tmp_path, target):
    # Shared experts (and Qwen2-MoE's shared-expert gate) are not routed experts: copied unchanged.
    import transformers

    from hf_moe import export

    overrides = (
        {"n_group": 2, "topk_group": 1} if target == "glm4_moe" else {}
    )  # 8 experts in 2 groups, top-3
    src = _save(tiny_target_model(target, **overrides), tmp_path / "hf")
    native = export(src, tmp_path / "native", to=target)
    out = compress(
        native, tmp_path / "out", keep=0.5, method="reap", calib=CALIB, calib_tokens=64, progress=False
    )
    cls = getattr(transformers, json.loads((native / "config.json").read_text())["architectures"][0])
    model = cls.from_pretrained(out)
    assert type(model) is cls and torch.isfinite(_logits(out, cls)).all()
    if target == "glm4_moe":
        # 2 of each group of 4 kept; only topk_group=1 group is eligible per token, so top-3 is clipped to 2.
        assert model.config.n_routed_experts == 4 and model.config.num_experts_per_tok == 2
        with pytest.raises(ValueError, match="keep at least 2 per group"):
            compress(native, tmp_path / "one", keep=0.25, method="random")
    with safe_open(native / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        shared = [n for n in a.keys() if "shared_expert" in n]
        assert shared and all(torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in shared)


def test_olmoe_round_trip(tmp_path):
    import transformers

    config = transformers.OlmoeConfig(
        vocab_size=99,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    src = _save(transformers.OlmoeForCausalLM(config).eval(), tmp_path / "olmoe")
    out = compress(
        src,
        tmp_path / "out",
        keep=0.5,
        method="frequency",
        merge=True,
        calib=CALIB,
        calib_tokens=64,
        progress=False,
    )
    model = transformers.OlmoeForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 4 and torch.isfinite(_logits(out, transformers.OlmoeForCausalLM)).all()
