"""Shared builders for the deterministic lifecycle tests.

Expected traces are *composed* from per-scope lists, written from the lifecycle
contract (``/work/shared/design/lifecycle.md``), never read off the code under test:

    train_batch()      = [batch_start, update_start, batch_end]
    training_phase(n)  = [training_start, *train_batch() * n, training_end]
    epoch_trace(t, v)  = [epoch_start, *training_phase(t), *validation_phase(v), epoch_end]
    fit_trace(e, t, v) = [fit_start, *epoch_trace(t, v) * e, fit_end]

:func:`interrupted` composes the trace of a run broken off at one event: the ordinary
trace up to that event (with or without it), then the end of every scope still open,
innermost first, which is the contract's wind-down rule stated independently of the
machine's path search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Callback, Event, TrainingLoop
from statemachine_loop.testing import TraceRecorder

E = Event
FS, FE = E.FIT_START, E.FIT_END
ES, EE = E.EPOCH_START, E.EPOCH_END
TS, TE = E.TRAINING_START, E.TRAINING_END
VS, VE = E.VALIDATION_START, E.VALIDATION_END
BS, BE = E.BATCH_START, E.BATCH_END
US, IPE = E.UPDATE_START, E.INFERENCE_PREDICTION_END

ENGINES = ("compiled", "transitions")

#: The contract's transition table, written from lifecycle.md: (event, source) -> destination.
CONTRACT_TABLE: dict[tuple[Event, str], str] = {
    (FS, "idle"): "fit",
    (ES, "fit"): "epoch",
    (TS, "epoch"): "training",
    (BS, "training"): "training_batch",
    (BS, "validation"): "validation_batch",
    (US, "training_batch"): "updating",
    (IPE, "validation_batch"): "predicted",
    (BE, "updating"): "training",
    (BE, "training_batch"): "training",
    (BE, "predicted"): "validation",
    (BE, "validation_batch"): "validation",
    (TE, "training"): "trained",
    (VS, "trained"): "validation",
    (VS, "epoch"): "validation",
    (VE, "validation"): "validated",
    (EE, "trained"): "fit",
    (EE, "validated"): "fit",
    (EE, "epoch"): "fit",
    (FE, "fit"): "done",
}

#: Which end closes the scope each start opens (update_start/inference_prediction_end open none).
SCOPE_END = {FS: FE, ES: EE, TS: TE, VS: VE, BS: BE}


# -- per-scope trace composers ---------------------------------------------------------


def train_batch() -> list[Event]:
    return [BS, US, BE]


def val_batch() -> list[Event]:
    return [BS, IPE, BE]


def training_phase(n: int) -> list[Event]:
    return [TS, *train_batch() * n, TE]


def validation_phase(n: int) -> list[Event]:
    return [VS, *val_batch() * n, VE]


def epoch_trace(t: int, v: int = 0) -> list[Event]:
    """One ordinary epoch; ``v=0`` means the loop has no validation data."""
    return [ES, *training_phase(t), *(validation_phase(v) if v else []), EE]


def fit_trace(e: int, t: int, v: int = 0) -> list[Event]:
    return [FS, *epoch_trace(t, v) * e, FE]


def fit_of(*epochs: list[Event]) -> list[Event]:
    """``fit_start``, the given epoch traces, ``fit_end``."""
    return [FS, *(event for epoch in epochs for event in epoch), FE]


def close_open_scopes(prefix: Sequence[Event]) -> list[Event]:
    """The end of every scope ``prefix`` left open, innermost first."""
    stack: list[Event] = []
    for event in prefix:
        if event in SCOPE_END:
            stack.append(event)
        elif event in SCOPE_END.values():
            assert stack and SCOPE_END[stack[-1]] is event, (prefix, event)
            stack.pop()
    return [SCOPE_END[start] for start in reversed(stack)]


def occurrence(trace: Sequence[Event], event: Event, n: int) -> int:
    """Index in ``trace`` of the ``n``-th (0-based) occurrence of ``event``."""
    seen = -1
    for index, taken in enumerate(trace):
        if taken is event:
            seen += 1
            if seen == n:
                return index
    raise AssertionError(f"{event} occurs fewer than {n + 1} times")


def interrupted(full: Sequence[Event], event: Event, n: int, *, taken: bool) -> list[Event]:
    """``full`` broken off at the ``n``-th ``event`` (kept if ``taken``), then wound down."""
    index = occurrence(full, event, n)
    prefix = list(full[: index + 1] if taken else full[:index])
    return prefix + close_open_scopes(prefix)


def states_along(trace: Sequence[Event]) -> list[tuple[str, str]]:
    """``(source, destination)`` of every event of ``trace``, by the contract table."""
    state, pairs = "idle", []
    for event in trace:
        dest = CONTRACT_TABLE[(event, state)]
        pairs.append((state, dest))
        state = dest
    return pairs


# -- data, models and loops ------------------------------------------------------------

IN_FEATURES = 3
OUT_FEATURES = 2


def tensors(n: int, *, seed: int, classes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    y = (
        torch.randint(0, OUT_FEATURES, (n,), generator=g)
        if classes
        else torch.randn(n, OUT_FEATURES, generator=g)
    )
    return x, y


def loader(batches: int, *, batch_size: int = 4, seed: int = 0, last: int | None = None) -> Any:
    """A DataLoader of ``batches`` (input, target) batches; ``last`` sizes the final one."""
    n = batch_size * batches if last is None else batch_size * (batches - 1) + last
    x, y = tensors(n, seed=seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def batches_of(data: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for x, y in data]


def make_model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(IN_FEATURES, OUT_FEATURES)


class CountingLinear(torch.nn.Module):
    """A Linear that counts its forward calls and can raise on the ``raise_at``-th one."""

    def __init__(self, seed: int = 0, raise_at: int | None = None, exc: Any = None) -> None:
        super().__init__()
        self.inner = make_model(seed)
        self.calls = 0
        self.raise_at = raise_at
        self.exc = exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index, self.calls = self.calls, self.calls + 1
        if index == self.raise_at:
            raise self.exc
        return self.inner(x)


class CountingLoss:
    """MSE that counts its calls (and the training ones) and can raise on one of them."""

    def __init__(self, raise_at: int | None = None, exc: Any = None) -> None:
        self.calls = 0
        self.raise_at = raise_at
        self.exc = exc

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        index, self.calls = self.calls, self.calls + 1
        if index == self.raise_at:
            raise self.exc
        return torch.nn.functional.mse_loss(output, target)


def make_loop(
    engine: str,
    model: torch.nn.Module,
    *,
    train: int = 2,
    val: int = 0,
    callbacks: Sequence[Any] = (),
    loss_fn: Any = None,
    lr: float = 0.1,
    training: Any = None,
    validation: Any = None,
    **kwargs: Any,
) -> TrainingLoop:
    """A loop over ``train`` training and ``val`` validation batches (none when 0)."""
    if validation is None and val:
        validation = loader(val, seed=2)
    return TrainingLoop(
        training=loader(train, seed=1) if training is None else training,
        validation=validation,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        loss_fn=loss_fn or torch.nn.functional.mse_loss,
        callbacks=callbacks,
        engine=engine,  # type: ignore[arg-type]
        **kwargs,
    )


def recorded(
    engine: str, *callbacks: Any, train: int, val: int
) -> tuple[TrainingLoop, TraceRecorder, torch.nn.Module]:
    """A loop whose first callback is a TraceRecorder (it sees every taken event)."""
    recorder, model = TraceRecorder(), make_model()
    loop = make_loop(engine, model, train=train, val=val, callbacks=[recorder, *callbacks])
    return loop, recorder, model


def history_epochs(loop: TrainingLoop) -> tuple[list[int], list[int]]:
    """The ``epoch`` of each History entry: (training, validation)."""
    history = loop.history
    return [e["epoch"] for e in history.training], [e["epoch"] for e in history.validation]


# -- callbacks that inject decisions and failures ---------------------------------------


class Inject(Callback):
    """Hooks one event's guard or observer and returns (or raises) at chosen calls.

    ``at`` is the 0-based index of the hook call that acts (``None``: every call).
    ``value`` is returned; if it is an exception instance it is raised instead. The
    hook method is set on the instance, which ``collect_hooks`` picks up.
    """

    def __init__(
        self,
        event: Event,
        value: Any,
        *,
        hook: str = "guard",
        at: int | None = 0,
        name: str = "Inject",
        when: Callable[[TrainingLoop], bool] | None = None,
    ) -> None:
        self.event, self.value, self.at, self.when = event, value, at, when
        self.calls = 0
        self._name = name
        setattr(self, f"{hook}_{event.value}", self._hook)

    @property
    def name(self) -> str:
        return self._name

    def _hook(self, loop: TrainingLoop) -> Any:
        index, self.calls = self.calls, self.calls + 1
        if (self.at is not None and index != self.at) or (self.when and not self.when(loop)):
            return None
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


def record_tuple(record: Any) -> tuple[Any, ...]:
    """The fields of a DecisionRecord the contract names, as a comparable tuple."""
    return (
        record.event,
        record.callback,
        record.kind.value,
        record.reason,
        record.target,
        record.applied,
        record.ignored_because,
    )


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_tensors(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


#: The contract's redirect table: (state, proposed event) -> allowed targets.
CONTRACT_REDIRECTS: dict[tuple[str, Event], tuple[Event, ...]] = {
    ("fit", ES): (FE,),
    ("epoch", TS): (VS, EE),
    ("training", BS): (TE,),
    ("training_batch", US): (BE,),
    ("trained", VS): (EE,),
    ("validation", BS): (VE,),
    ("validation_batch", IPE): (BE,),
}


class CountingMetric:
    """A Metric that counts its updates per phase (value: the count)."""

    name = "updates"

    def __init__(self) -> None:
        self.updates = 0
        self.total = 0

    def reset(self) -> None:
        self.updates = 0

    def update(self, output: Any, target: Any, loss: Any, batch_size: int) -> None:
        self.updates += 1
        self.total += 1

    def compute(self) -> float:
        return float(self.updates)
