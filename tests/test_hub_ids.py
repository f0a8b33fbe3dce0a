"""Hub repo ids wherever a model folder is read: the real `huggingface_hub` download client against a loopback
server that answers the Hub's read endpoints (tests/helpers/fake_hub.py), never the real Hub. HF_HOME and
HF_ENDPOINT point at the test's own cache and server.

Checked on the wire: only safetensors / config / tokenizer files are fetched, a pickle-only repo is refused before
any weight is requested, --revision and org/name@rev reach the server, offline mode makes no request at all.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_moe import cli
from hf_moe.hub_ids import HubModelError, hub_origin, parse_repo_id, resolve_model
from tests.helpers.dense import make_dense_llama
from tests.helpers.fake_hub import FakeHubServer, fake_hub, folder_files
from tests.helpers.tiny import tiny_model

TOKEN = "hf_FAKEreadTokenForTheLoopbackHub0000"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHubServer:
    with fake_hub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        yield server


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny dense Llamas with tokenizers: `main` and a different `v2` (its own weights)."""
    root = tmp_path_factory.mktemp("hub_ids")
    make_dense_llama(root / "main", seed=0)
    make_dense_llama(root / "v2", seed=1)
    return {"main": root / "main", "v2": root / "v2"}


def _publish_dense(hub: FakeHubServer, dense_dirs: dict[str, Path]) -> dict[str, str]:
    """alice/tiny-llama: main = dense_dirs["main"] plus files hf-moe must not fetch, branch v2 = dense_dirs["v2"]."""
    extra = {
        "README.md": b"---\nlicense: mit\n---\n",
        "pytorch_model.bin": b"\x80\x04pickle",
        "onnx/model.onnx": b"onnx",
        "training_args.bin": b"\x80\x04pickle",
    }
    return {
        "main": hub.add_repo("alice/tiny-llama", {**folder_files(dense_dirs["main"]), **extra}),
        "v2": hub.add_repo("alice/tiny-llama", folder_files(dense_dirs["v2"]), ref="v2"),
    }


def _expert0_layer0(out: Path) -> torch.Tensor:
    state = {}
    for shard in out.glob("*.safetensors"):
        state.update(load_file(shard))
    return state["model.layers.0.mlp.experts.down_proj"][0]  # (H, I)


def _dense_down0(folder: Path) -> torch.Tensor:
    state = {}
    for shard in folder.glob("*.safetensors"):
        state.update(load_file(shard))
    return state["model.layers.0.mlp.down_proj.weight"]


def test_upcycle_a_repo_id_end_to_end(hub, dense_dirs, tmp_path, capsys) -> None:
    shas = _publish_dense(hub, dense_dirs)
    out = tmp_path / "moe"
    code = cli.main(
        ["upcycle", "alice/tiny-llama", str(out), "--num-experts", "4", "--top-k", "2", "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == str(out)
    # Only what hf-moe reads: no README, no pickles, no ONNX; every safetensors shard, the config, the tokenizer.
    fetched = set(hub.downloaded("alice/tiny-llama"))
    local = {str(p.relative_to(dense_dirs["main"])) for p in dense_dirs["main"].iterdir()}
    assert fetched == local
    assert not fetched & {"README.md", "pytorch_model.bin", "onnx/model.onnx", "training_args.bin"}
    snapshot = Path(os_hf_home(tmp_path)) / "hub" / "models--alice--tiny-llama" / "snapshots" / shas["main"]
    assert snapshot.is_dir()
    # Copy-upcycling is function-preserving: the MoE gives the dense model's logits, so the weights are main's.
    dense = AutoModelForCausalLM.from_pretrained(dense_dirs["main"]).eval()
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 17, 40, 3, 9]])
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer.json").is_file()  # copied from the snapshot
    # Provenance names the repo and commit (not only the cache path), and the card takes base_model from it.
    source = json.loads((out / "hf_moe_provenance.json").read_text())["source"]
    assert (source["repo_id"], source["revision"]) == ("alice/tiny-llama", shas["main"])
    assert "base_model: alice/tiny-llama" in (out / "README.md").read_text()


def os_hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf_home"


