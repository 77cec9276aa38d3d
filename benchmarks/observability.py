"""Per-step cost of watching a run: ProgressBar + CSVLogger + StructuredLogger(INFO) + accuracy.

A benchmark, not a timed test: it prints a table (and optionally writes JSON) and
never fails on a number. Run it on a quiet machine::

    python benchmarks/observability.py                 # 31 rounds
    python benchmarks/observability.py --rounds 41 --json run/observability.json
    python benchmarks/observability.py --quick         # a few tiny rounds (smoke test)
    python benchmarks/observability.py --processes 8   # in 8 fresh processes, pooled

Workload: the tutorial model, ``Linear(10,50)-ReLU-Linear(50,1)``, MSE, SGD, batch 10,
on the CPU with ``torch.set_num_threads(1)``; the targets are 0/1 so accuracy (one
logit, positive when ``>= 0``) means something. Contenders, all on the same model,
optimizer and ``DataLoader``:

* ``raw``: the hand-written loop doing the same training work: per epoch
  ``model.train()``, grad mode on, ``zero_grad()``; per batch forward, loss, backward,
  ``optimizer.step()``, ``zero_grad()``, and the cheap way to track loss and accuracy
  (append ``loss.detach()``, the batch size, the detached output and the target;
  reduce once per epoch).
* ``loop``: ``TrainingLoop(metrics=["accuracy"], progress=False).fit``, no callbacks:
  the core's share (a default progress bar would be live, and cost, on a terminal).
* ``observed``: the same plus ``ProgressBar`` (off a terminal: one line per phase, to
  a ``StringIO``), ``CSVLogger`` (a row per batch) and ``StructuredLogger`` at INFO,
  writing real files in a temporary directory.

Before timing, one epoch of ``raw`` and of ``observed`` from the same weights must
end with bit-identical parameters and the same loss and accuracy, which shows they
do the same training work. Rounds are interleaved (the order rotated each round),
after warm-up rounds. As in ``benchmarks/overhead.py``, the garbage collector stays
on, as in a user's program, with everything that existed before timing frozen out of
its reach (``gc.freeze``), and there is no ``gc.collect()`` before each fit: that
evicts the caches, so the fit after it starts cold, which penalised the contender
with the most code to reload (the observed loop's fixed cost read 1.14-1.23 ms a fit
with a collection before each fit, 0.71 ms without). Reported for wall-clock time
and for process CPU time (steadier on a shared machine, where a process waits for a
core): µs per step (best and median), the ratio of best-of-rounds times, the median
of the paired per-round ratios, and the overhead in µs per step. ``--processes N``
repeats the whole run in N fresh processes and reports each ratio's mean, standard
error and range over them, as ``benchmarks/overhead.py`` does (one process is one
draw of the memory layout, which moves a ratio by up to about 1 %).
"""

from __future__ import annotations

import argparse
import copy
import functools
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import TrainingLoop
from statemachine_loop.callbacks.csv_logger import CSVLogger
from statemachine_loop.callbacks.progress import ProgressBar
from statemachine_loop.callbacks.structured import StructuredLogger

from _report import (
    add_processes_option,
    frozen_heap,
    load_average,
    machine_meta,
    pool_processes,
    run_line,
    write_report,
)

CONTENDERS = ("raw", "loop", "observed")
#: Wall-clock time, and the process's CPU time (which leaves out time spent
#: descheduled, so it is the steadier of the two on a shared machine).
CLOCKS = ("wall", "cpu")


def raw_fit(
    model: nn.Module, data: DataLoader[Any], optimizer: torch.optim.Optimizer, epochs: int
) -> list[tuple[float, float]]:
    """The hand-written loop: the same training work, loss and accuracy tracked cheaply."""
    results = []
    for _ in range(epochs):
        model.train()
        torch.set_grad_enabled(True)
        optimizer.zero_grad()
        losses: list[torch.Tensor] = []
        sizes: list[int] = []
        outputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        for inputs, target in data:
            output = model(inputs)
            loss = F.mse_loss(output, target)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
            sizes.append(target.shape[0])
            outputs.append(output.detach())
            targets.append(target)
        weights = torch.tensor(sizes, dtype=torch.float64)
        total = (torch.stack(losses).to(torch.float64) * weights).sum()
        correct = ((torch.cat(outputs).reshape(-1) >= 0) == torch.cat(targets).reshape(-1)).sum()
        results.append((float(total) / sum(sizes), int(correct) / sum(sizes)))
    return results


