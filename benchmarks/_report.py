"""What every benchmark script here prints and records about the machine, how it saves,
and the heap it times with.

The timing benchmarks (``overhead.py``, ``observability.py``, ``peers.py``) each print
one line describing the run, write a JSON report whose ``meta`` starts with the same
fields, and time their rounds inside :func:`frozen_heap`; they import this module as a
sibling (a script's own folder is first on ``sys.path``), which also works under
``.venv-peers``.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Time with everything allocated so far frozen out of the garbage collector's reach.

    A collection then costs what the timed fits themselves allocate, as in a user's
    program, and the collector stays on. There is deliberately no ``gc.collect()``
    before each fit: it evicts the caches, so the fit after it starts cold (about
    0.6 ms more on the tutorial model), most for the contender with the most code.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def load_average() -> tuple[float, float, float] | None:
    """The system load average, where the platform has one."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def run_line(load: tuple[float, float, float] | None) -> str:
    """torch, threads, Python, cores and load, as the first line of a benchmark's output."""
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} thread, python "
        f"{platform.python_version()}, {os.cpu_count()} cores, load {load}"
    )


def machine_meta(load_before: tuple[float, float, float] | None) -> dict[str, Any]:
    """The ``meta`` fields every report shares: date, versions, machine, load around the run."""
    return {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": load_average(),
    }


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    """Write ``report`` as indented JSON to ``path`` (creating folders), if a path was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
