"""Per-step cost of ``TrainingLoop.fit`` against Ignite, Lightning and fastai, measured here.

A benchmark, not a timed test: it prints tables (one in Markdown, ready for the README)
and optionally writes JSON; it never fails on a number. The peers are an optional extra
that keeps the torch pin (``make bench-peers`` builds ``.venv-peers``); a peer whose
import fails is reported as not installed, so the script also runs in the project's own
``.venv``, where only ``raw`` and ``statemachine_loop`` are measured::

    python benchmarks/peers.py                      # 21 rounds of 2,000-step fits
    python benchmarks/peers.py --rounds 41 --json run/peers.json
    python benchmarks/peers.py --quick              # a few tiny rounds (the smoke test)

Workload. The tutorial model, ``Linear(10, 50)-ReLU-Linear(50, 1)``, MSE, SGD at lr 0.01,
batches of 10 random samples, one epoch of ``--steps`` batches per fit (2,000 by default,
so a framework's fixed start-up cost is amortised), on the CPU with
``torch.set_num_threads(1)``. The model is so small that a step is almost all framework
and PyTorch dispatch, which is what is being compared: on a real model the differences
shrink into the model's own time.

A *fit* is everything from a built model and data loaders to a trained model: the
optimizer, the framework's trainer object and its fit call. The contenders:

* ``raw``: the loop a careful user writes by hand (the one of ``overhead.py``): forward,
  loss, backward, ``step()``, ``zero_grad()``, appending ``loss.detach()`` per batch and
  reducing once per epoch.
* ``statemachine_loop``: ``TrainingLoop(..., progress=False).fit(model, 1)``, the
  compiled engine, no callbacks.
* ``ignite``: ``create_supervised_trainer(model, optimizer, loss_fn).run(data)``, no
  handlers. Its default step also runs ``model.train()`` and ``loss.item()`` per batch.
* ``lightning``: a ``LightningModule`` whose ``training_step`` returns the loss and whose
  ``configure_optimizers`` returns the SGD; ``Trainer(accelerator="cpu", devices=1,
  max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
  enable_model_summary=False)``, its leanest configuration short of ``barebones=True``
  (which also forbids ``self.log``, and measured no faster here). Still on: its
  prefetching data fetcher, the ``LightningOptimizer`` closure, the hook chain per batch
  (module, callbacks, strategy; three profiler ``record_function`` ranges per step with
  no profiler set), progress counters and, per fit, its signal handlers. Its info logs
  (the accelerator report) go to a logger set to WARNING.
* ``fastai``: ``Learner(DataLoaders(train, valid), model, loss_func=...,
  opt_func=partial(OptimWrapper, opt=torch.optim.SGD), lr=0.01)`` over plain PyTorch
  ``DataLoader``\\ s, fitted under ``learn.no_bar()`` and ``learn.no_logging()``: its
  default callbacks (``TrainEvalCallback``, ``Recorder`` with its smoothed loss,
  ``CastToTensor``) less the progress bar and the printed log. fastai always validates
  after an epoch, so it gets a one-batch validation loader: one extra forward per fit.

Same work. Every contender trains its own copy of one initial model on the same batches
in the same order. Before timing, one epoch from the same initial weights is run with a
loss function that records each training loss, and the table shows, per contender,
the training steps taken, the epoch's mean training loss, the loss of the trained model
on the whole training set and the largest parameter difference from ``raw``: these
should agree to float rounding (a framework's optimizer wrapper could change the order
of operations; a difference is reported, not hidden).

Timing, as in ``overhead.py``: one process, the contenders *interleaved* in rounds (each
round times, for every contender, one long fit and then three 1-step fits back to back,
keeping the fastest; the order of contenders rotated every round), after warm-up rounds,
with what existed before timing frozen out of the garbage collector's reach
(``gc.freeze``). Reported per contender: µs per step of the long fit (best of rounds; the
fixed cost is included, amortised over the steps), the ratio of best-of-rounds times to
``raw`` and the median of the per-round paired ratios, the fixed cost of a fit (the best
1-step fit minus one step), and the per-step cost net of the fixed cost. A shared virtual
machine drifts between fast and slow periods (up to twice as slow, for seconds at a time,
with no sign in the load average), so quote the best of rounds; the paired median says
how steady the ratio is.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _report import frozen_heap, load_average, machine_meta, run_line, write_report

LEARNING_RATE = 0.01
BATCH = 10
#: 1-step fits timed back to back, keeping the fastest: the first one after a long fit runs
#: about 1 ms slower where that fit kept 2,000 loss tensors, paying for what it left behind.
ONE_STEP_REPEATS = 3
TIMES = "\N{MULTIPLICATION SIGN}"
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``fit(model, train, valid, loss_fn)``: train ``model`` for one epoch of ``train``.
Fit = Callable[[nn.Module, DataLoader[Any], DataLoader[Any], LossFn], None]


@dataclass
class Contender:
    """One framework: how to fit with it, or why it cannot be measured here."""

    name: str
    label: str
    distribution: str | None
    fit: Fit | None = None
    missing: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def version(self) -> str | None:
        if self.distribution is None:
            return None
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return None


# -- the contenders --------------------------------------------------------------------


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)


def raw_fit(
    model: nn.Module, train: DataLoader[Any], valid: DataLoader[Any], loss_fn: LossFn
) -> None:
    """The hand-written loop: the work ``TrainingLoop.fit`` does with no callbacks."""
    optimizer = _sgd(model)
    model.train()
    torch.set_grad_enabled(True)
    optimizer.zero_grad()
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    for inputs, target in train:
        loss = loss_fn(model(inputs), target)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        sizes.append(target.shape[0])
    weights = torch.tensor(sizes, dtype=torch.float64)
    float((torch.stack(losses).to(torch.float64) * weights).sum() / sum(sizes))


def _raw() -> Contender:
    return Contender("raw", "hand-written loop", None, fit=raw_fit)


def _statemachine_loop() -> Contender:
    contender = Contender("statemachine_loop", "statemachine_loop", "statemachine-loop")
    try:
        from statemachine_loop import TrainingLoop
    except Exception as error:
        return _missing(contender, error)

    def fit(
        model: nn.Module, train: DataLoader[Any], valid: DataLoader[Any], loss_fn: LossFn
    ) -> None:
        loop = TrainingLoop(training=train, optimizer=_sgd(model), loss_fn=loss_fn, progress=False)
        loop.fit(model, 1)

    contender.fit = fit
    contender.notes.append("compiled engine, progress=False, no callbacks")
    return contender


def _ignite() -> Contender:
    contender = Contender("ignite", "Ignite", "pytorch-ignite")
    try:
        from ignite.engine import (  # type: ignore[import-not-found, import-untyped, unused-ignore]
            create_supervised_trainer,
        )
    except Exception as error:
        return _missing(contender, error)

    def fit(
        model: nn.Module, train: DataLoader[Any], valid: DataLoader[Any], loss_fn: LossFn
    ) -> None:
        create_supervised_trainer(model, _sgd(model), loss_fn).run(train, max_epochs=1)

    contender.fit = fit
    contender.notes.append(
        "create_supervised_trainer, no handlers; its step also calls model.train() and "
        "loss.item() every batch"
    )
    return contender


def _lightning() -> Contender:
    contender = Contender("lightning", "Lightning", "lightning")
    try:
        import lightning  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except Exception as error:
        return _missing(contender, error)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    class Module(lightning.LightningModule):  # type: ignore[misc, unused-ignore]
        def __init__(self, net: nn.Module, loss_fn: LossFn) -> None:
            super().__init__()
            self.net = net
            self.loss_fn = loss_fn

        def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
            inputs, target = batch
            return self.loss_fn(self.net(inputs), target)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _sgd(self.net)

    def fit(
        model: nn.Module, train: DataLoader[Any], valid: DataLoader[Any], loss_fn: LossFn
    ) -> None:
        trainer = lightning.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Module(model, loss_fn), train_dataloaders=train)

    contender.fit = fit
    contender.notes.append(
        "Trainer(accelerator='cpu', devices=1, logger=False, enable_checkpointing=False, "
        "enable_progress_bar=False, enable_model_summary=False); still runs its prefetching "
        "data fetcher, the LightningOptimizer closure, the per-batch hook chain and progress "
        "counters"
    )
    return contender


def _fastai() -> Contender:
    contender = Contender("fastai", "fastai", "fastai")
    try:
        # fastai.callback.progress adds ProgressCallback to the default callbacks.
        import fastai.callback.progress  # type: ignore[import-not-found, import-untyped, unused-ignore]  # noqa: F401
        from fastai.data.core import DataLoaders  # type: ignore[import-not-found, import-untyped, unused-ignore]
        from fastai.learner import Learner  # type: ignore[import-not-found, import-untyped, unused-ignore]
        from fastai.optimizer import OptimWrapper  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except Exception as error:
        return _missing(contender, error)

    def fit(
        model: nn.Module, train: DataLoader[Any], valid: DataLoader[Any], loss_fn: LossFn
    ) -> None:
        learn = Learner(
            DataLoaders(train, valid),
            model,
            loss_func=loss_fn,
            opt_func=partial(OptimWrapper, opt=torch.optim.SGD),
            lr=LEARNING_RATE,
        )
        with learn.no_bar(), learn.no_logging():
            learn.fit(1)

    contender.fit = fit
    contender.notes.append(
        "Learner over plain DataLoaders, default callbacks (TrainEvalCallback, Recorder, "
        "CastToTensor) under no_bar() and no_logging(); validates one batch per fit"
    )
    return contender


def _missing(contender: Contender, error: Exception) -> Contender:
    if isinstance(error, ModuleNotFoundError):
        contender.missing = "not installed"
    else:
        contender.missing = f"not installed (import failed: {type(error).__name__}: {error})"
        if "torchvision" in str(error):
            contender.missing += (
                "; PyPI's torchvision for this torch is a CUDA build that cannot load against "
                "the CPU torch: uninstall it, as make bench-peers does"
            )
    return contender


FACTORIES = (_raw, _statemachine_loop, _ignite, _lightning, _fastai)


# -- the workload ----------------------------------------------------------------------


def tutorial_model() -> nn.Module:
    """The tutorial's SimpleNN: Linear 10-50-1."""
    return nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1))


