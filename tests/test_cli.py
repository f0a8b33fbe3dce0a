"""The `hf-moe` command line as users run it: the installed console script in a subprocess (what argparse, the
error policy and the exit codes do there), plus in-process calls of `cli.main` where only the output matters."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_moe import cli
from hf_moe.zoo import PRESETS

# The console script of the venv running the tests (pip puts it next to the interpreter).
HF_MOE = shutil.which("hf-moe", path=str(Path(sys.executable).parent)) or "hf-moe"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([HF_MOE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_zoo_render_cards_writes_every_preset(tmp_path: Path, capsys) -> None:
    assert cli.main(["zoo", "render-cards", "--cards-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.md" for n in PRESETS)
    assert str(tmp_path / "tiny.md") in capsys.readouterr().out


def test_zoo_render_cards_creates_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "cards"
    assert cli.main(["zoo", "render-cards", "--cards-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.md" for n in PRESETS)


def test_export_offers_every_native_target() -> None:
    from hf_moe.conversion.native import TARGETS

    assert cli.EXPORT_TARGETS == TARGETS
    parser = cli.build_parser()
    for target in TARGETS:
        assert parser.parse_args(["export", "in", "out", "--to", target]).to == target


def test_cli_is_the_only_command_line_entry_point() -> None:
    package = Path(cli.__file__).parent
    others = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "cli.py" and ("argparse" in (text := path.read_text()) or "__main__" in text)
    ]
    assert others == [], f"only hf_moe/cli.py may parse arguments or run as a script: {others}"


# ---------------------------------------------------------------------------------------------------------------
# Error policy: a library error is one line on stderr and exit code 2; a bug keeps its traceback and exits 1.


def assert_one_line_error(done: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    assert done.returncode == 2, f"exit {done.returncode}, stderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, f"one line on stderr, got:\n{done.stderr}"
    assert lines[0].startswith(f"hf-moe {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny hf_moe checkpoint with a tokenizer; tests copy it before breaking it."""
    from tests.helpers.native import build_tiny_for_target

    return build_tiny_for_target("mixtral", tmp_path_factory.mktemp("cli") / "tiny", with_tokenizer=True)


def broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_wrong_typed_config_field_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import json

    model = broken_copy(tiny_checkpoint, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["hidden_size"] = (
        "32"  # a string where the base's strict config dataclass wants an int
    )
    (model / "config.json").write_text(json.dumps(config))
    done = run_cli("export", str(model), str(tmp_path / "out"), "--to", "mixtral")
    # transformers' strict dataclass error today ("invalid config: ... expected int, got str"); whichever layer
    # refuses it, the user gets one line naming the field.
    assert_one_line_error(done, "export", "hidden_size")
    assert not (tmp_path / "out").exists()


def test_invalid_config_json_in_inspect_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = broken_copy(tiny_checkpoint, tmp_path / "m")
    (model / "config.json").write_text('{"model_type": "hf_moe", ')  # truncated
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    done = run_cli("inspect", str(model), "--text", str(tmp_path / "text.txt"), "--max-tokens", "16")
    assert_one_line_error(done, "inspect", "config.json")


def test_missing_paths_are_one_line(tmp_path: Path) -> None:
    done = run_cli("import", str(tmp_path / "no-such-model"), str(tmp_path / "out"))
    assert_one_line_error(done, "import", "no-such-model")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = broken_copy(tiny_checkpoint, tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # the header survives, the tensors do not
    done = run_cli("export", str(model), str(tmp_path / "out"), "--to", "mixtral")
    assert_one_line_error(done, "export", "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_internal_error_keeps_its_traceback_and_exits_1(tmp_path: Path) -> None:
    # A command whose code has a bug (here: a RuntimeError), run through the real dispatch in cli.main.
    code = (
        "import sys\n"
        "from hf_moe import cli\n"
        "def _run_bug(args):\n"
        "    raise RuntimeError('an internal invariant broke')\n"
        "def _add_bug(subparsers):\n"
        "    subparsers.add_parser('bug').set_defaults(func=_run_bug)\n"
        "cli.SUBCOMMANDS.append(_add_bug)\n"
        "sys.exit(cli.main(['bug']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: an internal invariant broke" in done.stderr


def _raise(err: Exception) -> None:
    raise err


@pytest.mark.parametrize(
    "make_error, library",
    [
        (lambda: _raise(ValueError("bad option")), True),
        (lambda: __import__("json").loads("{"), True),  # json.JSONDecodeError
        (lambda: open("/no/such/file"), True),  # FileNotFoundError
        (
            lambda: __import__("safetensors.torch").torch.load(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"),
            True,
        ),
        (lambda: __import__("yaml").safe_load("a: [1, 2"), True),
        (lambda: {}["missing"], False),  # KeyError: a bug
        (lambda: __import__("torch").zeros(2) @ __import__("torch").zeros(3), False),  # RuntimeError: a bug
    ],
    ids=[
        "ValueError",
        "JSONDecodeError",
        "FileNotFoundError",
        "SafetensorError",
        "YAMLError",
        "KeyError",
        "RuntimeError",
    ],
)
def test_library_error_classification(make_error, library: bool) -> None:
    with pytest.raises(Exception) as info:
        make_error()
    assert cli.is_library_error(info.value) is library
    if library:
        assert "\n" not in cli.error_message(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Help and usage errors load no library (their latency is a benchmark: benchmarks/cli_latency.py).


@pytest.mark.parametrize(
    "args",
    [["--help"], ["serve", "--help"], ["zoo", "create", "--help"], ["export"]],
    ids=["help", "serve-help", "zoo-create-help", "usage-error"],
)
def test_help_and_usage_errors_import_neither_torch_nor_transformers(args: list[str]) -> None:
    # -X importtime lists every module the process imported, on stderr.
    done = subprocess.run(
        [sys.executable, "-X", "importtime", HF_MOE, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == (0 if "--help" in args else 2), done.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "hf_moe.cli" in imported
    heavy = sorted(
        name for name in imported if name.split(".")[0] in ("torch", "transformers", "safetensors")
    )
    assert heavy == [], f"hf-moe {' '.join(args)} imported {heavy[:5]}"


# ---------------------------------------------------------------------------------------------------------------
# What a CLI user reads: flags rather than keyword arguments, descriptions, the zoo's missing tokenizers.


def test_existing_output_names_the_overwrite_flag(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    done = run_cli("export", str(tiny_checkpoint), str(tmp_path / "out"), "--to", "mixtral")
    line = assert_one_line_error(done, "export", "already exists", "--overwrite")
    assert "overwrite=True" not in line


@pytest.mark.parametrize(
    "message, shown",
    [
        ("output folder x already exists; choose another path or pass overwrite=True", "pass --overwrite"),
        (
            "x exists and was not written by hf-moe card; move it away or pass overwrite=True (--overwrite)",
            "move it away or pass --overwrite",
        ),
    ],
)
def test_keyword_arguments_are_spelled_as_flags(message: str, shown: str) -> None:
    assert cli.error_message(FileExistsError(message)).endswith(shown)


def _commands() -> list[str]:
    import argparse

    parser = cli.build_parser()
    return sorted(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_a_description(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    help_text = capsys.readouterr().out
    usage, _, rest = help_text.partition("\n\n")
    description = rest.split("\n\n", 1)[0]
    assert not description.startswith(("positional arguments", "options")), (
        f"hf-moe {command} has no description"
    )
    assert len(description.split()) >= 12


def test_zoo_says_from_scratch_presets_ship_no_tokenizer(tmp_path: Path, capsys) -> None:
    assert cli.main(["zoo", "show", "tiny"]) == 0
    assert "tokenizer: none shipped; bring one with vocab_size 99" in capsys.readouterr().out
    assert cli.main(["zoo", "create", "tiny", str(tmp_path / "tiny")]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "tiny")
    assert "no tokenizer" in captured.err and "vocab_size 99" in captured.err
    assert not any(
        (tmp_path / "tiny" / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")
    )


def test_inspect_shows_progress_over_the_layers(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    args = ["inspect", str(tiny_checkpoint), "--text", str(tmp_path / "text.txt"), "--max-tokens", "16"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "routing 16 tokens" in err and "2/2" in err  # the tiny model's two decoder layers
    assert cli.main([*args, "--no-progress"]) == 0
    assert "routing 16 tokens" not in capsys.readouterr().err
