"""Per-step overhead of ``TrainingLoop.fit`` against a hand-written loop doing the same work.

A benchmark, not a timed test: it prints a table (and optionally writes JSON) and
never fails on a number. Run it on a quiet machine::

    python benchmarks/overhead.py                 # 31 rounds, both models
    python benchmarks/overhead.py --rounds 41 --json run/overhead.json
    python benchmarks/overhead.py --quick         # a few tiny rounds (the smoke test)
    python benchmarks/overhead.py --processes 8   # the whole run in 8 fresh processes, pooled
    python benchmarks/overhead.py --processes 8 --gc as-is   # the heap as a user's has it

Method. Everything runs in one process on the CPU with ``torch.set_num_threads(1)``.
The same model, optimizer and ``DataLoader`` serve every contender:

* ``raw``: the loop a careful user writes by hand, doing exactly the work the library
  does on a training batch with no callbacks and no validation: iterate the
  ``DataLoader``, forward, loss, backward, ``optimizer.step()``,
  ``optimizer.zero_grad()`` (``set_to_none=True``, the default the loop uses too), and
  the cheap loss metric: append ``loss.detach()`` and the batch size per batch, reduce
  once per epoch on the device (float64, sample-weighted, as the built-in loss metric does).
  Per epoch it also does what the loop's ``training_start`` does: ``model.train()``,
  grad mode on, ``zero_grad()``.
* ``compiled``: ``TrainingLoop(...).fit`` with the default engine and no callbacks
  (``progress=False`` where the loop has a default progress display).
* ``fit_end_x100``: the same with a hundred callbacks that hook only ``fit_end``: the
  engine works out once per fit which callbacks hook each event, so a batch must cost
  what it costs with none.
* ``transitions``: the same with ``engine="transitions"`` (every event through
  ``Machine.trigger``), for reference.

Before timing, one epoch of ``raw`` and of ``compiled`` from the same initial weights
must give bit-identical parameters (and the same epoch loss), which shows the two do
the same work. This machine's noise (2-5 % between two identical raw runs) is as
large as the budget, so the contenders are *interleaved*: each round times one
``fit`` of each (``--epochs`` epochs, the order rotated every round so none always
runs first), after warm-up rounds. The garbage collector stays on. By default
(``--gc frozen``) everything that existed before timing is frozen out of its reach
(``gc.freeze``), so a collection costs what the timed fits allocate; ``--gc as-is``
leaves the heap as a user's fresh process has it, torch's modules included. There is
no ``gc.collect()`` before each fit, which would evict the caches. Reported per model
and contender: µs per step, best and median over rounds; the ratio of best-of-rounds
times (``best / best raw``); the median of the paired ratios ``t_i / raw_i`` of the
same round, with their quartiles; and the overhead in µs per step, as best minus best
raw and as the median of the paired differences ``t_i - raw_i``.

Part of that overhead does not grow with the number of batches: checking the
arguments and preparing the engine once per ``fit``, opening and closing the epoch and
phase scopes once per epoch. It is measured on its own, as the median of paired
differences between fits of ``compiled`` and ``raw`` with the same epochs of one batch
each (interleaved, same heap treatment), and reported in µs per fit, with the ratio of
best times once it is taken out (``(best - fixed / steps) / best raw``): what a batch
costs in epochs long enough for the set-up not to matter.

One process is one draw of where code and objects land in memory, which moves a
ratio by up to about 1 % for the process's whole life; ``--processes N`` repeats the
whole run in N fresh interpreters, one after another, and reports each ratio's mean
over them with its standard error and range (the per-process reports are kept in the
JSON).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from statemachine_loop import Callback, TrainingLoop

from _report import (
    add_gc_option,
    add_processes_option,
    load_average,
    machine_meta,
    pool_processes,
    run_line,
    timing_heap,
    write_report,
)

CONTENDERS = ("raw", "compiled", "fit_end_x100", "transitions")


class FitEndOnly(Callback):
    """A callback that hooks ``fit_end`` alone: a hundred of them must cost a batch nothing."""

    def on_fit_end(self, loop: Any) -> None:
        """Nothing: the hook's existence is what is measured."""