def loader(samples: int) -> DataLoader[Any]:
    """Random regression data in batches of ten, in a fixed order."""
    dataset = TensorDataset(torch.randn(samples, 10), torch.randn(samples, 1))
    return DataLoader(dataset, batch_size=BATCH)


# -- same work -------------------------------------------------------------------------


def check_same_work(
    contenders: list[Contender],
    initial: nn.Module,
    train: DataLoader[Any],
    valid: DataLoader[Any],
) -> dict[str, dict[str, Any]]:
    """One epoch of each from the same weights: steps, losses and parameters compared."""
    inputs, target = train.dataset.tensors  # type: ignore[attr-defined]
    results: dict[str, dict[str, Any]] = {}
    reference: list[torch.Tensor] | None = None
    for contender in contenders:
        assert contender.fit is not None
        model = copy.deepcopy(initial)
        recorded: list[torch.Tensor] = []

        def recording(
            output: torch.Tensor, goal: torch.Tensor, recorded: list[Any] = recorded
        ) -> torch.Tensor:
            loss = F.mse_loss(output, goal)
            if torch.is_grad_enabled():  # a training step, not fastai's validation
                recorded.append(loss.detach())
            return loss

        contender.fit(model, train, valid, recording)
        torch.set_num_threads(1)
        params = [p.detach().clone() for p in model.parameters()]
        if reference is None:
            reference = params
        with torch.no_grad():
            final_loss = float(F.mse_loss(model(inputs), target))
        results[contender.name] = {
            "training_steps": len(recorded),
            "epoch_mean_loss": float(torch.stack(recorded).double().mean()) if recorded else None,
            "final_loss_on_training_set": final_loss,
            "max_abs_param_diff_from_raw": max(
                float((a - b).abs().max()) for a, b in zip(params, reference, strict=True)
            ),
        }
    for row in results.values():
        row["same_work"] = (
            row["training_steps"] == len(train)
            and row["max_abs_param_diff_from_raw"] <= 1e-5
            and abs(
                row["final_loss_on_training_set"] - results["raw"]["final_loss_on_training_set"]
            )
            <= 1e-6 * max(1.0, results["raw"]["final_loss_on_training_set"])
        )
    return results


