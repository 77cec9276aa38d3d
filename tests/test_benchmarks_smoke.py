"""Smoke test of ``benchmarks/overhead.py``: it runs and writes its JSON report.

A benchmark is not a timed test: nothing here asserts on a time or a ratio, only that
a tiny ``--quick`` run completes and reports every model and contender.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"

MODELS = {"tutorial", "mnist_mlp"}
CONTENDERS = {"raw", "compiled", "transitions"}
ROW_KEYS = {
    "best_us_per_step",
    "median_us_per_step",
    "ratio_of_best",
    "median_paired_ratio",
    "paired_ratio_quartiles",
    "overhead_us_per_step",
    "us_per_step_by_round",
}


def test_overhead_quick_writes_json(tmp_path: Path) -> None:
    report_path = tmp_path / "overhead.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--quick",
            "--rounds",
            "2",
            "--steps",
            "3",
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "ratio of best" in completed.stdout

    report = json.loads(report_path.read_text())
    assert report["meta"]["rounds"] == 2
    assert report["meta"]["quick"] is True
    assert report["meta"]["torch_threads"] == 1
    assert set(report["models"]) == MODELS
    for result in report["models"].values():
        assert result["steps_per_round"] == result["epochs_per_round"] * 3
        assert set(result["contenders"]) == CONTENDERS
        for row in result["contenders"].values():
            assert set(row) == ROW_KEYS
            assert len(row["us_per_step_by_round"]) == 2
            assert len(row["paired_ratio_quartiles"]) == 2
            lists = {"us_per_step_by_round", "paired_ratio_quartiles"}
            for key in ROW_KEYS - lists - {"overhead_us_per_step"}:
                assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
        assert math.isfinite(result["compiled_fixed_us_per_fit"])
        assert result["compiled_ratio_of_best_without_setup"] > 0
        raw = result["contenders"]["raw"]
        assert raw["ratio_of_best"] == 1.0
        assert raw["overhead_us_per_step"] == 0.0


def test_instructions_child_runs_its_fits_between_the_parent_signals() -> None:
    """``instructions.py``'s counted part, without valgrind: ready, the fits, done."""
    script = BENCHMARK.parent / "instructions.py"
    for contender in ("raw", "compiled"):
        completed = subprocess.run(
            [sys.executable, str(script), "--child", contender, "--fits", "1"],
            input="\n\n",
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.split() == ["ready", "done"]