def bare_loop(**options: Any) -> TrainingLoop:
    """A ``TrainingLoop`` with no callbacks at all (no default progress display either)."""
    if "progress" in inspect.signature(TrainingLoop).parameters:
        options["progress"] = False
    return TrainingLoop(**options)


# -- the two workloads ----------------------------------------------------------------


def tutorial_workload(samples: int) -> dict[str, Any]:
    """The tutorial model: Linear 10-50-1, MSE, SGD, batch 10."""
    inputs, target = torch.randn(samples, 10), torch.randn(samples, 1)
    return {
        "name": "tutorial",
        "description": "Linear(10,50)-ReLU-Linear(50,1), MSE, SGD, batch 10",
        "model": nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1)),
        "data": DataLoader(TensorDataset(inputs, target), batch_size=10),
        "loss_fn": F.mse_loss,
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.01),
    }


def mnist_workload(samples: int) -> dict[str, Any]:
    """An MNIST-sized MLP: Linear 784-128-10, cross-entropy, SGD, batch 64."""
    inputs, target = torch.randn(samples, 784), torch.randint(0, 10, (samples,))
    return {
        "name": "mnist_mlp",
        "description": "Linear(784,128)-ReLU-Linear(128,10), cross-entropy, SGD, batch 64",
        "model": nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)),
        "data": DataLoader(TensorDataset(inputs, target), batch_size=64),
        "loss_fn": F.cross_entropy,
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.01),
    }


#: Each workload's factory (given a number of samples) and batch size, by name.
WORKLOADS: dict[str, tuple[Callable[[int], dict[str, Any]], int]] = {
    "tutorial": (tutorial_workload, 10),
    "mnist_mlp": (mnist_workload, 64),
}


# -- the hand-written loop -------------------------------------------------------------


def raw_fit(
    model: nn.Module,
    data: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
) -> list[float]:
    """The hand-written loop: the same work as ``TrainingLoop.fit`` with no callbacks."""
    epoch_losses = []
    for _ in range(epochs):
        model.train()
        torch.set_grad_enabled(True)
        optimizer.zero_grad()
        losses: list[torch.Tensor] = []
        sizes: list[int] = []
        for inputs, target in data:
            output = model(inputs)
            loss = loss_fn(output, target)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
            sizes.append(target.shape[0])
        weights = torch.tensor(sizes, dtype=torch.float64)
        total = (torch.stack(losses).to(torch.float64) * weights).sum()
        epoch_losses.append(float(total) / sum(sizes))
    return epoch_losses


# -- measuring -------------------------------------------------------------------------


def check_same_work(workload: dict[str, Any]) -> None:
    """One epoch of raw and of the loop from the same weights must end bit-identical."""
    results = []
    for contender in ("raw", "compiled"):
        model = copy.deepcopy(workload["model"])
        optimizer = workload["optimizer"](model.parameters())
        if contender == "raw":
            (epoch_loss,) = raw_fit(model, workload["data"], optimizer, workload["loss_fn"], 1)
        else:
            loop = bare_loop(
                training=workload["data"], optimizer=optimizer, loss_fn=workload["loss_fn"]
            )
            epoch_loss = loop.fit(model, epochs=1).training[-1]["loss"]
        results.append((epoch_loss, [p.detach().clone() for p in model.parameters()]))
    (raw_loss, raw_params), (loop_loss, loop_params) = results
    if not all(torch.equal(a, b) for a, b in zip(raw_params, loop_params, strict=True)):
        raise SystemExit(f"{workload['name']}: raw and loop parameters differ after one epoch.")
    if abs(raw_loss - loop_loss) > 1e-9 * max(1.0, abs(raw_loss)):
        raise SystemExit(f"{workload['name']}: epoch loss {raw_loss!r} (raw) != {loop_loss!r}.")


def _timed(run: Callable[[], object]) -> int:
    start = time.perf_counter_ns()
    run()
    return time.perf_counter_ns() - start