# -- measuring -------------------------------------------------------------------------


def measure(
    contenders: list[Contender],
    initial: nn.Module,
    long: DataLoader[Any],
    one: DataLoader[Any],
    valid: DataLoader[Any],
    *,
    rounds: int,
    warmup: int,
) -> dict[str, dict[str, list[float]]]:
    """Interleaved rounds: per contender, one long fit and the best of three 1-step fits."""
    models = {c.name: copy.deepcopy(initial) for c in contenders}
    times: dict[str, dict[str, list[float]]] = {c.name: {"long": [], "one": []} for c in contenders}
    with frozen_heap():
        for index in range(warmup + rounds):
            shift = index % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                model = models[contender.name]
                elapsed = {
                    "long": _timed_fit(contender, model, long, valid),
                    "one": min(
                        _timed_fit(contender, model, one, valid) for _ in range(ONE_STEP_REPEATS)
                    ),
                }
                if index >= warmup:
                    for kind, microseconds in elapsed.items():
                        times[contender.name][kind].append(microseconds)
    return times


def _timed_fit(
    contender: Contender, model: nn.Module, train: DataLoader[Any], valid: DataLoader[Any]
) -> float:
    """One fit's wall time in µs; a peer that changes torch's thread count is noted."""
    assert contender.fit is not None
    start = time.perf_counter_ns()
    contender.fit(model, train, valid, F.mse_loss)
    elapsed = (time.perf_counter_ns() - start) / 1e3
    if torch.get_num_threads() != 1:
        contender.notes.append("changed torch's thread count (reset to 1)")
        torch.set_num_threads(1)
    return elapsed


