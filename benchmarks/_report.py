"""What every benchmark script here prints and records about the machine, how it saves,
the heap it times with, and how it repeats itself in fresh processes.

The timing benchmarks (``overhead.py``, ``observability.py``, ``peers.py``) each print
one line describing the run, write a JSON report whose ``meta`` starts with the same
fields, and time their rounds inside :func:`frozen_heap`; they import this module as a
sibling (a script's own folder is first on ``sys.path``), which also works under
``.venv-peers``. ``overhead.py`` and ``observability.py`` also take ``--processes N``
(:func:`fresh_processes`, :func:`spread`).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
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


def fresh_processes(script: Path, argv: Sequence[str], processes: int) -> Iterator[dict[str, Any]]:
    """Run ``script`` with ``argv`` in ``processes`` fresh interpreters, one after another.

    Yields each run's JSON report as it finishes. Why: where a process's code and objects
    land in memory moves a contender's time by up to about 1 % for its whole life (two
    identical copies of the same code, timed in one process, read 1.3 % apart), and
    more rounds in the same process cannot average that out; runs in separate processes
    can. A failing run stops the whole measurement with its own error output.
    """
    with tempfile.TemporaryDirectory() as folder:
        for index in range(processes):
            path = Path(folder) / f"{index}.json"
            command = [sys.executable, str(script), *argv, "--json", str(path)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            yield json.loads(path.read_text())


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard error of the mean, lowest and highest of one figure over processes."""
    error = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return {
        "mean": statistics.fmean(values),
        "standard_error": error,
        "min": min(values),
        "max": max(values),
    }


def print_spread(title: str, contenders: dict[str, dict[str, dict[str, float]]]) -> None:
    """A table of each contender's ratios over processes: mean ± standard error (lowest-highest)."""
    print(f"\n{title}")
    header = f"  {'contender':<12}{'ratio of best':>32}{'median paired':>32}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for name, ratios in contenders.items():
        cells = (
            f"{row['mean']:.4f}x ± {row['standard_error']:.4f} ({row['min']:.3f}-{row['max']:.3f})"
            for row in (ratios["ratio_of_best"], ratios["median_paired_ratio"])
        )
        print(f"  {name:<12}" + "".join(f"{cell:>32}" for cell in cells))
