"""Model cards (metadata, parameter counts, provenance) and `push` up to the network boundary.

The push tests run the real `huggingface_hub.HfApi` against a loopback HTTP server started here that answers the
Hub endpoints `upload_folder` uses (create repo, branch, validate-yaml, preupload, commit) and records every
request, so the file list, the calls and the token handling are checked on the wire.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from hf_moe import HfMoeForCausalLM, cli
from hf_moe.hub import (
    count_parameters,
    count_parameters_on_disk,
    files_to_push,
    parameters_on_disk_by_component,
    push_to_hub,
    render_model_card,
    write_model_card,
)
from tests.helpers.cards import assert_hub_ready, expert_share, tiny_dense_llama
from tests.helpers.tiny import ROUTER_CASES, tiny_config, tiny_model

TOKEN = "hf_FAKEtokenThatMustNeverBeLogged1234"

# Configs covering every parameter-count branch: each router, shared experts (gated), dense layers, q/k norm, biases,
# tied embeddings, sparse step.
COUNT_CASES = {
    **{f"router-{name}": dict(router_type=name, **extra) for name, extra in ROUTER_CASES.items()},
    "shared-gated-dense-first": dict(num_shared_experts=2, shared_expert_gate=True, first_k_dense_replace=1),
    "qk-norm-biases-tied": dict(base_model_type="qwen3", attention_bias=True, tie_word_embeddings=True),
    "sparse-step-head-dim": dict(decoder_sparse_step=2, head_dim=16, mlp_only_layers=[0]),
}


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
def test_parameter_counts_match_the_model(case: str) -> None:
    config = tiny_config(**COUNT_CASES[case])
    with torch.device("meta"):
        model = HfMoeForCausalLM(config)
    counts = count_parameters(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.active == expert_share(model)
    assert counts.active < counts.total


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
def test_disk_components_match_the_config(case: str, tmp_path: Path) -> None:
    model = tiny_model(**COUNT_CASES[case])
    model.save_pretrained(tmp_path)
    on_disk = parameters_on_disk_by_component(tmp_path, tie_word_embeddings=model.config.tie_word_embeddings)
    counts = count_parameters(model.config)
    assert "other" not in on_disk  # every saved tensor is recognised
    assert on_disk == {k: v for k, v in vars(counts).items() if k != "routed_experts_active" and v}


def test_tied_lm_head_counted_once_and_buffers_excluded(tmp_path: Path) -> None:
    model = tiny_model(tie_word_embeddings=True, router_type="sigmoid_topk", n_group=2)
    model.save_pretrained(tmp_path)
    on_disk = count_parameters_on_disk(tmp_path, tie_word_embeddings=True)
    assert on_disk == count_parameters(model.config).total == sum(p.numel() for p in model.parameters())


def _saved_tiny(tmp_path: Path, **overrides) -> Path:
    out = tmp_path / "tiny-moe"
    tiny_model(**overrides).save_pretrained(out)
    return out


def test_card_metadata_parses_and_states_counts(tmp_path: Path) -> None:
    model_dir = _saved_tiny(tmp_path, num_shared_experts=1)
    path = write_model_card(model_dir, eval_results={"wikitext_ppl": 12.345, "note": "tiny"})
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert {"moe", "mixture-of-experts", "hf-moe"} <= set(data["tags"])
    # No provenance, no license given: "other" and a visible note, never a guessed licence.
    assert data["license"] == "other"
    assert "License unknown" in card.text
    assert "base_model" not in data
    counts = count_parameters(HfMoeForCausalLM.config_class.from_pretrained(model_dir))
    assert f"| Total | {counts.total:,} " in card.text
    assert f"| Active per token | {counts.active:,} " in card.text
    assert "| wikitext_ppl | 12.35 |" in card.text
    assert (
        "trust_remote_code=True" in card.text
        and "lora_config" in card.text
        and "from vllm import LLM" in card.text
    )


def test_card_renders_provenance(tmp_path: Path) -> None:
    from hf_moe.conversion.io import write_provenance

    source = tmp_path / "dense"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (source / "model.safetensors").write_bytes(b"not really weights")
    model_dir = _saved_tiny(tmp_path)
    write_provenance(
        model_dir,
        source=source,
        method="upcycle",
        options={"num_experts": 4, "num_experts_per_tok": 2},
        source_files=[source / "model.safetensors"],
        extra={"license": "apache-2.0", "base_model": "HuggingFaceTB/SmolLM2-135M"},
    )
    card = ModelCard.load(write_model_card(model_dir))
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert (
        data["base_model_relation"] == "finetune"
    )  # one of the Hub's values: adapter, merge, quantized, finetune
    import hashlib

    digest = hashlib.sha256(b"not really weights").hexdigest()
    assert f"| `model.safetensors` | `{digest}` |" in card.text
    assert "Method: **upcycle**" in card.text
    assert "| `num_experts_per_tok` | `2` |" in card.text


def test_local_source_path_is_not_a_base_model(tmp_path: Path) -> None:
    # A provenance source that is a local folder must not become `base_model` (the Hub rejects non-repo ids).
    text = render_model_card(
        tiny_config(), provenance={"method": "upcycle", "source": {"path": str(tmp_path)}}, license="mit"
    )
    metadata = yaml.safe_load(text.split("---")[1])
    assert "base_model" not in metadata and "base_model_relation" not in metadata
    assert metadata["license"] == "mit"


def test_card_refuses_tensors_that_do_not_match_the_config(tmp_path: Path) -> None:
    model_dir = _saved_tiny(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_experts"] = 8  # the safetensors still hold 4 experts per layer
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="routed_experts: 12,288 on disk vs 24,576 from the config.*do not belong"
    ):
        write_model_card(model_dir)
    assert not (model_dir / "README.md").exists()


def test_card_refuses_non_hf_moe_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        write_model_card(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        write_model_card(tmp_path)


def test_cli_card(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir = _saved_tiny(tmp_path)
    assert cli.main(["card", str(model_dir), "--license", "apache-2.0", "--eval", "ppl=3.5"]) == 0
    assert capsys.readouterr().out.strip() == str(model_dir / "README.md")
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.license == "apache-2.0" and "| ppl | 3.5 |" in card.text
    assert cli.main(["card", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err


# ================================================================================================================
# push
# ================================================================================================================


class _FakeHub(BaseHTTPRequestHandler):
    """The Hub endpoints `create_repo` / `create_branch` / `upload_folder` call, answering as the Hub does."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _reply(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(
            {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
        )
        host = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            return self._reply(200, {"url": f"{host}/{payload['organization']}/{payload['name']}"})
        if self.path == "/api/validate-yaml":
            metadata = yaml.safe_load(json.loads(body)["content"].split("---")[1])
            return self._reply(200 if isinstance(metadata, dict) else 400, {"warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._reply(200, {"files": modes})
        if "/commit/" in self.path:
            if self.server.fail_commit:
                return self._reply(401, {"error": "Invalid username or password."})
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            return self._reply(200, {"commitUrl": f"{host}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        if "/branch/" in self.path:
            return self._reply(200, {})
        return self._reply(404, {"error": f"unexpected endpoint {self.path}"})


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    server.requests = []
    server.fail_commit = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _endpoint(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _committed_files(server) -> dict[str, bytes]:
    commit = next(r for r in server.requests if "/commit/" in r["path"])
    files = {}
    for line in commit["body"].decode().splitlines():
        entry = json.loads(line)
        if entry["key"] == "file":
            files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
    return files


@pytest.fixture
def card_dir(tmp_path: Path) -> Path:
    model_dir = _saved_tiny(tmp_path)
    write_model_card(model_dir, license="apache-2.0")
    (model_dir / "notes.log").write_text("local notes, not for the Hub")
    (model_dir / ".cache").mkdir()
    (model_dir / ".cache" / "x.json").write_text("{}")
    return model_dir


def test_files_to_push_refuses_pickles_and_missing_card(card_dir: Path) -> None:
    remote_code = [p.name for p in card_dir.glob("*.py")]  # the modeling files save_pretrained copies
    assert {"configuration_hf_moe.py", "modeling_hf_moe.py"} <= set(remote_code)
    assert files_to_push(card_dir) == sorted(
        ["README.md", "config.json", "generation_config.json", "model.safetensors", *remote_code]
    )
    (card_dir / "chat_template.jinja").write_text("{{ messages }}")  # transformers 5's chat template file
    assert "chat_template.jinja" in files_to_push(card_dir)
    (card_dir / "chat_template.jinja").unlink()
    (card_dir / "training_args.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match=r"pickle files \(training_args.bin\)"):
        files_to_push(card_dir)
    (card_dir / "training_args.bin").unlink()
    (card_dir / "README.md").unlink()
    with pytest.raises(FileNotFoundError, match="hf-moe card"):
        files_to_push(card_dir)


def test_push_uploads_the_folder(card_dir: Path, fake_hub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = push_to_hub(
        card_dir, "alice/tiny-moe", token=TOKEN, endpoint=_endpoint(fake_hub), revision="dev", private=True
    )
    assert url.endswith(f"/alice/tiny-moe/commit/{'a' * 40}")
    paths = [r["path"] for r in fake_hub.requests]
    assert paths == [
        "/api/repos/create",
        "/api/models/alice/tiny-moe/branch/dev",
        "/api/validate-yaml",
        "/api/models/alice/tiny-moe/preupload/dev",
        "/api/models/alice/tiny-moe/commit/dev",
    ]
    create = json.loads(fake_hub.requests[0]["body"])
    assert create["name"] == "tiny-moe" and create["organization"] == "alice"
    assert create.get("private") is True or create.get("visibility") == "private"
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.requests)
    committed = _committed_files(fake_hub)
    assert sorted(committed) == files_to_push(card_dir)  # no notes.log, no hidden files
    assert committed["model.safetensors"] == (card_dir / "model.safetensors").read_bytes()
    assert TOKEN not in caplog.text


def test_push_error_never_shows_the_token(
    card_dir: Path,
    fake_hub,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_hub.fail_commit = True
    monkeypatch.setenv("HF_ENDPOINT", _endpoint(fake_hub))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", _endpoint(fake_hub))
    code = cli.main(["-v", "push", str(card_dir), "alice/tiny-moe", "--token", TOKEN])
    captured = capsys.readouterr()
    assert code == 1
    assert "HTTP 401" in captured.err
    assert any("/commit/" in r["path"] for r in fake_hub.requests)  # the failure came from the server
    assert TOKEN not in captured.err + captured.out + caplog.text


def test_push_refuses_bad_folders_before_any_request(tmp_path: Path, fake_hub, capsys) -> None:
    model_dir = _saved_tiny(tmp_path)  # no card
    with pytest.raises(FileNotFoundError, match="README.md"):
        push_to_hub(model_dir, "alice/tiny-moe", token=TOKEN, endpoint=_endpoint(fake_hub))
    with pytest.raises(ValueError, match="owner/name"):
        push_to_hub(model_dir, "not a repo id", token=TOKEN, endpoint=_endpoint(fake_hub))
    assert fake_hub.requests == []
    assert cli.main(["push", str(model_dir), "alice/tiny-moe", "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert "README.md" in err and TOKEN not in err


# ================================================================================================================
# upcycled models
# ================================================================================================================


def test_card_of_an_upcycled_model(tmp_path: Path) -> None:
    import hashlib

    from transformers import AutoModelForCausalLM

    from hf_moe import upcycle

    dense = tiny_dense_llama(tmp_path / "dense")
    dense_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(dense).parameters())
    out = upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    card = ModelCard.load(write_model_card(out, eval_results={"ppl_delta_vs_dense": 0.0}))
    assert card.data.license == "apache-2.0"  # read from the source folder's own card
    assert "carried from the source model's own card" in card.text
    assert card.data.base_model is None  # the source is a local folder, not a Hub repo
    # By hand: 2 layers, each MLP (3 * 32 * 64 = 6144) copied into 4 experts plus a 4 x 32 router; top-2 active.
    mlp, router = 3 * 32 * 64, 4 * 32
    total = dense_params + 2 * (3 * mlp + router)
    active = dense_params + 2 * (mlp + router)
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in moe.parameters()) == total
    assert f"| Total | {total:,} " in card.text and f"| Active per token | {active:,} " in card.text
    assert "Method: **upcycle**" in card.text and "| `top_k` | `2` |" in card.text
    digest = hashlib.sha256((dense / "model.safetensors").read_bytes()).hexdigest()
    assert f"| `model.safetensors` | `{digest}` |" in card.text
    assert "Function preserving: `True`" in card.text


def test_upcycled_card_without_known_license(tmp_path: Path) -> None:
    from hf_moe import upcycle

    dense = tiny_dense_llama(tmp_path / "dense", license=None)
    out = upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    card = ModelCard.load(write_model_card(out))
    assert card.data.license == "other" and "License unknown" in card.text
    card = ModelCard.load(write_model_card(out, license="mit", base_model="someone/tiny-llama"))
    assert card.data.license == "mit" and card.data.base_model == "someone/tiny-llama"
    assert card.data.base_model_relation == "finetune"


def test_card_keeps_a_hand_written_readme(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir = _saved_tiny(tmp_path)
    (model_dir / "README.md").write_text("# my own notes\n")
    with pytest.raises(FileExistsError, match="not written by hf-moe card"):
        write_model_card(model_dir)
    assert (model_dir / "README.md").read_text() == "# my own notes\n"
    assert cli.main(["card", str(model_dir)]) == 2
    assert cli.main(["card", str(model_dir), "--overwrite"]) == 0
    first = (model_dir / "README.md").read_text()
    write_model_card(model_dir, eval_results={"ppl": 2.0})  # a card it wrote is replaced without asking
    assert (model_dir / "README.md").read_text() != first


def test_counts_only_the_model_shards(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    save_file(
        {"lora_A": torch.zeros(4, 32)}, tmp_path / "adapter_model.safetensors"
    )  # an adapter saved alongside
    assert count_parameters_on_disk(tmp_path) == count_parameters(model.config).total
    write_model_card(tmp_path)  # the config check passes: the adapter is not counted
    next(p for p in tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shards that are missing"):
        count_parameters_on_disk(tmp_path)


def test_push_unreachable_hub_is_one_line_without_token(
    card_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import socket

    import huggingface_hub.constants

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert cli.main(["push", str(card_dir), "alice/tiny-moe", "--token", TOKEN]) == 1
    captured = capsys.readouterr()
    assert "could not reach the Hub" in captured.err and "Traceback" not in captured.err
    assert TOKEN not in captured.err + captured.out


# ================================================================================================================
# Hub readiness: every card we produce passes the validator; the validator catches what the Hub rejects.
# ================================================================================================================


def test_validator_reports_what_the_hub_rejects() -> None:
    from hf_moe.hub import check_model_card, validate_model_card

    good = render_model_card(tiny_config(), license="mit")
    assert validate_model_card(good) == []
    body = good.split("---", 2)[2]
    assert "no YAML metadata" in validate_model_card(body)[0]
    assert "does not parse" in " ".join(validate_model_card("---\nlicense: [mit\n---\n" + body))
    problems = " ".join(validate_model_card("---\nlicense: 3\nlibrary_name: transformers\n---\n" + body))
    assert (
        "`license` is a int" in problems and "lacks `pipeline_tag`" in problems and "lacks `tags`" in problems
    )
    meta = "---\nlicense: mit\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [moe]\n"
    problems = " ".join(
        validate_model_card(meta + "base_model: /home/me/dense\nbase_model_relation: upcycle\n---\n")
    )
    assert (
        "Hub repo ids" in problems and "not one of" in problems and "local path '/home/me/dense'" in problems
    )
    broken = meta + "---\n\n| a | b |\n|---|---|\n| x | y | z |\n| `p|q` | ok |\n\n```python\nx = 1\n"
    problems = validate_model_card(broken)
    assert sum("table row has 3 columns, the header 2" in p for p in problems) == 2  # an unescaped | splits
    assert any("never closed" in p for p in problems)
    assert validate_model_card(meta + "---\n\n| a | b |\n|---|---|\n| `p\\|q` | ok |\n") == []
    assert (
        validate_model_card(meta + "---\n\nsee https://huggingface.co/org/name/tree/main and q/k/v\n") == []
    )
    assert validate_model_card(meta + "---\n\nin C:\\Users\\me\\model\n") != []
    with pytest.raises(ValueError, match="model card is not Hub-ready: .*table"):
        check_model_card(meta + "---\n\n| a |\n| b | c |\n")


def test_card_escapes_pipes_and_redacts_paths(tmp_path: Path) -> None:
    model_dir = _saved_tiny(tmp_path)
    from hf_moe.conversion.io import write_provenance

    write_provenance(
        model_dir,
        source=tmp_path,
        method="upcycle",
        options={"note": "a|b", "adapter": str(tmp_path)},
        source_files=[],
    )
    path = write_model_card(model_dir, eval_results={"ppl | held-out": "3.0 | 3.1"}, license="mit")
    text = path.read_text()
    assert_hub_ready(text, tmp_path)
    assert "| ppl \\| held-out | 3.0 \\| 3.1 |" in text
    assert f"…/{tmp_path.name}" in text and f"local folder `{tmp_path.name}`" in text


def test_write_model_card_refuses_a_card_the_hub_would_reject(tmp_path: Path) -> None:
    model_dir = _saved_tiny(tmp_path)
    template = tmp_path / "broken.md"
    template.write_text("---\n${metadata}\n---\n\n| a | b |\n|---|---|\n| c |\n")
    with pytest.raises(
        ValueError, match=r"README.md is not Hub-ready: line 1\d: table row has 1 columns, the header 2"
    ):
        write_model_card(model_dir, template=template, license="mit")
    assert not (model_dir / "README.md").exists()


def test_base_model_from_the_source_folder(tmp_path: Path) -> None:
    """A source downloaded into the Hugging Face cache, or a local derivative whose own provenance names its Hub
    model (as the demo's dequantized SmolLM2), gives `base_model`; a plain local folder does not."""
    from hf_moe import upcycle

    cached = tiny_dense_llama(tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / "abc123")
    card = ModelCard.load(
        write_model_card(upcycle(cached, tmp_path / "a", num_experts=4, top_k=2, progress=False))
    )
    assert card.data.base_model == "someone/tiny-llama" and card.data.base_model_relation == "finetune"
    assert_hub_ready(str(card), tmp_path)

    derived = tiny_dense_llama(tmp_path / "dequantized", license=None)
    (derived / "hf_moe_provenance.json").write_text(
        json.dumps(
            {
                "source": {"path": None, "model_type": "llama", "files_sha256": {}},
                "method": "gguf-dequantize",
                "options": {},
                "base_model": "someone/tiny-llama-instruct",
                "license": "apache-2.0",
            }
        )
    )
    moe = upcycle(derived, tmp_path / "b", num_experts=4, top_k=2, progress=False)
    card = ModelCard.load(write_model_card(moe))
    assert card.data.base_model == "someone/tiny-llama-instruct"
    assert (
        card.data.license == "apache-2.0" and "carried from the source model's provenance record" in card.text
    )
    assert_hub_ready(str(card), tmp_path)


def test_every_conversion_card_is_hub_ready(tmp_path: Path) -> None:
    """Upcycle, merge and export (the export variant of the template): valid, no local path, base_model kept."""
    from hf_moe import upcycle
    from hf_moe.conversion.export import export
    from hf_moe.conversion.merge import merge_experts

    hub = tmp_path / "hub"
    base = tiny_dense_llama(hub / "models--someone--tiny-llama" / "snapshots" / "r1")
    tuned = tiny_dense_llama(hub / "models--someone--tiny-llama-code" / "snapshots" / "r2")
    moe = upcycle(base, tmp_path / "moe", num_experts=4, top_k=2, progress=False)
    text = write_model_card(moe).read_text()
    assert_hub_ready(text, tmp_path)
    assert (
        "hf-moe serve path/to/this/folder" in text and "python -m vllm.entrypoints.openai.api_server" in text
    )

    merged = merge_experts(base=base, experts=[base, tuned], out_dir=tmp_path / "merged", progress=False)
    card = ModelCard.load(write_model_card(merged))
    assert card.data.base_model == ["someone/tiny-llama", "someone/tiny-llama-code"]
    assert card.data.base_model_relation == "merge"
    assert_hub_ready(str(card), tmp_path)

    exported = export(moe, tmp_path / "mixtral", to="mixtral")
    card = ModelCard.load(exported / "README.md")
    assert card.data.base_model == "someone/tiny-llama" and card.data.license == "apache-2.0"
    assert "native `MixtralForCausalLM` architecture" in card.text
    assert "import hf_moe" not in card.text and "trust_remote_code=True)" not in card.text
    assert_hub_ready(str(card), tmp_path)


def test_cli_conversions_write_a_hub_ready_card(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = tiny_dense_llama(tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / "r1")
    out = tmp_path / "moe"
    assert (
        cli.main(["upcycle", str(base), str(out), "--num-experts", "4", "--top-k", "2", "--no-progress"]) == 0
    )
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "someone/tiny-llama" and "Method: **upcycle**" in card.text
    assert_hub_ready(str(card), tmp_path)
    merged = tmp_path / "merged"
    assert (
        cli.main(
            [
                "merge",
                str(merged),
                "--base",
                str(base),
                "--expert",
                str(base),
                "--expert",
                str(base),
                "--no-progress",
            ]
        )
        == 0
    )
    card = ModelCard.load(merged / "README.md")
    assert card.data.base_model_relation == "merge" and "Method: **merge_experts**" in card.text
    assert_hub_ready(str(card), tmp_path)
    assert capsys.readouterr().out.split() == [str(out), str(merged)]
