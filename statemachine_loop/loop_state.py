"""A fit's state at an exact boundary, as a checkpoint payload, and its restoration.

:func:`capture` is what ``TrainingLoop.state_dict()`` returns: everything a resumed
run needs to continue exactly — model, optimizer, grad scaler, History, every
callback's ``state_dict``, the position (machine state, epoch, next batch), random
state, and, mid-phase, the phase's metric accumulators, pending gradients (vetoed
updates accumulate them) and the phase-start random state that fixes the data order.
The payload holds only tensors and plain data, so it loads with
``torch.load(weights_only=True)``.

:class:`ResumePoint` reads a payload back; the driver re-enters the saved state by
firing ``fit_start`` and the open scopes' start events, restoring each part right
after the event whose entry work would otherwise reset it. What it restores into the
run state goes through the run state's own moments (:class:`RunState`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from statemachine_loop.callback import Callback
from statemachine_loop.errors import ConfigError
from statemachine_loop.fit_setup import FitSetup
from statemachine_loop.history import History
from statemachine_loop.machine import BETWEEN_EPOCHS
from statemachine_loop.models import unwrap
from statemachine_loop.resume import capture_rng, data_rng, restore_data_rng, restore_rng
from statemachine_loop.run_state import RunState

__all__ = ["FORMAT", "ResumePoint", "callback_states", "capture", "resolve_resume"]

#: Identifies a loop payload inside a checkpoint file.
FORMAT = "statemachine_loop.loop_state/1"
#: What ``resumed_from`` says for a payload given in memory.
IN_MEMORY = "<memory>"


def _keyed(callbacks: Sequence[object]) -> list[tuple[str, Callback]]:
    """Stateful callbacks keyed by name, ``#2``, ``#3`` ... for repeated names."""
    seen: dict[str, int] = {}
    keyed: list[tuple[str, Callback]] = []
    for callback in callbacks:
        if isinstance(callback, Callback):
            count = seen[callback.name] = seen.get(callback.name, 0) + 1
            keyed.append((callback.name if count == 1 else f"{callback.name}#{count}", callback))
    return keyed


def callback_states(callbacks: Sequence[object]) -> dict[str, dict[str, Any]]:
    """The non-empty ``state_dict`` of every callback, keyed by name (``#2`` for repeats).

    Stateless callbacks are left out, so adding or removing one (a progress bar, a
    printer) does not stop a checkpoint from resuming.
    """
    states = {key: callback.state_dict() for key, callback in _keyed(callbacks)}
    return {key: state for key, state in states.items() if state}


def capture(setup: FitSetup, run: RunState, state: str, previous_state: str) -> dict[str, Any]:
    """The fit's checkpoint payload; only legal where a resumed run can re-enter.

    ``state`` and ``previous_state`` are where the machine is; the position, and the
    check that it is exact, are the run state's (:meth:`RunState.position`).
    """
    position = run.position(state, previous_state)
    model, scaler = unwrap(setup.model), setup.precision.grad_scaler
    payload: dict[str, Any] = {
        "format": FORMAT,
        "position": position,
        "model": model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "grad_scaler": None if scaler is None else scaler.state_dict(),
        "history": run.history.as_dict(),
        "callbacks": callback_states(setup.callbacks),
    }
    # What differs between ranks: random state, data position, metric accumulators.
    local: dict[str, Any] = {"rng": capture_rng(), "data_rng": data_rng(setup.datasets)}
    if state != BETWEEN_EPOCHS:
        local["metrics"] = {metric.name: _metric_state(metric) for metric in setup.metrics}
        local["phase_rng"] = run.phase_rng
        payload["phase"] = {
            "grads": {  # equal on every rank: DDP all-reduced them
                name: parameter.grad.detach().clone()
                for name, parameter in model.named_parameters()
                if parameter.grad is not None
            },
            "ran": run.phase_ran,
        }
    collective = setup.collective
    payload["ranks"] = [local] if collective is None else collective.gather(local)
    return payload


