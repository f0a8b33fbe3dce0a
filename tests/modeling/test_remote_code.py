"""A saved checkpoint loads with `trust_remote_code=True` where hf_moe cannot be imported, and gives the same
logits."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers.tiny import tiny_model

# Runs in a fresh interpreter. `sys.modules["hf_moe"] = None` makes every `import hf_moe` fail, as on a
# machine without the plugin: only the files saved next to the weights can provide the model.
CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["hf_moe"] = None
    try:
        import hf_moe  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_moe is importable: the test would not show anything")

    import torch
    from transformers import AutoModelForCausalLM

    checkpoint, data = sys.argv[1], sys.argv[2]
    try:
        AutoModelForCausalLM.from_pretrained(checkpoint)  # no trust_remote_code: transformers must refuse
    except ValueError as error:
        print("REFUSED:", error)
    else:
        print("LOADED WITHOUT trust_remote_code")

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    payload = torch.load(data)
    with torch.no_grad():
        logits = model(payload["input_ids"]).logits
    # The base model too: vLLM's Transformers backend builds it with AutoModel from the remote code.
    from transformers import AutoModel

    base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    info = {"class_module": type(model).__module__, "class": type(model).__name__, "base_class": type(base).__name__}
    torch.save({"logits": logits, **info}, data)
    """
)


def _run_child(tmp_path, checkpoint, data) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),  # keep the imported remote code out of ~/.cache
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(checkpoint), str(data)],
        env=env,
        stdin=subprocess.DEVNULL,  # the trust prompt must not wait for an answer
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("remote") / "ckpt"
    model = tiny_model(seed=0, router_type="sigmoid_topk", n_group=2, topk_group=1, num_shared_experts=1)
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def child_run(checkpoint, tmp_path_factory):
    """One subprocess (importing transformers costs seconds): refuse without trust, then load with it."""
    path, model = checkpoint
    tmp_path = tmp_path_factory.mktemp("child")
    input_ids = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(0))
    data = tmp_path / "io.pt"
    torch.save({"input_ids": input_ids}, data)
    result = _run_child(tmp_path, path, data)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(input_ids).logits
    return result, torch.load(data), expected


def test_saved_checkpoint_ships_the_code(checkpoint):
    path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_hf_moe.HfMoeConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hf_moe.HfMoeForCausalLM"
    assert (path / "modeling_hf_moe.py").is_file() and (path / "configuration_hf_moe.py").is_file()


@pytest.mark.slow
def test_trust_remote_code_without_hf_moe_matches(child_run):
    _, child, expected = child_run
    assert child["class"] == "HfMoeForCausalLM"
    assert child["base_class"] == "HfMoeModel"
    assert not child["class_module"].startswith("hf_moe")  # the copy in the checkpoint, not the package
    torch.testing.assert_close(child["logits"], expected)


@pytest.mark.slow
def test_without_trust_remote_code_transformers_refuses(child_run):
    result, _, _ = child_run
    assert "LOADED WITHOUT" not in result.stdout
    assert "REFUSED:" in result.stdout
    assert "contains custom code" in result.stdout and "trust_remote_code=True" in result.stdout