def test_revision_is_passed_through(hub, dense_dirs, tmp_path, capsys) -> None:
    shas = _publish_dense(hub, dense_dirs)
    out = tmp_path / "moe-v2"
    argv = [
        "upcycle",
        "alice/tiny-llama",
        str(out),
        "--revision",
        "v2",
        "--num-experts",
        "2",
        "--top-k",
        "1",
        "--no-progress",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert any(r["path"] == "/api/models/alice/tiny-llama/revision/v2" for r in hub.requests)
    assert torch.equal(_expert0_layer0(out), _dense_down0(dense_dirs["v2"]))
    assert not torch.equal(_expert0_layer0(out), _dense_down0(dense_dirs["main"]))
    # The inline form, and a commit sha, resolve to the same snapshot; two different revisions are refused.
    assert resolve_model("alice/tiny-llama@v2").name == shas["v2"]
    assert resolve_model("alice/tiny-llama", revision=shas["main"]).name == shas["main"]
    assert hub_origin(resolve_model("alice/tiny-llama@v2")) == {
        "repo_id": "alice/tiny-llama",
        "revision": shas["v2"],
    }
    with pytest.raises(ValueError, match="give one"):
        resolve_model("alice/tiny-llama@v2", revision="main")
    with pytest.raises(HubModelError, match="no revision 'nope'"):
        resolve_model("alice/tiny-llama", revision="nope")


def test_offline_mode_uses_the_cache_without_requests(hub, dense_dirs, monkeypatch) -> None:
    shas = _publish_dense(hub, dense_dirs)
    online = resolve_model("alice/tiny-llama")
    online_v2 = resolve_model("alice/tiny-llama", revision="v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    assert resolve_model("alice/tiny-llama") == online
    assert resolve_model("alice/tiny-llama", revision="v2") == online_v2
    assert online.name == shas["main"] and online_v2.name == shas["v2"]
    assert hub.requests == []
    with pytest.raises(HubModelError, match="not in the Hub cache.*HF_HUB_OFFLINE"):
        resolve_model("alice/never-downloaded")
    assert hub.requests == []
    # A snapshot fetched without weights (as lora-targets does) does not pass for a complete one offline.
    hub.add_repo("alice/config-only", folder_files(dense_dirs["main"]))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    resolve_model("alice/config-only", weights=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("alice/config-only", weights=False).is_dir()
    with pytest.raises(HubModelError, match="lacks files hf-moe needs"):
        resolve_model("alice/config-only")


def test_pickle_only_repo_is_refused_before_any_weight_download(hub, dense_dirs, tmp_path, capsys) -> None:
    files = {k: v for k, v in folder_files(dense_dirs["main"]).items() if "safetensors" not in k}
    files["pytorch_model.bin"] = b"\x80\x04pickle"
    hub.add_repo("bob/old-llama", files)
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*save_pretrained"):
        resolve_model("bob/old-llama")
    assert hub.downloaded() == []  # refused from the listing: not even config.json was fetched
    assert (
        cli.main(["upcycle", "bob/old-llama", str(tmp_path / "moe"), "--num-experts", "2", "--top-k", "1"])
        == 2
    )
    err = capsys.readouterr().err
    assert "pickle" in err and "refs/pr/N" in err
    assert hub.downloaded() == [] and not (tmp_path / "moe").exists()


def test_local_path_wins_and_bad_names_are_named(hub, dense_dirs, tmp_path, monkeypatch) -> None:
    _publish_dense(hub, dense_dirs)
    monkeypatch.chdir(tmp_path)
    local = Path("alice") / "tiny-llama"
    local.mkdir(parents=True)
    assert resolve_model("alice/tiny-llama") == local
    assert hub.requests == []
    with pytest.raises(FileNotFoundError, match="does not exist, and is not a Hub repo id"):
        resolve_model("./missing/model/dir")
    with pytest.raises(FileNotFoundError, match="does not exist, and is not a Hub repo id"):
        resolve_model("not a repo")
    with pytest.raises(HubModelError, match="no model repo carol/nothing"):
        resolve_model("carol/nothing")
    assert [parse_repo_id(s) for s in ("a/b", "a/b@refs/pr/1", "a--b/c", "/abs/path", "a/b/c")] == [
        ("a/b", None),
        ("a/b", "refs/pr/1"),
        None,
        None,
        None,
    ]


def test_unreachable_hub_is_one_clear_error(hub, monkeypatch) -> None:
    # A loopback port nobody listens on: the HTTP client's connection error (httpx2 or httpx, by huggingface_hub
    # version) becomes a HubModelError that says what to check.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(HubModelError, match="could not download alice/tiny-llama .*check the connection"):
        resolve_model("alice/tiny-llama")


def test_token_reaches_the_server(hub, dense_dirs, monkeypatch) -> None:
    _publish_dense(hub, dense_dirs)
    resolve_model("alice/tiny-llama", token=TOKEN, weights=False)
    assert hub.requests and all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    hub.requests.clear()
    monkeypatch.setenv("HF_TOKEN", TOKEN + "env")
    resolve_model("alice/tiny-llama", revision="v2", weights=False)
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}env" for r in hub.requests)


@pytest.fixture
def moe_repo(hub, tmp_path) -> tuple[str, Path]:
    folder = tmp_path / "tiny-moe"
    tiny_model().save_pretrained(folder)
    hub.add_repo("alice/tiny-moe", folder_files(folder))
    return "alice/tiny-moe", folder


def test_lora_targets_fetches_no_weights(hub, moe_repo, capsys) -> None:
    pytest.importorskip("peft")
    assert cli.main(["lora-targets", moe_repo[0], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["model"] == "HfMoeForCausalLM" and rows["targets"]
    assert not any(f.endswith(".safetensors") for f in hub.downloaded())
    assert "config.json" in hub.downloaded()


def test_export_card_and_python_apis_take_repo_ids(hub, moe_repo, tmp_path, capsys) -> None:
    import hf_moe

    repo_id, folder = moe_repo
    out = hf_moe.export(repo_id, tmp_path / "mixtral", to="mixtral")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    back = hf_moe.import_native(str(out), tmp_path / "back")
    assert torch.equal(_expert0_layer0(back), _expert0_layer0(folder))
    assert cli.main(["export", repo_id, str(tmp_path / "mixtral-cli"), "--to", "mixtral"]) == 0
    # card: the cached snapshot is never written to; the card goes where --output says.
    assert cli.main(["card", repo_id]) == 2
    assert "--output" in capsys.readouterr().err
    card = tmp_path / "CARD.md"
    assert cli.main(["card", repo_id, "--output", str(card), "--license", "mit"]) == 0
    text = card.read_text()
    assert "license: mit" in text and 'from_pretrained("alice/tiny-moe"' in text
    snapshot = resolve_model(repo_id)
    assert not (snapshot / "README.md").exists()


def test_merge_takes_repo_ids_with_revisions(hub, dense_dirs, tmp_path, capsys) -> None:
    shas = _publish_dense(hub, dense_dirs)
    out = tmp_path / "merged"
    argv = [
        "merge",
        str(out),
        "--base",
        "alice/tiny-llama",
        "--expert",
        "alice/tiny-llama",
        "--expert",
        "alice/tiny-llama@v2",
        "--top-k",
        "1",
        "--no-progress",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    state = {}
    for shard in out.glob("*.safetensors"):
        state.update(load_file(shard))
    down = state["model.layers.0.mlp.experts.down_proj"]  # (E, H, I)
    assert torch.equal(down[0], _dense_down0(dense_dirs["main"]))
    assert torch.equal(down[1], _dense_down0(dense_dirs["v2"]))
    assert {r["path"] for r in hub.requests} >= {
        "/api/models/alice/tiny-llama/revision/main",
        "/api/models/alice/tiny-llama/revision/v2",
    }
    assert resolve_model("alice/tiny-llama").name == shas["main"]


def test_serve_dry_run_takes_a_repo_id(hub, moe_repo, tmp_path, capsys) -> None:
    repo_id, _ = moe_repo
    code = cli.main(["serve", repo_id, "--dry-run", "--plugin"])
    out = capsys.readouterr().out
    assert code == 0 and "models--alice--tiny-moe" in out


def test_compress_takes_a_repo_id(hub, moe_repo, tmp_path, capsys) -> None:
    repo_id, _ = moe_repo
    out = tmp_path / "pruned"
    assert cli.main(["compress", repo_id, str(out), "--keep", "0.5", "--method", "random"]) == 0, (
        capsys.readouterr().err
    )
    assert json.loads((out / "config.json").read_text())["num_experts"] == 2  # tiny_model has 4


def test_mergekit_config_with_repo_ids(hub, dense_dirs, tmp_path, capsys) -> None:
    # mergekit's model reference forms: "org/name", "org/name@rev" and {model: {path, revision}}.
    shas = _publish_dense(hub, dense_dirs)
    config = tmp_path / "moe.yml"
    config.write_text(
        "base_model: alice/tiny-llama\n"
        "gate_mode: random\n"
        "experts:\n"
        "  - source_model: alice/tiny-llama\n"
        "  - source_model: alice/tiny-llama@v2\n"
        "  - source_model:\n"
        "      model:\n"
        f"        path: alice/tiny-llama\n        revision: {shas['v2']}\n"
        "shared_experts:\n"
        "  - source_model: alice/tiny-llama\n"
    )
    out = tmp_path / "merged"
    assert cli.main(["merge", "--mergekit-config", str(config), str(out), "--no-progress"]) == 0, (
        capsys.readouterr().err
    )
    state = {}
    for shard in out.glob("*.safetensors"):
        state.update(load_file(shard))
    down = state["model.layers.0.mlp.experts.down_proj"]  # (E, H, I); halved: one shared expert
    assert torch.equal(down[0], _dense_down0(dense_dirs["main"]) * 0.5)
    assert torch.equal(down[1], _dense_down0(dense_dirs["v2"]) * 0.5)
    assert torch.equal(down[2], down[1])
    assert "model.layers.0.mlp.shared_experts.down_proj.weight" in state