def summarize(
    contenders: list[Contender], times: dict[str, dict[str, list[float]]], steps: int
) -> dict[str, dict[str, Any]]:
    """Best and median µs per step, both ratios to raw, and the fixed cost per fit."""
    raw_long = [t / steps for t in times["raw"]["long"]]
    summary: dict[str, dict[str, Any]] = {}
    for contender in contenders:
        per_step = [t / steps for t in times[contender.name]["long"]]
        one = times[contender.name]["one"]
        best, best_one = min(per_step), min(one)
        net = (min(times[contender.name]["long"]) - best_one) / (steps - 1) if steps > 1 else best
        summary[contender.name] = {
            "best_us_per_step": best,
            "median_us_per_step": statistics.median(per_step),
            "ratio_of_best": best / min(raw_long),
            "median_paired_ratio": statistics.median(
                t / r for t, r in zip(per_step, raw_long, strict=True)
            ),
            "fixed_ms_per_fit": max(0.0, best_one - net) / 1e3,
            "one_step_fit_best_ms": best_one / 1e3,
            "net_us_per_step": net,
            "us_per_step_by_round": per_step,
            "one_step_fit_ms_by_round": [t / 1e3 for t in one],
        }
    return summary


# -- reporting -------------------------------------------------------------------------


def print_same_work(checks: dict[str, dict[str, Any]], steps: int) -> None:
    print(f"\nsame work: one epoch of {steps} steps from the same initial weights")
    print(
        f"  {'contender':<19}{'steps':>7}{'epoch mean loss':>18}{'final loss':>14}"
        f"{'max |Δparam| vs raw':>22}  same"
    )
    for name, row in checks.items():
        mean = row["epoch_mean_loss"]
        print(
            f"  {name:<19}{row['training_steps']:>7}{mean if mean is None else f'{mean:.9f}':>18}"
            f"{row['final_loss_on_training_set']:>14.9f}{row['max_abs_param_diff_from_raw']:>22.3g}"
            f"  {'yes' if row['same_work'] else 'NO'}"
        )


