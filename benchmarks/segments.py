"""Where the loop's overhead goes: a fit's time split at its batches' forward calls.

A benchmark, not a timed test: it prints a table and never fails on a number::

    python benchmarks/segments.py              # 41 rounds, the tutorial model
    python benchmarks/segments.py --model mnist_mlp --rounds 61
    python benchmarks/segments.py --quick      # a few tiny rounds (the smoke test)

``overhead.py`` says how much slower ``fit`` is than the hand-written loop; this says
*where*. A forward pre-hook on the model stamps the clock as each batch's forward
starts, in the hand-written loop and in ``fit`` alike (the hook costs both the same),
which splits each fit of E epochs of N batches into:

* ``start``: from the call to the first forward (checking the arguments, binding the
  engine, ``fit_start``, ``epoch_start``, ``training_start``, the first fetch);
* ``boundary``: from the last forward of an epoch to the first of the next (one
  batch's step, the phase and epoch ends, the next epoch's starts, its first fetch),
  per boundary;
* ``end``: from the last forward to the return (the last step, the ends, ``fit_end``);
* ``batch``: the median interval between forwards inside an epoch (one step).

The contenders run interleaved, the order rotated each round, with the garbage
collector on and the heap frozen, as in ``overhead.py`` (the transitions engine runs
too, so caches are as cold as there). Reported per segment: the hand-written loop's
median, the loop's, and the median of paired differences (loop - hand-written, same
round), with each segment's share of the whole overhead per fit. At a cold epoch
boundary the same Python costs several times what a warm micro-benchmark says, so
this is where to look before trimming anything.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from overhead import WORKLOADS, contender_runs

from _report import frozen_heap, load_average, run_line

SEGMENTS = ("start", "boundary", "end", "batch")


def split(stamps: list[int], begin: int, finish: int, epochs: int) -> dict[str, float]:
    """One fit's segments in µs from the forward stamps (``epochs`` equal epochs)."""
    per_epoch = len(stamps) // epochs
    edges = {per_epoch * e for e in range(1, epochs)}  # first batch of each later epoch
    steps = [stamps[i] - stamps[i - 1] for i in range(1, len(stamps)) if i not in edges]
    boundaries = [stamps[i] - stamps[i - 1] for i in sorted(edges)]
    return {
        "start": (stamps[0] - begin) / 1e3,
        "boundary": statistics.mean(boundaries) / 1e3 if boundaries else 0.0,
        "end": (finish - stamps[-1]) / 1e3,
        "batch": statistics.median(steps) / 1e3 if steps else 0.0,
        "total": (finish - begin) / 1e3,
    }


def measure(workload: dict[str, Any], *, rounds: int, warmup: int, epochs: int) -> dict[str, Any]:
    """Interleaved rounds of raw, compiled and transitions; the segments of each."""
    runs = contender_runs(workload, epochs)
    stamps: list[int] = []
    clock = time.perf_counter_ns
    hooked = workload["model"].register_forward_pre_hook(lambda *_: stamps.append(clock()))
    names = list(runs)
    found: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    try:
        with frozen_heap():
            for index in range(warmup + rounds):
                shift = index % len(names)
                for name in names[shift:] + names[:shift]:
                    stamps.clear()
                    begin = clock()
                    runs[name]()
                    finish = clock()
                    if index >= warmup:
                        found[name].append(split(stamps, begin, finish, epochs))
    finally:
        hooked.remove()
    return {"epochs": epochs, "batches": len(workload["data"]), "by_contender": found}


def summarize(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per segment: raw and compiled medians, and the median paired difference."""
    raw, loop = result["by_contender"]["raw"], result["by_contender"]["compiled"]
    pairs = list(zip(loop, raw, strict=True))
    summary: dict[str, dict[str, float]] = {}
    for segment in (*SEGMENTS, "total"):
        summary[segment] = {
            "raw_us": statistics.median(r[segment] for r in raw),
            "loop_us": statistics.median(c[segment] for c in loop),
            "paired_us": statistics.median(c[segment] - r[segment] for c, r in pairs),
        }
    return summary


def print_table(name: str, result: dict[str, Any], summary: dict[str, dict[str, float]]) -> None:
    """The segments, with how many times each occurs per fit and its share of the overhead."""
    epochs, batches = result["epochs"], result["batches"]
    times = {"start": 1, "boundary": epochs - 1, "end": 1, "batch": epochs * batches - epochs}
    per_fit = {segment: summary[segment]["paired_us"] * times[segment] for segment in SEGMENTS}
    overhead = sum(per_fit.values())
    print(f"\n{name}, {epochs} epochs x {batches} batches per fit")
    header = (
        f"  {'segment':<10}{'x per fit':>10}{'raw µs':>10}{'loop µs':>10}"
        f"{'loop - raw':>12}{'per fit µs':>12}{'share':>8}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for segment in SEGMENTS:
        row = summary[segment]
        share = per_fit[segment] / overhead if overhead else 0.0
        print(
            f"  {segment:<10}{times[segment]:>10}{row['raw_us']:>10.1f}{row['loop_us']:>10.1f}"
            f"{row['paired_us']:>12.1f}{per_fit[segment]:>12.0f}{share:>8.0%}"
        )
    total = summary["total"]
    print(
        f"  whole fit: raw {total['raw_us']:.0f} µs, loop {total['loop_us']:.0f} µs, "
        f"paired difference {total['paired_us']:.0f} µs (segments add up to {overhead:.0f})"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(WORKLOADS), default="tutorial")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 41)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fit (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="batches per epoch (default 100)")
    parser.add_argument("--quick", action="store_true", help="a few tiny rounds (smoke test)")
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 41)
    steps = args.steps if args.steps is not None else (4 if args.quick else 100)
    if rounds < 1 or steps < 2 or args.epochs < 1:
        parser.error("--rounds and --epochs must be >= 1, --steps >= 2")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    build, batch_size = WORKLOADS[args.model]
    workload = build(steps * batch_size)
    print(f"{run_line(load_average())}, {rounds} rounds (+3 warm-up), interleaved")
    result = measure(workload, rounds=rounds, warmup=3, epochs=args.epochs)
    summary = summarize(result)
    print_table(workload["name"], result, summary)
    return {"result": result, "summary": summary}


if __name__ == "__main__":
    main(sys.argv[1:])