def observed_loop(
    data: DataLoader[Any], optimizer: torch.optim.Optimizer, directory: Path, *, watched: bool
) -> TrainingLoop:
    """The library loop with accuracy, and with the three observers when ``watched``."""
    callbacks: list[Any] = []
    if watched:
        callbacks = [
            ProgressBar(Console(file=io.StringIO())),
            CSVLogger(directory / "log.csv"),
            StructuredLogger(directory / "events.jsonl", level="info"),
        ]
    return TrainingLoop(
        training=data,
        optimizer=optimizer,
        loss_fn=F.mse_loss,
        metrics=["accuracy"],
        callbacks=callbacks,
        progress=False,  # the observed loop brings its own bar; a default one may be live
    )


def check_same_work(model: nn.Module, data: DataLoader[Any], directory: Path) -> None:
    """One epoch of raw and of the observed loop from the same weights must end identical."""
    raw_model, loop_model = copy.deepcopy(model), copy.deepcopy(model)
    raw_opt = torch.optim.SGD(raw_model.parameters(), lr=0.01)
    ((raw_loss, raw_accuracy),) = raw_fit(raw_model, data, raw_opt, 1)
    loop_opt = torch.optim.SGD(loop_model.parameters(), lr=0.01)
    history = observed_loop(data, loop_opt, directory, watched=True).fit(loop_model, 1)
    entry = history.training[-1]
    same = all(
        torch.equal(a, b)
        for a, b in zip(raw_model.parameters(), loop_model.parameters(), strict=True)
    )
    if not same:
        raise SystemExit("raw and observed parameters differ after one epoch.")
    if abs(raw_loss - entry["loss"]) > 1e-9 or raw_accuracy != entry["accuracy"]:
        raise SystemExit(f"raw ({raw_loss}, {raw_accuracy}) != loop ({entry}).")


def _timed(run: Callable[[], object]) -> tuple[int, int]:
    """Wall-clock and process CPU time of one call, in ns."""
    wall, cpu = time.perf_counter_ns(), time.process_time_ns()
    run()
    return time.perf_counter_ns() - wall, time.process_time_ns() - cpu


def measure(*, rounds: int, warmup: int, epochs: int, steps: int) -> dict[str, Any]:
    """Time interleaved rounds of the three contenders; return a summary."""
    inputs = torch.randn(steps * 10, 10)
    target = (inputs.sum(1, keepdim=True) > 0).float()
    data = DataLoader(TensorDataset(inputs, target), batch_size=10)
    model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        check_same_work(model, data, directory)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        loops = {
            name: observed_loop(data, optimizer, directory, watched=name == "observed")
            for name in ("loop", "observed")
        }
        runs: dict[str, Callable[[], object]] = {
            "raw": lambda: raw_fit(model, data, optimizer, epochs),
            "loop": lambda: loops["loop"].fit(model, epochs),
            "observed": lambda: loops["observed"].fit(model, epochs),
        }
        times: dict[str, dict[str, list[float]]] = {
            clock: {name: [] for name in CONTENDERS} for clock in CLOCKS
        }
        with frozen_heap():
            for index in range(warmup + rounds):
                shift = index % len(CONTENDERS)
                for name in CONTENDERS[shift:] + CONTENDERS[:shift]:
                    elapsed = _timed(runs[name])
                    if index >= warmup:
                        for clock, ns in zip(CLOCKS, elapsed, strict=True):
                            times[clock][name].append(ns / 1e3 / (epochs * steps))  # µs/step
        csv_rows = sum(1 for _ in (directory / "log.csv").open()) - 1
        jsonl_records = sum(1 for _ in (directory / "events.jsonl").open())
    return {
        "steps_per_round": epochs * steps,
        "epochs_per_round": epochs,
        "csv_rows_per_fit": csv_rows,
        "jsonl_records_per_fit": jsonl_records,
        "clocks": {clock: _summary(times[clock]) for clock in CLOCKS},
    }


def _summary(times: dict[str, list[float]]) -> dict[str, Any]:
    best_raw, raw = min(times["raw"]), times["raw"]
    return {
        name: {
            "best_us_per_step": min(series),
            "median_us_per_step": statistics.median(series),
            "ratio_of_best": min(series) / best_raw,
            "median_paired_ratio": statistics.median(
                t / r for t, r in zip(series, raw, strict=True)
            ),
            "overhead_us_per_step": min(series) - best_raw,
            "us_per_step_by_round": series,
        }
        for name, series in times.items()
    }