def print_console(contenders: list[Contender], summary: dict[str, dict[str, Any]]) -> None:
    header = (
        f"  {'contender':<19}{'best µs/step':>13}{'median':>9}{'ratio best':>12}"
        f"{'med. paired':>13}{'fixed ms/fit':>14}{'net µs/step':>13}"
    )
    print("\n" + header)
    print("  " + "-" * (len(header) - 2))
    for contender in contenders:
        if contender.missing is not None:
            print(f"  {contender.name:<19}{contender.missing}")
            continue
        row = summary[contender.name]
        print(
            f"  {contender.name:<19}{row['best_us_per_step']:>13.1f}"
            f"{row['median_us_per_step']:>9.1f}"
            f"{row['ratio_of_best']:>11.2f}x{row['median_paired_ratio']:>12.2f}x"
            f"{row['fixed_ms_per_fit']:>14.2f}{row['net_us_per_step']:>13.1f}"
        )


def markdown_table(contenders: list[Contender], summary: dict[str, dict[str, Any]]) -> str:
    """The README's table: one row per framework, not-installed peers included."""
    lines = [
        f"| framework | version | µs/step (best) | {TIMES} raw (best) "
        f"| {TIMES} raw (median paired) | fixed cost per fit |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for contender in contenders:
        version = contender.version or "—"
        if contender.missing is not None:
            lines.append(f"| {contender.label} | not installed | — | — | — | — |")
            continue
        row = summary[contender.name]
        lines.append(
            f"| {contender.label} | {version} | {row['best_us_per_step']:.1f} "
            f"| {row['ratio_of_best']:.2f}{TIMES} | {row['median_paired_ratio']:.2f}{TIMES} "
            f"| {row['fixed_ms_per_fit']:.2f} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the flags, check the same work, time the rounds, print, write JSON if asked."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 21)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per fit (default 2000)")
    parser.add_argument("--quick", action="store_true", help="a few tiny rounds (smoke test)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    defaults = {"rounds": 2, "warmup": 1, "steps": 20} if args.quick else {}
    defaults = {"rounds": 21, "warmup": 2, "steps": 2000} | defaults
    rounds, warmup, steps = (
        defaults[key] if getattr(args, key) is None else getattr(args, key)
        for key in ("rounds", "warmup", "steps")
    )
    if rounds < 1 or warmup < 0 or steps < 2:
        parser.error("--rounds must be >= 1, --warmup >= 0 and --steps >= 2")

    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")  # the peers' advice (DataLoader workers, deprecations)
    contenders = [factory() for factory in FACTORIES]
    ready = [c for c in contenders if c.fit is not None]
    initial = tutorial_model()
    long, one, valid = loader(steps * BATCH), loader(BATCH), loader(BATCH)
    load = load_average()
    print(
        f"{run_line(load)}, {rounds} rounds (+{warmup} warm-up), {steps} steps per fit, interleaved"
    )
    for contender in contenders:
        status = contender.missing or contender.version or "measured"
        print(f"  {contender.name}: {status}")

    checks = check_same_work(ready, initial, long, valid)
    print_same_work(checks, steps)
    times = measure(ready, initial, long, one, valid, rounds=rounds, warmup=warmup)
    summary = summarize(ready, times, steps)
    print_console(contenders, summary)
    table = markdown_table(contenders, summary)
    print("\n" + table + "\n")
    for contender in ready:
        for note in dict.fromkeys(contender.notes):
            print(f"- {contender.label}: {note}.")

    report = {
        "meta": {
            **machine_meta(load),
            "rounds": rounds,
            "warmup": warmup,
            "steps_per_fit": steps,
            "batch_size": BATCH,
            "quick": args.quick,
        },
        "contenders": {
            c.name: {
                "label": c.label,
                "version": c.version,
                "installed": c.missing is None,
                "missing": c.missing,
                "notes": list(dict.fromkeys(c.notes)),
                "same_work": checks.get(c.name),
                "results": summary.get(c.name),
            }
            for c in contenders
        },
        "markdown": table,
    }
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