def contender_runs(workload: dict[str, Any], epochs: int) -> dict[str, Callable[[], object]]:
    """One fit of ``epochs`` epochs per contender, all on the workload's model and data."""
    model, data, loss_fn = workload["model"], workload["data"], workload["loss_fn"]
    optimizer = workload["optimizer"](model.parameters())
    loops = {
        engine: bare_loop(training=data, optimizer=optimizer, loss_fn=loss_fn, engine=engine)
        for engine in ("compiled", "transitions")
    }
    loops["fit_end_x100"] = bare_loop(
        training=data,
        optimizer=optimizer,
        loss_fn=loss_fn,
        callbacks=[FitEndOnly() for _ in range(100)],
    )
    return {
        "raw": lambda: raw_fit(model, data, optimizer, loss_fn, epochs),
        **{name: (lambda loop=loop: loop.fit(model, epochs)) for name, loop in loops.items()},
    }


def measure(
    workload: dict[str, Any], *, rounds: int, warmup: int, epochs: int, gc_mode: str = "frozen"
) -> dict[str, Any]:
    """Time interleaved rounds of every contender on one workload; return a summary."""
    check_same_work(workload)
    runs = contender_runs(workload, epochs)
    steps = epochs * len(workload["data"])
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    with timing_heap(gc_mode):
        for index in range(warmup + rounds):
            shift = index % len(CONTENDERS)
            for name in CONTENDERS[shift:] + CONTENDERS[:shift]:
                elapsed = _timed(runs[name])
                if index >= warmup:
                    times[name].append(elapsed / 1e3 / steps)  # µs per step
    result = summarize(workload, times, steps=steps, epochs=epochs)
    fixed = measure_fixed(workload, rounds=rounds, epochs=epochs, gc_mode=gc_mode)
    compiled = result["contenders"]["compiled"]
    result["compiled_fixed_us_per_fit"] = fixed
    result["compiled_ratio_of_best_without_setup"] = (
        compiled["best_us_per_step"] - fixed / steps
    ) / result["contenders"]["raw"]["best_us_per_step"]
    return result


def measure_fixed(
    workload: dict[str, Any], *, rounds: int, epochs: int, gc_mode: str = "frozen"
) -> float:
    """What ``compiled`` adds per fit of ``epochs`` epochs, whatever their length, in µs.

    Fits of ``epochs`` epochs of one batch each, ``raw`` and ``compiled`` interleaved
    (the order alternating); the median of the paired differences, which includes
    those few batches' own overhead (a few µs).
    """
    model, loss_fn, batches = workload["model"], workload["loss_fn"], workload["data"]
    size = batches.batch_size or 1
    one = DataLoader(Subset(batches.dataset, range(size)), batch_size=size)
    optimizer = workload["optimizer"](model.parameters())
    loop = bare_loop(training=one, optimizer=optimizer, loss_fn=loss_fn)
    runs = (
        lambda: raw_fit(model, one, optimizer, loss_fn, epochs),
        lambda: loop.fit(model, epochs),
    )
    differences: list[float] = []
    with timing_heap(gc_mode):
        for index in range(rounds + 3):
            order = runs if index % 2 else runs[::-1]
            first, second = (_timed(run) for run in order)
            raw, compiled = (first, second) if index % 2 else (second, first)
            if index >= 3:
                differences.append((compiled - raw) / 1e3)
    return statistics.median(differences)


def summarize(
    workload: dict[str, Any], times: dict[str, list[float]], *, steps: int, epochs: int
) -> dict[str, Any]:
    """Best/median µs per step, both ratios and the overhead, per contender."""
    raw = times["raw"]
    best_raw = min(raw)
    contenders: dict[str, Any] = {}
    for name in CONTENDERS:
        series = times[name]
        best = min(series)
        paired = [t / r for t, r in zip(series, raw, strict=True)]
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        contenders[name] = {
            "best_us_per_step": best,
            "median_us_per_step": statistics.median(series),
            "ratio_of_best": best / best_raw,
            "median_paired_ratio": statistics.median(paired),
            "median_paired_difference_us": statistics.median(
                t - r for t, r in zip(series, raw, strict=True)
            ),
            "paired_ratio_quartiles": [quartiles[0], quartiles[2]],
            "overhead_us_per_step": best - best_raw,
            "us_per_step_by_round": series,
        }
    return {
        "description": workload["description"],
        "steps_per_round": steps,
        "epochs_per_round": epochs,
        "batches_per_epoch": steps // epochs,
        "contenders": contenders,
    }


