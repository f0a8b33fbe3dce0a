"""scripts/gpu_check.sh: the CPU dry run of the prepared GPU check, so the script cannot rot between GPU visits.

The dry run (`--cpu`) runs every step at tiny sizes with this interpreter's packages (no wheel install): the `gpu`
tests with HF_MOE_TEST_DEVICE=cpu, the block and training-step benchmarks, the upcycling study on synthetic text,
and the SUMMARY.md report.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_usage_errors_name_the_fix(tmp_path):
    missing = run_script()
    assert missing.returncode == 2 and "usage: scripts/gpu_check.sh OUTDIR" in missing.stderr
    bogus = run_script(str(tmp_path / "out"), "--bogus")
    assert bogus.returncode == 2 and "unknown option --bogus" in bogus.stderr
    only = run_script(str(tmp_path / "out"), "--cpu", "--only", "block,studdy")
    assert only.returncode == 2 and "unknown step 'studdy'" in only.stderr and "train_step" in only.stderr
    two = run_script(str(tmp_path / "a"), str(tmp_path / "b"))
    assert two.returncode == 2 and "one OUTDIR only" in two.stderr
    # GPU mode without the wheels: stops before running anything, and says how to get them
    no_wheels = run_script(str(tmp_path / "out"), "--wheels", str(tmp_path / "nowheels"))
    assert run_script("--help").stdout.startswith("# The prepared GPU check")
    assert no_wheels.returncode == 2 and "--prepare" in no_wheels.stdout
    assert not any((tmp_path / "out").glob("*.json"))


@pytest.mark.slow  # about 2 minutes on 2 shared cores
def test_cpu_dry_run_writes_every_result(tmp_path):
    out = tmp_path / "results"
    result = run_script(str(out), "--cpu", "--python", sys.executable, timeout=900)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + log[-5000:]

    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "SUMMARY.md",
        "block.json",
        "gpu_check.log",
        "study.json",
        "study.png",
        "tests.txt",
        "train_step.json",
    ]  # the device tool returns at most 8 files
    assert "no wheel" not in log and "pip install" not in log  # --cpu uses this interpreter's packages

    tests = (out / "tests.txt").read_text()
    # pytest's summary: "N passed" and no "N failed" / "N error(s)" ("xfailed" is an expected failure, not one).
    summary = tests.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary), summary
    assert not re.search(r"\b\d+ (failed|errors?)\b", summary), summary

    block = json.loads((out / "block.json").read_text())
    assert [(c["tokens"], c["pass"]) for c in block["cases"]] == [
        (64, "fwd"),
        (64, "fwd+bwd"),
        (256, "fwd"),
        (256, "fwd+bwd"),
    ]
    for case in block["cases"]:
        assert set(case["ms"]) == {"dense-active", "hf_moe", "transformers grouped_mm"}
        assert all(t > 0 for t in case["ms"].values())
    assert block["checks"]["rel_err_vs_transformers"]["hf_moe"] < 2e-2  # same weights, same function (bf16)

    train = json.loads((out / "train_step.json").read_text())
    assert {(r["precision"], r["arm"]) for r in train["results"]} == {
        (p, a) for p in ("bf16", "autocast") for a in ("dense", "fine-8x2 (equal active)", "copy-8x2")
    }
    assert all(r["ms"] > 0 and r["params"] > 0 for r in train["results"])

    study = json.loads((out / "study.json").read_text())
    assert study["seeds_run"] == [0, 1]
    assert set(study["arms"]) == {"dense", "copy-8x2", "drop-8x2", "fine-16x4"}
    for runs in study["arms"].values():
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert r["tokens"] == [0, 512, 1024]  # equal tokens per arm: 4 steps x 4 x 64, evaluated every 2
            assert all(math.isfinite(p) and p > 1 for p in r["heldout_ppl"])
    # every arm branches from the same dense base: copy and fine-grained upcycles start exactly where dense is
    start = {arm: runs[0]["heldout_ppl"][0] for arm, runs in study["arms"].items()}
    assert start["copy-8x2"] == pytest.approx(start["dense"], rel=1e-4)
    assert start["fine-16x4"] == pytest.approx(start["dense"], rel=1e-4)
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = (out / "SUMMARY.md").read_text()
    for step in ("assets", "tests", "block", "train_step", "study"):
        assert f"| {step} | ok |" in summary, summary
    assert "FAILED" not in summary and "(missing" not in summary
