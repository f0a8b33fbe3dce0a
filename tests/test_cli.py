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


def test_cli_is_the_only_command_line_entry_point() -> None:
    package = Path(cli.__file__).parent
    others = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "cli.py" and ("argparse" in (text := path.read_text()) or "__main__" in text)
    ]
    assert others == [], f"only hf_moe/cli.py may parse arguments or run as a script: {others}"
