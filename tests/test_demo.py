"""``make demo`` keeps its promises: accuracy, every output written, logs that validate."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

from statemachine_loop.cli import main as smloop

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_trains_to_95_percent_and_writes_every_log(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(DEMO), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    accuracy = re.search(r"validation accuracy (\d+\.\d+)%", done.stdout)
    assert accuracy is not None, done.stdout
    assert float(accuracy.group(1)) >= 95.0
    # Off a terminal the progress bar prints one plain line per phase, no escapes.
    assert "training: 45 batches" in done.stdout and "\x1b" not in done.stdout
    with (out / "log.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {"epoch", "batch", "phase", "loss"} <= set(rows[0])
    assert {row["phase"] for row in rows} == {"training", "validation"}
    assert list((out / "tensorboard" / "stats").glob("*/training/events.out.tfevents.*"))
    assert list((out / "checkpoints").glob("*.pt"))
    for command in ("logs summary", "logs validate"):
        assert str(out) in done.stdout and f"smloop {command}" in done.stdout
    assert smloop(["logs", "validate", str(out)]) == 0
