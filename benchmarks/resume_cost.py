"""What resuming mid-epoch at batch k costs: the same for every k (skip at the sampler).

A benchmark, not a timed test: it prints a table and never fails on a number::

    python benchmarks/resume_cost.py            # 100 batches of 8, 1 ms per sample
    python benchmarks/resume_cost.py --quick    # tiny, for the smoke test

Method. The dataset's ``__getitem__`` sleeps (``--delay`` ms per sample), so loading
a batch is visibly expensive and any batch loaded only to be thrown away shows. One
straight fit takes ``loop.state_dict()`` at the boundaries before batch k = 0,
10 %, 50 % and 90 % of the epoch (the ``training_start`` observer for k = 0, else
the ``batch_end`` observer of batch k - 1: the exact checkpoint points). Then, for
each k, a fresh loop calls ``fit(resume=payload)`` and the time is measured from
that call to the first ``batch_start`` observer of the resumed run (which then stops
the fit): re-entering fit, epoch and training, rebuilding the data loader, and
fetching batch k.

Two contenders, from the same payloads:

* ``DataLoader``: the loop's own path for a map-style ``DataLoader``: it is rebuilt
  around a batch sampler that skips k index batches, so nothing is loaded for them;
* ``plain iterable``: the same loader wrapped in an object that is only iterable, so the
  loop can do no better than load and discard the first k batches (and warns,
  ``InexactResumeWarning``): what a resume that skips by iterating would cost.

Shuffling draws from the global generator (no generator of the loader's own), so
both contenders read the same payloads. The median of ``--repeats`` runs is shown.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from statemachine_loop import Callback, Stop, TrainingLoop
from statemachine_loop.resume import InexactResumeWarning

FRACTIONS = (0.0, 0.1, 0.5, 0.9)
FEATURES, CLASSES, BATCH = 16, 4, 8


class SlowDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Samples that take ``delay`` seconds each to load, like decoding from disk."""

    def __init__(self, samples: int, delay: float) -> None:
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(samples, FEATURES, generator=generator)
        self.targets = torch.randint(0, CLASSES, (samples,), generator=generator)
        self.delay = delay

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.delay)
        return self.inputs[index], self.targets[index]


class Iterable:
    """Only iterable: the loop cannot reach its sampler."""

    def __init__(self, loader: DataLoader[Any]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)


class TakeAt(Callback):
    """Copies the state at the boundary before each batch index in ``at``; stops after."""

    def __init__(self, at: list[int]) -> None:
        self.at = at
        self.payloads: dict[int, dict[str, Any]] = {}

    def on_training_start(self, loop: TrainingLoop) -> None:
        if 0 in self.at:
            self.payloads[0] = copy.deepcopy(loop.state_dict())

    def on_batch_end(self, loop: TrainingLoop) -> Stop | None:
        if loop.batch_index + 1 in self.at:
            self.payloads[loop.batch_index + 1] = copy.deepcopy(loop.state_dict())
        return Stop("captured") if len(self.payloads) == len(self.at) else None


class FirstBatch(Callback):
    """Notes when the resumed run's first batch starts, then stops the fit."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.batch_index = -1

    def on_batch_start(self, loop: TrainingLoop) -> Stop:
        self.at, self.batch_index = time.perf_counter(), loop.batch_index
        return Stop("measured")


def make_loop(dataset: SlowDataset, wrapped: bool) -> tuple[TrainingLoop, torch.nn.Module]:
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, CLASSES)
    )
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    loop = TrainingLoop(
        training=Iterable(loader) if wrapped else loader,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.functional.cross_entropy,
    )
    return loop, model


def time_to_first_batch(
    dataset: SlowDataset, k: int, payload: dict[str, Any], wrapped: bool
) -> float:
    """Seconds from ``fit(resume=payload)`` to the resumed run's first ``batch_start``."""
    loop, model = make_loop(dataset, wrapped)
    first = FirstBatch()
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InexactResumeWarning)
        loop.fit(model, 1, callbacks=[first], resume=copy.deepcopy(payload))
    assert first.at is not None and first.batch_index == k, (k, first.batch_index)
    return first.at - began


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    """Run the benchmark, print the table, and return the medians in seconds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=None, help="per epoch (default 100)")
    parser.add_argument("--delay", type=float, default=None, help="ms per sample (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per cell (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    batches = args.batches or (20 if args.quick else 100)
    delay = (args.delay if args.delay is not None else 0.2 if args.quick else 1.0) / 1000
    repeats = args.repeats or (1 if args.quick else 5)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dataset = SlowDataset(batches * BATCH, delay)
    ks = sorted({min(batches - 1, round(f * batches)) for f in FRACTIONS})
    loop, model = make_loop(dataset, wrapped=False)
    taker = TakeAt(ks)
    loop.fit(model, 1, callbacks=[taker])
    results: dict[int, dict[str, float]] = {}
    for k in ks:
        runs = {
            name: [
                time_to_first_batch(dataset, k, taker.payloads[k], wrapped) for _ in range(repeats)
            ]
            for name, wrapped in (("DataLoader", False), ("plain iterable", True))
        }
        results[k] = {name: statistics.median(times) for name, times in runs.items()}
    print(
        f"Resume mid-epoch: {batches} batches of {BATCH}, {delay * 1000:g} ms per sample "
        f"({batches * BATCH * delay * 1000:.0f} ms to load an epoch), median of {repeats}."
    )
    print("Time from fit(resume=...) to the first resumed batch_start, in ms:")
    columns = ("resume at batch k", "DataLoader (skip at sampler)", "plain iterable (discard)")
    print(" | ".join(f"{c:>28}" for c in columns))
    print("-+-".join("-" * 28 for _ in columns))
    for k, row in results.items():
        cells = (f"{k} ({k / batches:.0%})", *(f"{t * 1000:.1f}" for t in row.values()))
        print(" | ".join(f"{c:>28}" for c in cells))
    return results


if __name__ == "__main__":
    main()
