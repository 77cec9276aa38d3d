"""``RunState``: everything one fit knows as it runs, in one record.

Hooks read it (through the loop's attributes, :class:`~statemachine_loop.view.LoopView`)
and a checkpoint captures it: the counters, the current batch's parts, the outcome so
far (stop reason, failure, decisions, history), and the position a resumed run
continues from. Each ``fit`` creates a fresh one, so nothing leaks from one fit into
the next.

The fields are written only here, through named moments of the lifecycle — a batch
fetched, started, ended; a phase opened or closed; an epoch closed — so the
bookkeeping that exact resume depends on is stated once. The position a checkpoint
records is ``(next_epoch, next_batch)``: the epoch a resumed run continues with and,
inside a phase, the next batch to fetch. Between a batch's fetch and its end the data's
generators have already drawn for it, so that is no exact place to resume:
``next_batch`` is then :data:`MID_BATCH`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Generic, NoReturn, Protocol, TypeVar, overload

import attrs
import torch

from statemachine_loop.errors import LifecycleError
from statemachine_loop.history import History
from statemachine_loop.machine import BETWEEN_EPOCHS, RESUMABLE_STATES
from statemachine_loop.preflight import checked_loss

if TYPE_CHECKING:
    from statemachine_loop.decisions import DecisionRecord

__all__ = ["MID_BATCH", "RunField", "RunState"]

#: ``next_batch`` between a batch's fetch and its end: not a place a run can resume.
MID_BATCH: Final = -1


@attrs.define(eq=False)
class RunState:
    """The state of one fit: counters, the current batch, the outcome, the resume position.

    Read its fields freely; change them only through its methods, each named for the
    moment of the lifecycle it records.
    """

    #: How many epochs the fit was asked for.
    epoch_count: int = 0
    epoch_index: int = 0
    batch_index: int = 0
    batch_count: int | None = None
    #: Batches of the current phase whose ``batch_start`` was taken so far.
    batches_run: int = 0
    is_training: bool = False
    resuming: bool = False
    last_step_input: Any = None
    last_step_target: Any = None
    last_step_output: Any = None
    last_step_loss: torch.Tensor | None = None
    stop_reason: str | None = None
    failure: BaseException | None = None
    decisions: list[DecisionRecord] = attrs.field(factory=list)
    history: History = attrs.field(factory=History)
    resumed_from: str | None = None
    #: The epoch a checkpoint taken now would continue with.
    next_epoch: int = 0
    #: Inside a phase, the next batch a checkpoint taken now would fetch (or MID_BATCH).
    next_batch: int = 0
    #: Whether the current phase ran at least one batch (it then adds a History entry).
    phase_ran: bool = False
    #: The random state at the current phase's start, when the fit keeps it.
    phase_rng: dict[str, Any] | None = None
    #: The phase's final metric values, from its end on.
    final_metrics: dict[str, float] | None = None

    # -- resume ----------------------------------------------------------------------

    def resumed(
        self,
        *,
        source: str,
        epoch_index: int,
        batch_index: int,
        batch_count: int | None,
        is_training: bool,
        history: History,
    ) -> None:
        """A checkpoint was loaded: take its position; the re-entry events follow."""
        self.resuming, self.resumed_from = True, source
        self.epoch_index, self.batch_index = epoch_index, batch_index
        self.batch_count, self.is_training = batch_count, is_training
        self.history = history

    def reentered(self) -> None:
        """The saved state is re-entered: events from here on are the run's own."""
        self.resuming = False

    def reentered_stopping(self, reason: str) -> None:
        """The checkpoint was taken as the run stopped: the resumed run stops too."""
        self.resuming, self.stop_reason = False, reason

    def reentered_phase(self, *, batch_index: int, next_batch: int, ran: bool) -> None:
        """The phase of a mid-phase checkpoint is open again at its saved batch boundary."""
        self.batch_index, self.next_batch, self.phase_ran = batch_index, next_batch, ran
        self.resuming = False

    # -- epochs ----------------------------------------------------------------------

    def epoch_opened(self, index: int) -> None:
        """Epoch ``index`` is proposed: a checkpoint from here on continues with it."""
        self.epoch_index = self.next_epoch = index

    def epoch_closed(self) -> None:
        """The epoch ended (or was vetoed, which still counts against ``epochs``)."""
        self.next_epoch = self.epoch_index + 1

    # -- phases ----------------------------------------------------------------------

    def phase_opened(self, *, training: bool, batch_count: int | None) -> None:
        """A phase opens: its counters start at zero and nothing of it is final yet."""
        self.is_training, self.batch_index, self.batch_count = training, 0, batch_count
        self.batches_run, self.phase_ran, self.next_batch = 0, False, 0
        self.phase_rng = self.final_metrics = None

    def phase_rng_kept(self, rng: dict[str, Any]) -> None:
        """The random state at the phase's start, which a mid-phase checkpoint needs."""
        self.phase_rng = rng

    def data_exhausted(self) -> None:
        """The phase's data ended; the end of the iterator may have drawn random numbers."""
        self.next_batch = MID_BATCH

    def phase_closed(self, metrics: dict[str, float]) -> None:
        """A phase that ran batches closes with ``metrics``: they go into ``History``."""
        self.phase_ran, self.final_metrics = False, metrics
        entry: dict[str, float] = {**metrics, "epoch": self.epoch_index}
        (self.history.training if self.is_training else self.history.validation).append(entry)

    # -- batches ---------------------------------------------------------------------

    def batch_fetched(self, index: int, inputs: Any, target: Any) -> None:
        """Batch ``index`` came from the data, as ``inputs`` and ``target`` (moved and split).

        The data's generators have drawn for it, so no checkpoint is exact until it ends.
        A batch that could not be moved or split is recorded with neither.
        """
        self.next_batch, self.batch_index = MID_BATCH, index
        self.last_step_input, self.last_step_target = inputs, target
        self.last_step_output = self.last_step_loss = None  # never stale across batches

    def batch_started(self) -> None:
        """``batch_start`` was taken and the batch's work follows: the phase ran a batch."""
        self.phase_ran = True
        self.batches_run += 1

    def batch_cut_short(self) -> None:
        """``batch_start`` was taken, but an observer of it stopped or raised.

        The batch still gets its ``batch_end`` and counts in ``batches_run``; having done
        no work, it does not make the phase one that ran (no ``History`` entry for it).
        """
        self.batches_run += 1

    def forwarded(self, output: Any) -> None:
        """The model produced the batch's output."""
        self.last_step_output = output

    def scored(self, loss: object) -> torch.Tensor:
        """The batch's loss was computed: it must be a scalar tensor (else a ``ConfigError``)."""
        if not isinstance(loss, torch.Tensor) or loss.ndim:
            loss = checked_loss(loss)  # raises the ConfigError that says what is wrong
        self.last_step_loss = loss
        return loss

    def batch_ended(self) -> None:
        """The batch's work is done: a checkpoint now continues with the next one."""
        self.next_batch = self.batch_index + 1

    # -- the outcome -----------------------------------------------------------------

    def decided(self, record: DecisionRecord) -> None:
        """A hook's decision, applied or not, joins the record of the fit."""
        self.decisions.append(record)

    def stopping(self, reason: str) -> None:
        """A ``Stop`` was applied; the first one's reason is kept."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def failed(self, error: BaseException) -> None:
        """The fit winds down from ``error``."""
        self.failure = error

    # -- checkpoints -----------------------------------------------------------------

    def position(self, state: str, previous_state: str) -> dict[str, Any]:
        """Where a checkpoint taken now resumes, or a ``LifecycleError`` where none is exact.

        Exact places are between epochs, and at a batch boundary inside a phase before
        the next batch is fetched; a mid-phase one also needs the phase start's random
        state, kept only when a hook of the fit can run inside phases.
        """
        between_epochs = state == BETWEEN_EPOCHS
        if state not in RESUMABLE_STATES or (not between_epochs and self.next_batch < 0):
            raise LifecycleError(
                f"A checkpoint is exact only between epochs or at a batch boundary: in "
                f"observers of batch_end or epoch_end (or anywhere in states "
                f"{list(RESUMABLE_STATES)} before a phase fetched its next batch); the loop "
                f"is in state {state!r} at {previous_state!r} -> {state!r}, with a "
                "batch already fetched or the data exhausted."
            )
        if not between_epochs and self.next_batch > 0 and self.phase_rng is None:
            raise LifecycleError(
                f"A checkpoint inside a phase needs the random state of the phase's start, "
                f"which the loop keeps only when a hook of this fit runs inside phases (a "
                f"guard or observer of a batch event); state_dict() was called in state "
                f"{state!r} after batch {self.next_batch - 1} from outside such a hook. "
                "Take checkpoints from an observer of batch_end or epoch_end."
            )
        return {
            "state": state,
            "epoch_index": self.epoch_index,
            "batch_index": self.batch_index,
            "batch_count": self.batch_count,
            "is_training": self.is_training,
            "stop_reason": self.stop_reason,
            "next_epoch": self.next_epoch,
            "next_batch": 0 if between_epochs else self.next_batch,
            "epoch_count": self.epoch_count,
        }


_Value = TypeVar("_Value")


class _HoldsRun(Protocol):
    _run: RunState


class RunField(Generic[_Value]):
    """A read-only attribute that reads the same-named field of the current run state.

    ``TrainingLoop`` declares its per-fit attributes with it (``epoch_index =
    RunField[int]()``): the value is always the current fit's (its ``_run``), and an
    assignment is refused with an ``AttributeError`` that says why, since only the
    loop records what a fit does.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> RunField[_Value]: ...

    @overload
    def __get__(self, obj: _HoldsRun, owner: type | None = None) -> _Value: ...

    def __get__(
        self, obj: _HoldsRun | None, owner: type | None = None
    ) -> RunField[_Value] | _Value:
        if obj is None:
            return self
        value: _Value = getattr(obj._run, self._name)
        return value

    def __set__(self, obj: object, value: NoReturn) -> None:
        raise AttributeError(
            f"{type(obj).__name__}.{self._name} is read-only: the loop records it for the "
            "current fit, and hooks read it; keep your own count in your callback."
        )
