"""Smoke test of ``benchmarks/resume_cost.py``: ``--quick`` runs and prints its table.

A benchmark is not a timed test: nothing here compares times, only that every row is
there and every time is a positive, finite number. It runs in-process (the benchmark
has a ``main(argv)``), so the test does not pay for a second torch import.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "resume_cost.py"


def test_resume_cost_quick_prints_a_row_per_k(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("resume_cost", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick"])
    table = capsys.readouterr().out
    assert list(results) == [0, 2, 10, 18]  # 0, 10, 50 and 90 % of 20 batches
    for k, row in results.items():
        assert set(row) == {"DataLoader", "plain iterable"}
        assert all(math.isfinite(t) and t > 0 for t in row.values()), (k, row)
        assert f"{k} ({k / 20:.0%})" in table
    assert "skip at sampler" in table and "first resumed batch_start" in table
