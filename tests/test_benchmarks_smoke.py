"""Smoke tests of ``benchmarks/overhead.py`` and ``observability.py``: they run and report.

A benchmark is not a timed test: nothing here asserts on a time or a ratio, only that
a tiny ``--quick`` run completes and reports every model and contender, and that
``--processes`` pools what its fresh processes reported.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"

MODELS = {"tutorial", "mnist_mlp"}
CONTENDERS = {"raw", "compiled", "fit_end_x100", "transitions"}
ROW_KEYS = {
    "best_us_per_step",
    "median_us_per_step",
    "ratio_of_best",
    "median_paired_ratio",
    "paired_ratio_quartiles",
    "overhead_us_per_step",
    "median_paired_difference_us",
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
            differences = {"overhead_us_per_step", "median_paired_difference_us"}
            for key in ROW_KEYS - lists - differences:
                assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
            assert all(math.isfinite(row[key]) for key in differences)
        assert math.isfinite(result["compiled_fixed_us_per_fit"])
        assert result["compiled_ratio_of_best_without_setup"] > 0
        raw = result["contenders"]["raw"]
        assert raw["ratio_of_best"] == 1.0
        assert raw["overhead_us_per_step"] == raw["median_paired_difference_us"] == 0.0


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


def _run(script: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCHMARK.parent / script), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _check_spread(pooled: dict[str, dict[str, float]], values: list[float]) -> None:
    """A pooled figure is the mean, standard error and range of the processes' own values."""
    ratios = {"ratio_of_best", "median_paired_ratio"}
    assert ratios <= set(pooled) <= ratios | {"overhead_us_per_step", "median_paired_difference_us"}
    assert len(values) == 2
    for row in pooled.values():
        assert set(row) == {"mean", "standard_error", "min", "max"}
    best = pooled["ratio_of_best"]
    assert math.isclose(best["mean"], sum(values) / 2)
    assert best["min"] == min(values) and best["max"] == max(values)
    assert math.isclose(best["standard_error"], abs(values[0] - values[1]) / 2)


def test_overhead_pools_fresh_processes(tmp_path: Path) -> None:
    report_path = tmp_path / "pooled.json"
    flags = ["--quick", "--rounds", "2", "--steps", "3", "--model", "tutorial"]
    completed = _run("overhead.py", *flags, "--processes", "2", "--json", str(report_path))
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("process ") == 2
    report = json.loads(report_path.read_text())
    assert report["meta"]["processes"] == 2
    assert report["meta"]["rounds"] == 2
    runs = report["processes"]
    assert len(runs) == 2 and all(set(run["models"]) == {"tutorial"} for run in runs)
    assert set(report["pooled"]["tutorial"]) == CONTENDERS
    for contender, pooled in report["pooled"]["tutorial"].items():
        values = [run["models"]["tutorial"]["contenders"][contender] for run in runs]
        _check_spread(pooled, [value["ratio_of_best"] for value in values])
        paired = [value["median_paired_difference_us"] for value in values]
        assert math.isclose(pooled["median_paired_difference_us"]["mean"], sum(paired) / 2)
    assert "µs/step (paired)" in completed.stdout


def test_overhead_times_the_heap_as_a_fresh_process_has_it(tmp_path: Path) -> None:
    report_path = tmp_path / "as-is.json"
    flags = ["--quick", "--rounds", "2", "--steps", "3", "--model", "tutorial", "--gc", "as-is"]
    completed = _run("overhead.py", *flags, "--json", str(report_path))
    assert completed.returncode == 0, completed.stderr
    assert "heap as-is" in completed.stdout
    assert json.loads(report_path.read_text())["meta"]["gc"] == "as-is"


def test_observability_quick_and_pooled(tmp_path: Path) -> None:
    single = _run("observability.py", "--quick", "--json", str(tmp_path / "one.json"))
    assert single.returncode == 0, single.stderr
    one = json.loads((tmp_path / "one.json").read_text())["tutorial"]
    assert one["csv_rows_per_fit"] == one["steps_per_round"]  # a CSV row per batch
    assert set(one["clocks"]) == {"wall", "cpu"}

    report_path = tmp_path / "pooled.json"
    completed = _run("observability.py", "--quick", "--processes", "2", "--json", str(report_path))
    assert completed.returncode == 0, completed.stderr
    report = json.loads(report_path.read_text())
    runs = report["processes"]
    assert report["meta"]["processes"] == 2 and len(runs) == 2
    for clock in ("wall", "cpu"):
        assert set(report["pooled"][clock]) == {"raw", "loop", "observed"}
        for name, pooled in report["pooled"][clock].items():
            values = [run["tutorial"]["clocks"][clock][name]["ratio_of_best"] for run in runs]
            _check_spread(pooled, values)


def test_processes_must_be_positive() -> None:
    completed = _run("overhead.py", "--quick", "--processes", "0")
    assert completed.returncode == 2
    assert "--processes" in completed.stderr


def test_a_failing_process_ends_the_pooled_run_saying_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARK.parent))
    import _report

    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(SystemExit, match=r"fails\.py run 1 of 2 failed with exit status 3"):
        list(_report.fresh_processes(script, [], 2))
