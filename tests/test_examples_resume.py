"""``examples/resume.py --smoke`` runs on its own: preempted, resumed, and equal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "resume.py"


def test_resume_example_smoke() -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    out = completed.stdout
    assert "stopped: preempted" in out
    assert "resumed from checkpoint-" in out
    assert "equal to the uninterrupted run, bit for bit: True" in out
