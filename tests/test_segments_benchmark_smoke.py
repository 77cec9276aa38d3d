"""Smoke test of ``benchmarks/segments.py``: ``--quick`` runs and its segments add up.

A benchmark is not a timed test: nothing here compares times. It checks the split of
a fit at its forward calls on made-up stamps (exactly), and that a tiny run reports
every segment with finite times for every fit. It runs in-process (``main(argv)``).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def segments(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports _report and overhead
    import segments as module

    return module


def test_a_fit_is_split_at_its_forward_calls(segments: ModuleType) -> None:
    # Two epochs of three batches, in ns: forwards at 10, 12, 15 | 40, 41, 45; return at 60.
    stamps = [10_000, 12_000, 15_000, 40_000, 41_000, 45_000]
    found = segments.split(stamps, 4_000, 60_000, epochs=2)
    assert found == {
        "start": 6.0,  # call to the first forward
        "boundary": 25.0,  # last forward of epoch 0 to the first of epoch 1
        "end": 15.0,
        "batch": 2.5,  # median of 2, 3, 1, 4 (the boundary left out)
        "total": 56.0,
    }


def test_quick_reports_every_segment(
    segments: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    report = segments.main(["--quick"])
    fits = report["result"]["by_contender"]
    assert set(fits) == {"raw", "compiled", "fit_end_x100", "transitions"}
    assert all(len(runs) == 3 for runs in fits.values())  # --quick: 3 timed rounds
    for runs in fits.values():
        for fit in runs:
            assert all(math.isfinite(value) and value > 0 for value in fit.values()), fit
    table = capsys.readouterr().out
    for segment in ("start", "boundary", "end", "batch"):
        assert segment in report["summary"] and f"  {segment} " in table
    assert "whole fit: raw" in table