# -- reporting -------------------------------------------------------------------------


def print_table(name: str, result: dict[str, Any]) -> None:
    """A readable table of one workload's results."""
    print(f"\n{name}: {result['description']}")
    print(
        f"  {result['steps_per_round']} steps per round "
        f"({result['epochs_per_round']} epochs x {result['batches_per_epoch']} batches)"
    )
    header = (
        f"  {'contender':<12}{'best µs/step':>14}{'median µs/step':>16}{'ratio of best':>15}"
        f"{'median paired':>15}{'paired IQR':>17}{'overhead µs/step':>18}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for contender, row in result["contenders"].items():
        low, high = row["paired_ratio_quartiles"]
        print(
            f"  {contender:<12}{row['best_us_per_step']:>14.2f}{row['median_us_per_step']:>16.2f}"
            f"{row['ratio_of_best']:>14.4f}x{row['median_paired_ratio']:>14.4f}x"
            f"{f'{low:.3f}-{high:.3f}':>17}{row['overhead_us_per_step']:>18.2f}"
        )
    fixed = result["compiled_fixed_us_per_fit"]
    print(
        f"  compiled's set-up per fit (median of paired fits of 1-batch epochs): {fixed:.0f} µs, "
        f"{fixed / result['steps_per_round']:.2f} µs a step at this length; without it, "
        f"ratio of best {result['compiled_ratio_of_best_without_setup']:.4f}x"
    )


def _commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), if git can tell."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "statemachine_loop"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, run both workloads, print the tables, write JSON if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 31)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fit (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="batches per epoch (default 100)")
    parser.add_argument("--quick", action="store_true", help="a few tiny rounds (smoke test)")
    parser.add_argument(
        "--model",
        choices=(*WORKLOADS, "all"),
        default="all",
        help="which workload to run",
    )
    add_processes_option(parser)
    add_gc_option(parser)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    quick = {"rounds": 3, "warmup": 1, "epochs": 1, "steps": 5}
    full = {"rounds": 31, "warmup": 3, "epochs": 2, "steps": 100}
    defaults = quick if args.quick else full
    rounds, warmup, epochs, steps = (
        defaults[key] if getattr(args, key) is None else getattr(args, key)
        for key in ("rounds", "warmup", "epochs", "steps")
    )
    if rounds < 1 or warmup < 0 or epochs < 1 or steps < 1 or args.processes < 1:
        parser.error("--rounds, --epochs, --steps and --processes must be >= 1, --warmup >= 0")
    torch.set_num_threads(1)  # before the branch: --processes reports the threads its runs use
    if args.processes > 1:
        child = ["--rounds", rounds, "--warmup", warmup, "--epochs", epochs, "--steps", steps]
        child += ["--gc", args.gc]
        return pool_processes(
            Path(__file__),
            [*map(str, child), "--model", args.model],
            args.processes,
            lambda report: {
                name: result["contenders"] for name, result in report["models"].items()
            },
            headline=f"statemachine_loop {_commit()}, ",
            meta={"quick": args.quick},
            json_path=args.json,
        )

    torch.manual_seed(0)
    chosen = list(WORKLOADS) if args.model == "all" else [args.model]
    load = load_average()
    print(
        f"statemachine_loop {_commit()}, {run_line(load)}, "
        f"{rounds} rounds (+{warmup} warm-up), interleaved, heap {args.gc}"
    )
    results: dict[str, Any] = {}
    for name in chosen:
        factory, batch = WORKLOADS[name]
        results[name] = measure(
            factory(steps * batch), rounds=rounds, warmup=warmup, epochs=epochs, gc_mode=args.gc
        )
        print_table(name, results[name])
    report = {
        "meta": {
            **machine_meta(load),
            "commit": _commit(),
            "rounds": rounds,
            "warmup": warmup,
            "epochs": epochs,
            "steps_per_epoch": steps,
            "gc": args.gc,
            "quick": args.quick,
        },
        "models": results,
    }
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