def measure_fixed(*, rounds: int) -> dict[str, float]:
    """What ``observed`` adds per fit regardless of its length, in µs.

    Fits of one epoch of one batch, ``loop`` and ``observed`` interleaved; the median
    of the paired differences: opening, writing and closing the two files, the
    JSONL records of one epoch and the progress line.
    """
    inputs = torch.randn(10, 10)
    data = DataLoader(TensorDataset(inputs, (inputs.sum(1, keepdim=True) > 0).float()), 10)
    model = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with tempfile.TemporaryDirectory() as tmp:
        loops = [
            observed_loop(data, optimizer, Path(tmp), watched=watched) for watched in (False, True)
        ]
        pairs: dict[str, list[float]] = {clock: [] for clock in CLOCKS}
        with frozen_heap():
            for index in range(rounds + 3):
                bare, watched = (_timed(functools.partial(loop.fit, model, 1)) for loop in loops)
                if index >= 3:
                    for clock, b, w in zip(CLOCKS, bare, watched, strict=True):
                        pairs[clock].append((w - b) / 1e3)
    return {clock: statistics.median(values) for clock, values in pairs.items()}


def print_table(result: dict[str, Any]) -> None:
    """A readable table of the results."""
    print(
        f"\ntutorial model, {result['steps_per_round']} steps per round "
        f"({result['epochs_per_round']} epochs); observed writes {result['csv_rows_per_fit']} "
        f"CSV rows and {result['jsonl_records_per_fit']} JSONL records per fit"
    )
    for clock, contenders in result["clocks"].items():
        header = (
            f"  {clock + ' clock':<10}{'best µs/step':>14}{'median µs/step':>16}"
            f"{'ratio of best':>15}{'median paired':>15}{'overhead µs/step':>18}"
        )
        print(header)
        print("  " + "-" * (len(header) - 2))
        for name, row in contenders.items():
            print(
                f"  {name:<10}{row['best_us_per_step']:>14.2f}{row['median_us_per_step']:>16.2f}"
                f"{row['ratio_of_best']:>14.4f}x{row['median_paired_ratio']:>14.4f}x"
                f"{row['overhead_us_per_step']:>18.2f}"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, measure, print the table, write JSON if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 31)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fit (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="batches per epoch (default 500)")
    parser.add_argument("--quick", action="store_true", help="a few tiny rounds (smoke test)")
    add_processes_option(parser)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    defaults = (
        {"rounds": 3, "warmup": 1, "epochs": 1, "steps": 5}
        if args.quick
        else {"rounds": 31, "warmup": 3, "epochs": 2, "steps": 500}
    )
    rounds, warmup, epochs, steps = (
        defaults[key] if getattr(args, key) is None else getattr(args, key)
        for key in ("rounds", "warmup", "epochs", "steps")
    )
    if rounds < 1 or warmup < 0 or epochs < 1 or steps < 1 or args.processes < 1:
        parser.error("--rounds, --epochs, --steps and --processes must be >= 1, --warmup >= 0")
    torch.set_num_threads(1)
    if args.processes > 1:
        child = ["--rounds", rounds, "--warmup", warmup, "--epochs", epochs, "--steps", steps]
        return pool_processes(  # a table per clock, "wall" and "cpu", as each process reports it
            Path(__file__),
            list(map(str, child)),
            args.processes,
            lambda report: report["tutorial"]["clocks"],
            headline="",
            meta={"quick": args.quick},
            json_path=args.json,
        )
    torch.manual_seed(0)
    load = load_average()
    print(f"{run_line(load)}, {rounds} rounds (+{warmup} warm-up), interleaved")
    result = measure(rounds=rounds, warmup=warmup, epochs=epochs, steps=steps)
    result["fixed_us_per_fit"] = measure_fixed(rounds=max(rounds, 21))
    print_table(result)
    fixed = result["fixed_us_per_fit"]
    print(
        f"\n  fixed cost of observed per fit (median of paired 1-batch fits): "
        f"{fixed['wall']:.0f} µs wall, {fixed['cpu']:.0f} µs CPU"
    )
    report = {
        "meta": {
            **machine_meta(load),
            "rounds": rounds,
            "warmup": warmup,
            "quick": args.quick,
        },
        "tutorial": result,
    }
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
