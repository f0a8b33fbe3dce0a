"""Router inspection: statistics over a text match a hand computation on a tiny model whose routing is set by hand,
and the heatmap PNG is written."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from hf_moe import HfMoeForCausalLM, cli
from hf_moe.plotting import chunk_token_ids, plot_expert_load, routing_statistics_for_ids
from tests.helpers.tiny import tiny_config

# Router logits for the two token classes: softmax gives [1/2, 1/4, 1/8, 1/8] and its mirror image.
LOGITS_A = [math.log(4), math.log(2), 0.0, 0.0]  # top-2 = experts {0, 1}
LOGITS_B = [0.0, 0.0, math.log(2), math.log(4)]  # top-2 = experts {3, 2}
# Entropy of [1/2, 1/4, 1/8, 1/8] in nats: 1/2 ln 2 + 1/4 ln 4 + 2 * 1/8 ln 8 = 1.75 ln 2.
ENTROPY = 1.75 * math.log(2)


def hand_routed_model(**overrides) -> HfMoeForCausalLM:
    """A tiny model whose routing depends only on the token id's parity.

    Token t embeds as the basis vector e_{t mod 2}; attention and experts output zero (o_proj, down_proj = 0), so every
    layer's router sees RMSNorm(e_j) = sqrt(H) e_j, and router column j is set to logits / sqrt(H). Layer 0 routes
    even tokens with LOGITS_A and odd tokens with LOGITS_B; layer 1 the other way round.
    """
    config = tiny_config(rms_norm_eps=1e-12, **overrides)
    torch.manual_seed(0)
    model = HfMoeForCausalLM(config).eval()
    hidden = config.hidden_size
    with torch.no_grad():
        embed = torch.zeros(config.vocab_size, hidden)
        embed[0::2, 0] = 1.0
        embed[1::2, 1] = 1.0
        model.model.embed_tokens.weight.copy_(embed)
        for layer_idx, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            first, second = (LOGITS_A, LOGITS_B) if layer_idx == 0 else (LOGITS_B, LOGITS_A)
            weight = torch.zeros(config.num_experts, hidden)
            weight[:, 0] = torch.tensor(first) / math.sqrt(hidden)
            weight[:, 1] = torch.tensor(second) / math.sqrt(hidden)
            layer.mlp.gate.weight.copy_(weight)
    return model


def test_statistics_match_hand_computation() -> None:
    model = hand_routed_model()
    # Three even tokens (class A), one odd (class B); seq_len 3 pads the second row with one pad token (id 0, which
    # would count as class A if padding leaked into the figures).
    stats = routing_statistics_for_ids(model, [2, 4, 6, 3], seq_len=3)
    assert stats.num_tokens == 4
    # Layer 0: A -> {0, 1} three times, B -> {2, 3} once; layer 1 mirrored.
    assert stats.tokens_per_expert == [[3, 3, 1, 1], [1, 1, 3, 3]]
    assert stats.expert_load[0] == pytest.approx([3 / 8, 3 / 8, 1 / 8, 1 / 8])
    assert stats.expert_load[1] == pytest.approx([1 / 8, 1 / 8, 3 / 8, 3 / 8])
    assert stats.dropped_fraction == [0.0, 0.0]
    assert stats.entropy == pytest.approx([ENTROPY, ENTROPY], abs=1e-5)


def test_capacity_drops_match_hand_computation() -> None:
    model = hand_routed_model(router_type="switch", num_experts_per_tok=1, capacity_factor=1.0)
    # Switch top-1: class A -> expert 0 (p = 1/2), class B -> expert 3 in layer 0. Four tokens, capacity
    # ceil(1.0 * 4 / 4) = 1 per expert: expert 0 keeps the first of its three tokens, drops two.
    stats = routing_statistics_for_ids(model, [2, 4, 6, 3], seq_len=4)
    assert stats.tokens_per_expert == [[1, 0, 0, 1], [1, 0, 0, 1]]
    assert stats.expert_load == [[0.5, 0.0, 0.0, 0.5], [0.5, 0.0, 0.0, 0.5]]
    assert stats.dropped_fraction == [0.5, 0.5]
    assert stats.entropy == pytest.approx([ENTROPY, ENTROPY], abs=1e-5)


def test_chunking_pads_and_masks() -> None:
    ids, mask = chunk_token_ids([5, 6, 7, 8, 9], seq_len=2, pad_token_id=0)
    assert ids.tolist() == [[5, 6], [7, 8], [9, 0]]
    assert mask.tolist() == [[1, 1], [1, 1], [1, 0]]
    with pytest.raises(ValueError, match="zero tokens"):
        chunk_token_ids([], seq_len=2, pad_token_id=0)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(tmp_path: Path) -> None:
    stats = routing_statistics_for_ids(hand_routed_model(), [2, 4, 6, 3], seq_len=4)
    path = plot_expert_load(stats, tmp_path / "plots" / "load.png", dpi=100)
    width, height = _png_size(path)
    assert width >= 300 and height >= 200
    assert [p.name for p in path.parent.iterdir()] == ["load.png"]  # no temporary file left behind


def test_cli_inspect(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.helpers.tiny_tokenizer import build_tiny_tokenizer

    model_dir = tmp_path / "model"
    hand_routed_model().save_pretrained(model_dir)
    tokenizer = build_tiny_tokenizer(model_dir, vocab_size=99)
    text = "To be, or not to be, that is the question. The quick brown fox jumps over the lazy dog."
    (tmp_path / "text.txt").write_text(text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:16]
    n_a = sum(1 for t in ids if t % 2 == 0)
    n_b = len(ids) - n_a
    assert n_a and n_b  # the text exercises both classes

    code = cli.main(
        [
            "inspect",
            str(model_dir),
            "--text",
            str(tmp_path / "text.txt"),
            "--max-tokens",
            "16",
            "--seq-len",
            "5",
            "--plot",
            str(tmp_path / "load.png"),
            "--json",
            str(tmp_path / "stats.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["num_tokens"] == 16
    assert stats["tokens_per_expert"] == [[n_a, n_a, n_b, n_b], [n_b, n_b, n_a, n_a]]
    assert stats["entropy"] == pytest.approx([ENTROPY, ENTROPY], abs=1e-5)
    load_a, load_b = n_a / 32, n_b / 32
    assert f"{load_a:.3f} {load_a:.3f} {load_b:.3f} {load_b:.3f}" in out  # the table row of layer 0
    assert _png_size(tmp_path / "load.png")[0] > 0

    assert cli.main(["inspect", str(model_dir), "--text", str(tmp_path / "missing.txt")]) == 2
    (tmp_path / "bare").mkdir()
    hand_routed_model().save_pretrained(tmp_path / "bare")
    assert cli.main(["inspect", str(tmp_path / "bare"), "--text", str(tmp_path / "text.txt")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
