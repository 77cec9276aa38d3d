"""What every benchmark script here prints and records about the machine, how it saves,
the heap it times with, and how it repeats itself in fresh processes.

The timing benchmarks (``overhead.py``, ``observability.py``, ``peers.py``) each print
one line describing the run, write a JSON report whose ``meta`` starts with the same
fields, and time their rounds inside :func:`frozen_heap`; they import this module as a
sibling (a script's own folder is first on ``sys.path``), which also works under
``.venv-peers``. ``overhead.py`` and ``observability.py`` also take ``--processes N``
(:func:`pool_processes`).
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable, Iterator, Sequence
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


#: How a benchmark treats the garbage collector while timing (``--gc``).
GC_MODES = ("frozen", "as-is")


def timing_heap(mode: str) -> contextlib.AbstractContextManager[None]:
    """The heap the timed rounds run with: :func:`frozen_heap`, or as it comes (``as-is``).

    ``as-is`` is what a user's fresh process has: the collector on, with everything the
    process allocated so far (torch's modules included) in its generations, so a full
    collection now and then walks all of it.
    """
    if mode not in GC_MODES:
        raise ValueError(f"gc mode must be one of {GC_MODES}; got {mode!r}")
    return frozen_heap() if mode == "frozen" else contextlib.nullcontext()


def add_gc_option(parser: argparse.ArgumentParser) -> None:
    """The ``--gc`` option of the timing benchmarks (see :func:`timing_heap`)."""
    parser.add_argument(
        "--gc",
        choices=GC_MODES,
        default="frozen",
        help="time with the heap frozen (default) or as a fresh process has it",
    )


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


def add_processes_option(parser: argparse.ArgumentParser) -> None:
    """The ``--processes N`` option of the timing benchmarks (see :func:`pool_processes`)."""
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="repeat the whole run in this many fresh processes and pool them (default 1)",
    )


def fresh_processes(script: Path, argv: Sequence[str], processes: int) -> Iterator[dict[str, Any]]:
    """Run ``script`` with ``argv`` in ``processes`` fresh interpreters, one after another.

    Yields each run's JSON report as it finishes. Why: where a process's code and objects
    land in memory moves a contender's time by up to about 1 % for its whole life (two
    identical copies of the same code, timed in one process, read 1.3 % apart), and
    more rounds in the same process cannot average that out; runs in separate processes
    can. A failing run ends the measurement with its own error output and a line
    saying which run it was.
    """
    with tempfile.TemporaryDirectory() as folder:
        for index in range(processes):
            path = Path(folder) / f"{index}.json"
            command = [sys.executable, str(script), *argv, "--json", str(path)]
            returncode = subprocess.run(command, stdout=subprocess.DEVNULL).returncode
            if returncode != 0:
                raise SystemExit(
                    f"{script.name} run {index + 1} of {processes} failed with exit status "
                    f"{returncode}; its error output is above."
                )
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


#: The ratios ``--processes`` pools, as every timing report names them.
RATIOS = ("ratio_of_best", "median_paired_ratio")
#: The differences in µs per step it pools too, where a report's rows have them.
DIFFERENCES = ("overhead_us_per_step", "median_paired_difference_us")

#: From one report, the tables to pool: a title for each, and in it a row per contender
#: (the reference first) holding at least :data:`RATIOS`.
Tables = Callable[[dict[str, Any]], dict[str, dict[str, dict[str, Any]]]]


def pool_processes(
    script: Path,
    argv: Sequence[str],
    processes: int,
    tables: Tables,
    *,
    headline: str,
    meta: dict[str, Any],
    json_path: Path | None,
) -> dict[str, Any]:
    """Run ``script`` in fresh processes (:func:`fresh_processes`) and pool its ratios.

    Prints ``headline`` with :func:`run_line` and ``argv``, a line per process as it
    finishes and then, per table, each contender's ratios over the processes: mean ±
    standard error (lowest-highest). Returns (and writes to ``json_path``, if given)
    the pooled report: ``meta`` (the first process's, then this machine's around the
    whole run, then ``meta``), ``pooled`` (``{table: {contender: {ratio: spread}}}``)
    and every process's own report.
    """
    load = load_average()
    print(f"{headline}{run_line(load)}, {processes} processes: {' '.join(argv)}")
    reports: list[dict[str, Any]] = []
    for index, report in enumerate(fresh_processes(script, argv, processes), 1):
        reports.append(report)
        cells = "; ".join(
            f"{title} "
            + ", ".join(
                f"{name} {row['ratio_of_best']:.4f}x / {row['median_paired_ratio']:.4f}x"
                for name, row in list(rows.items())[1:]
            )
            for title, rows in tables(report).items()
        )
        print(f"  process {index}, ratio of best / median paired: {cells}")
    pooled = {
        title: {
            name: {
                figure: spread([tables(r)[title][name][figure] for r in reports])
                for figure in (*RATIOS, *DIFFERENCES)
                if figure in row
            }
            for name, row in rows.items()
        }
        for title, rows in tables(reports[0]).items()
    }
    for title, contenders in pooled.items():
        print(f"\n{title}, over {processes} processes: mean ± standard error (range)")
        header = f"  {'contender':<14}{'ratio of best':>32}{'median paired':>32}"
        if any(DIFFERENCES[0] in figures for figures in contenders.values()):
            header += f"{'µs/step (best)':>28}{'µs/step (paired)':>28}"
        print(header)
        print("  " + "-" * (len(header) - 2))
        for name, figures in contenders.items():
            cells = [_cell(figures[ratio]) for ratio in RATIOS]
            cells += [_us(figures[figure]) for figure in DIFFERENCES if figure in figures]
            print(
                f"  {name:<14}"
                + "".join(f"{cell:>32}" for cell in cells[:2])
                + "".join(f"{cell:>28}" for cell in cells[2:])
            )
    report = {
        "meta": {**reports[0]["meta"], **machine_meta(load), **meta, "processes": processes},
        "pooled": pooled,
        "processes": reports,
    }
    write_report(json_path, report)
    return report


def _cell(row: dict[str, float]) -> str:
    return f"{row['mean']:.4f}x ± {row['standard_error']:.4f} ({row['min']:.3f}-{row['max']:.3f})"


def _us(row: dict[str, float]) -> str:
    return f"{row['mean']:.2f} ± {row['standard_error']:.2f} ({row['min']:.1f}-{row['max']:.1f})"
