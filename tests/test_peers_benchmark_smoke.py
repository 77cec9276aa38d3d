"""Smoke test of ``benchmarks/peers.py``: ``--quick`` runs in this environment.

The peers (Ignite, Lightning, fastai) are an optional extra, usually absent here: the
benchmark must then report them as not installed and still measure the hand-written
loop and ``statemachine_loop``. A benchmark is not a timed test: nothing here asserts
on a time or a ratio, only that the run completes and its report is whole.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"

PEERS = {"ignite": "ignite", "lightning": "lightning", "fastai": "fastai"}  # name: module
MEASURED = {"raw", "statemachine_loop"}


def test_peers_quick_reports_missing_peers_and_writes_json(tmp_path: Path) -> None:
    report_path = tmp_path / "peers.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", str(report_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,  # whatever a peer might write lands here, not in the work tree
    )
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    assert "| framework | version | µs/step (best) |" in out

    report = json.loads(report_path.read_text())
    assert report["meta"]["quick"] is True
    assert report["meta"]["torch_threads"] == 1
    contenders = report["contenders"]
    assert set(contenders) == MEASURED | set(PEERS)

    measured = set(MEASURED)
    for name, module in PEERS.items():
        row = contenders[name]
        if importlib.util.find_spec(module) is None:
            assert row["installed"] is False
            assert row["missing"] == "not installed"
            assert row["results"] is None
            assert f"| {row['label']} | not installed |" in out
        elif row["installed"]:
            measured.add(name)

    for name in measured:
        row = contenders[name]
        assert row["installed"] is True, (name, row["missing"])
        check = row["same_work"]
        assert check["training_steps"] == report["meta"]["steps_per_fit"]
        if name in MEASURED:  # bit-identical by construction; a peer's wrapper may round
            assert check["same_work"] is True, (name, check)
        results = row["results"]
        assert len(results["us_per_step_by_round"]) == report["meta"]["rounds"]
        for key in ("best_us_per_step", "ratio_of_best", "median_paired_ratio"):
            assert math.isfinite(results[key]) and results[key] > 0, (name, key, results[key])
        assert math.isfinite(results["fixed_ms_per_fit"]) and results["fixed_ms_per_fit"] >= 0
    assert contenders["raw"]["results"]["ratio_of_best"] == 1.0