def _check_fits(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose weights do not fit ``model``, before copying any."""
    current = model.state_dict()
    problems = [f"missing {key}" for key in sorted(set(current) - set(saved))]
    problems += [f"unexpected {key}" for key in sorted(set(saved) - set(current))]
    problems += [
        f"{key}: checkpoint {tuple(saved[key].shape)}, model {tuple(tensor.shape)}"
        for key, tensor in current.items()
        if key in saved and saved[key].shape != tensor.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise ConfigError(
            f"The checkpoint's weights do not fit this model ({type(model).__name__}): "
            f"{shown}. Nothing was loaded."
        )


def _metric_state(metric: object) -> dict[str, Any] | None:
    state_dict = getattr(metric, "state_dict", None)
    if state_dict is None:
        warnings.warn(
            f"Metric {getattr(metric, 'name', metric)!r} has no state_dict(); after a "
            "mid-phase resume its value covers only the batches after the resume.",
            stacklevel=4,
        )
        return None
    result: dict[str, Any] = state_dict()
    return result


@attrs.frozen
class ResumePoint:
    """Where a checkpoint left the loop, and the payload to restore from."""

    state: str
    epoch_index: int
    batch_index: int
    next_epoch: int
    next_batch: int
    payload: dict[str, Any]
    #: Where the payload was read: a path, or :data:`IN_MEMORY`.
    source: str

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str) -> ResumePoint:
        """Check that ``payload`` is a loop state and read its position."""
        if payload.get("format") != FORMAT:
            shown = "the given state" if source == IN_MEMORY else source
            raise ConfigError(
                f"{shown} is not a statemachine_loop checkpoint (format "
                f"{payload.get('format')!r}, expected {FORMAT!r})."
            )
        position = payload["position"]
        return cls(
            state=position["state"],
            epoch_index=int(position["epoch_index"]),
            batch_index=int(position["batch_index"]),
            next_epoch=int(position["next_epoch"]),
            next_batch=int(position["next_batch"]),
            payload=payload,
            source=source,
        )

    @property
    def stop_reason(self) -> str | None:
        """Set when the checkpoint was taken as the loop stopped: the resume stops too."""
        reason = self.payload["position"].get("stop_reason")
        return None if reason is None else str(reason)

    @property
    def mid_phase(self) -> bool:
        """Whether the checkpoint was taken inside a training or validation phase."""
        return self.state != BETWEEN_EPOCHS

    def rank_state(self, setup: FitSetup) -> dict[str, Any]:
        """This rank's share of the payload: its random state and metric accumulators."""
        ranks: list[dict[str, Any]] = self.payload["ranks"]
        collective = setup.collective
        world_size, rank = (
            (1, 0) if collective is None else (collective.world_size, collective.rank)
        )
        if len(ranks) != world_size:
            raise ConfigError(
                f"The checkpoint was written by {len(ranks)} process(es) but this fit runs "
                f"{world_size}; resume with the same number of processes."
            )
        return ranks[rank]

    def restore_before_fit(self, setup: FitSetup, run: RunState) -> None:
        """Model, optimizer and History: what observers of the re-entry events may read."""
        last = self.epoch_index if self.mid_phase else self.next_epoch - 1
        if last >= run.epoch_count:
            raise ConfigError(
                f"The checkpoint is at epoch index {last} but this fit asks for only "
                f"{run.epoch_count} epoch(s); pass epochs > {last} to continue it."
            )
        self.rank_state(setup)  # the process count must match before anything is loaded
        model = unwrap(setup.model)
        _check_fits(model, self.payload["model"])
        try:
            model.load_state_dict(self.payload["model"])
            setup.optimizer.load_state_dict(self.payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ConfigError(
                f"The checkpoint does not fit this model and optimizer: {error}"
            ) from None
        position, history = self.payload["position"], self.payload["history"]
        run.resumed(
            source=self.source,
            epoch_index=self.epoch_index,
            batch_index=self.batch_index,
            batch_count=position["batch_count"],
            is_training=position["is_training"],
            history=History(training=history["training"], validation=history["validation"]),
        )

    def restore_after_fit_start(self, setup: FitSetup) -> None:
        """Callbacks' state and the grad scaler, after their ``on_fit_start`` set them up."""
        saved: dict[str, dict[str, Any]] = self.payload["callbacks"]
        current = dict(_keyed(setup.callbacks))
        unknown = sorted(set(saved) - set(current))
        if unknown:
            raise ConfigError(
                f"The checkpoint holds state for callbacks {unknown} that this fit does not "
                f"have (it has {sorted(current)}); resume with the same callbacks."
            )
        for key, state in saved.items():
            current[key].load_state_dict(state)
        scaler_state, scaler = self.payload["grad_scaler"], setup.precision.grad_scaler
        if scaler_state is not None and scaler is not None:
            scaler.load_state_dict(scaler_state)

    def restore_rng(self, setup: FitSetup) -> None:
        """Every generator as it was at the checkpoint: global ones and the data's own."""
        local = self.rank_state(setup)
        restore_rng(local["rng"])
        restore_data_rng(setup.datasets, local["data_rng"])

    def restore_phase(self, setup: FitSetup, run: RunState) -> None:
        """Metric accumulators and pending gradients, after the phase start's reset."""
        phase = self.payload["phase"]
        metric_states = self.rank_state(setup)["metrics"]
        for metric in setup.metrics:
            state = metric_states.get(metric.name)
            load = getattr(metric, "load_state_dict", None)
            if state is not None and load is not None:
                load(state)
        grads: dict[str, torch.Tensor] = phase["grads"]
        for name, parameter in unwrap(setup.model).named_parameters():
            grad = grads.get(name)
            parameter.grad = None if grad is None else grad.to(parameter.device)
        run.reentered_phase(
            batch_index=self.batch_index, next_batch=self.next_batch, ran=bool(phase["ran"])
        )


def resolve_resume(
    resume: str | os.PathLike[str] | Mapping[str, Any] | None, callbacks: Sequence[object]
) -> ResumePoint | None:
    """Read the checkpoint ``fit(resume=...)`` names; ``None`` for a fresh start.

    ``"auto"`` takes the newest valid checkpoint in the directory of the fit's
    ``Checkpoint`` callback (corrupt newer ones are skipped with a warning), or
    starts fresh when there is none. A mapping is a payload already in memory, as
    returned by ``loop.state_dict()``.
    """
    if resume is None:
        return None
    if isinstance(resume, Mapping):
        return ResumePoint.from_payload(dict(resume), IN_MEMORY)
    from statemachine_loop.callbacks.checkpoint import Checkpoint
    from statemachine_loop.checkpoint_io import list_checkpoints, load_checkpoint

    if resume == "auto":
        checkpointers = [c for c in callbacks if isinstance(c, Checkpoint)]
        if not checkpointers:
            raise ConfigError(
                'resume="auto" needs a Checkpoint callback in the fit to know where '
                "checkpoints are; add one or pass resume=<path>."
            )
        path = checkpointers[0].directory
        if not list_checkpoints(path):
            return None
    else:
        path = Path(resume)
    payload, info = load_checkpoint(path)
    return ResumePoint.from_payload(payload, str(info.path))
