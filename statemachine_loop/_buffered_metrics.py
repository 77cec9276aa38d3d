"""The buffered implementations behind the built-in metrics of :mod:`statemachine_loop.metrics`.

This module owns how a built-in metric records a batch and reduces it: ``update``
sits on the loop's hot path, so it only detaches the batch and appends it to a
Python list. Every ``chunk`` batches (fewer for large outputs: :data:`BUFFER_ELEMENTS`),
or when ``compute`` asks for the value, the buffer is concatenated and folded into
accumulator tensors on the data's own device, so the host waits on the device only
inside ``compute``. The public factories that build these objects, and the
:class:`~statemachine_loop.metrics.Metric` protocol they satisfy, live in
:mod:`statemachine_loop.metrics`; this module does not import it.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from statemachine_loop.errors import ConfigError

#: The output elements a prediction metric buffers, at most (16 MiB of float32): its
#: chunk is cut to ``BUFFER_ELEMENTS // output.numel()`` batches, sized on each phase's
#: first batch, so small outputs fold rarely and large ones never pile up.
BUFFER_ELEMENTS = 1 << 22

_Item = TypeVar("_Item")


def _float_dtype(device: torch.device) -> torch.dtype:
    """The widest float the device supports, so long sums keep their precision."""
    return torch.float32 if device.type == "mps" else torch.float64


def _flat_cat(tensors: tuple[Tensor, ...] | list[Tensor], keep_last: bool) -> Tensor:
    """Join batches, flattened to ``(M,)`` or ``(M, C)``; batch sizes may differ.

    Batches are joined first and flattened once; only when their trailing sizes differ
    (sequences of varying length), or they are scalars, is each flattened on its own.
    Either way the rows come out in the same order.
    """
    try:
        joined = torch.cat(tensors)
    except RuntimeError:
        tensors = [t.reshape(-1, t.shape[-1]) if keep_last else t.reshape(-1) for t in tensors]
        joined = torch.cat(tensors)
    return joined.reshape(-1, joined.shape[-1]) if keep_last else joined.reshape(-1)


class _BufferedMetric(abc.ABC, Generic[_Item]):
    """Owns the per-batch buffer and its chunked folding for the built-in metrics.

    Subclasses append one item per batch to ``_buffer`` and call ``_flush`` once it
    holds ``chunk`` items. They write ``_fold`` (reduce a chunk on the device to a
    tensor added into ``_total``; may count samples in ``_samples``) and ``_result``
    (turn the total into the value, reading it back to the host once).
    """

    def __init__(self, name: str, chunk: int) -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"A metric's chunk must be a positive int; got {chunk!r}.")
        self.name = name
        self.chunk = chunk
        self._buffer: list[_Item] = []
        self._total: Tensor | None = None
        self._samples = 0

    def reset(self) -> None:
        """Drop the buffer and the accumulators, ready for a new phase."""
        self._buffer.clear()
        self._total, self._samples = None, 0

    def compute(self) -> float:
        """Fold what is still buffered, then read the value back to the host."""
        if self._buffer:
            self._flush()
        return math.nan if self._total is None else self._result(self._total)

    def state_dict(self) -> dict[str, Any]:
        """The phase's accumulated state, for a checkpoint taken mid-phase."""
        if self._buffer:
            self._flush()
        return {"total": self._total, "samples": self._samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume accumulating from :meth:`state_dict`'s result."""
        self._buffer.clear()
        self._total, self._samples = state["total"], int(state["samples"])

    def _flush(self) -> None:
        items, self._buffer = self._buffer, []
        partial = self._fold(items)
        if self._total is None:
            self._total = partial
        else:
            # A total restored from a checkpoint lives on the CPU until the first fold.
            self._total = self._total.to(partial.device) + partial

    @abc.abstractmethod
    def _fold(self, items: list[_Item]) -> Tensor:
        """Reduce one chunk of buffered batches to a partial total on the device."""

    @abc.abstractmethod
    def _result(self, total: Tensor) -> float:
        """Turn the running total into the metric's value (``nan`` if empty)."""


class _Loss(_BufferedMetric[tuple[Tensor, int]]):
    """Sample-weighted mean of the per-batch mean loss; also keeps each batch's loss.

    The per-batch losses it detaches anyway are kept for the phase (the stacked
    chunks, four bytes a batch), so loggers can write them without detaching every
    loss a second time (:meth:`batch_losses`, ``TrainingLoop.batch_losses``).
    """

    def __init__(self, name: str, chunk: int) -> None:
        super().__init__(name, chunk)
        self._folded: list[Tensor] = []

    def reset(self) -> None:
        """Drop the buffer, the accumulators and the phase's per-batch losses."""
        super().reset()
        self._folded = []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume accumulating; the per-batch losses start again from the next batch."""
        super().load_state_dict(state)
        self._folded = []

    def batch_losses(self) -> Tensor:
        """The detached loss of every batch recorded since the last reset, in order.

        One 1-D tensor on the losses' device (empty before the first batch). Batches
        still buffered are stacked for the answer but not folded, so reading this
        never changes how the running total is summed.
        """
        parts = list(self._folded)
        if self._buffer:
            parts.append(torch.stack([value for value, _ in self._buffer]).reshape(-1))
        if not parts:
            return torch.empty(0)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def update(self, output: Tensor, target: Tensor, loss: Tensor, batch_size: int) -> None:
        """Buffer the detached loss and the batch size."""
        self._buffer.append((loss.detach(), batch_size))
        if len(self._buffer) >= self.chunk:
            self._flush()

    def _fold(self, items: list[tuple[Tensor, int]]) -> Tensor:
        values, sizes = zip(*items, strict=True)
        self._samples += sum(sizes)
        losses = torch.stack(values).reshape(-1)
        self._folded.append(losses)
        dtype = _float_dtype(losses.device)
        # Non-blocking from host memory: the copy is queued, the host does not wait.
        weights = torch.tensor(sizes, dtype=dtype).to(losses.device, non_blocking=True)
        return (losses.to(dtype) * weights).sum()

    def _result(self, total: Tensor) -> float:
        return float(total) / self._samples if self._samples else math.nan


class _PredictionMetric(_BufferedMetric[tuple[Tensor, Tensor]]):
    """A metric computed from outputs and targets; checks their layout once a phase.

    The first batch's metadata decides the layout: a single logit per sample (output
    ``(N,)`` or ``(..., 1)``) is *binary*, anything else *multiclass*, classes on the
    last dimension and ``target`` of shape ``output.shape[:-1]``. ``_fold_joined``
    gets a chunk flattened to output ``(M,)`` or ``(M, C)`` and target ``(M,)``.
    """

    _allow_binary = True
    _min_classes = 1
    _binary = False
    _classes = 0  # 0 until the first batch of a phase has been inspected
    _limit = 0  # batches buffered before a fold; 0 until sized on a phase's first batch

    def update(self, output: Tensor, target: Tensor, loss: Tensor, batch_size: int) -> None:
        """Buffer the detached output and the target."""
        if not self._limit:
            self._first_batch(output, target)
        self._buffer.append((output.detach(), target))
        if len(self._buffer) >= self._limit:
            self._flush()

    def reset(self) -> None:
        """Drop buffer and accumulators; the next batch's layout is checked again."""
        super().reset()
        self._classes = self._limit = 0

    def _first_batch(self, output: Tensor, target: Tensor) -> None:
        """Check the layout (unless restored from a checkpoint) and size the chunk."""
        if self._classes == 0:
            self._inspect(output, target)
        self._limit = max(1, min(self.chunk, BUFFER_ELEMENTS // max(1, output.numel())))

    def state_dict(self) -> dict[str, Any]:
        """Accumulators plus the layout read off the phase's first batch."""
        return {**super().state_dict(), "binary": self._binary, "classes": self._classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume accumulating, with the layout already checked."""
        super().load_state_dict(state)
        self._binary, self._classes = bool(state["binary"]), int(state["classes"])
        self._limit = 0

    def _inspect(self, output: Tensor, target: Tensor) -> None:
        binary = self._allow_binary and (output.ndim == 1 or output.shape[-1] == 1)
        shapes = f"got output {tuple(output.shape)} and target {tuple(target.shape)}"
        if binary and output.numel() != target.numel():
            raise ConfigError(
                f"Metric {self.name!r} reads one logit per sample, so output and "
                f"target need as many elements; {shapes}."
            )
        if not binary and (output.ndim == 0 or target.shape != output.shape[:-1]):
            raise ConfigError(
                f"Metric {self.name!r} needs an output of shape (..., classes) and a "
                f"target of shape (...); {shapes}."
            )
        classes = 2 if binary else output.shape[-1]
        if classes < self._min_classes:
            raise ConfigError(
                f"Metric {self.name!r} needs at least {self._min_classes} classes "
                f"on the output's last dimension; {shapes}."
            )
        self._binary, self._classes = binary, classes

    def _fold(self, items: list[tuple[Tensor, Tensor]]) -> Tensor:
        outputs, targets = zip(*items, strict=True)
        output = _flat_cat(outputs, keep_last=not self._binary)
        target = _flat_cat(targets, keep_last=False)
        return self._fold_joined(output, target)

    @abc.abstractmethod
    def _fold_joined(self, output: Tensor, target: Tensor) -> Tensor:
        """Reduce one flattened chunk to a partial total."""


class _TopKAccuracy(_PredictionMetric):
    """Fraction of samples whose target is among the ``k`` largest logits.

    With ``k == 1`` this is plain accuracy, and a single logit per sample is read as
    binary: positive when the logit is ``>= 0`` (sigmoid ``>= 0.5``).
    """

    def __init__(self, name: str, chunk: int, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"top_k_accuracy needs a positive int k; got {k!r}.")
        super().__init__(name, chunk)
        self.k = self._min_classes = k
        self._allow_binary = k == 1

    def _fold_joined(self, output: Tensor, target: Tensor) -> Tensor:
        self._samples += target.shape[0]
        if self._binary:
            return ((output >= 0) == target).sum()
        if self.k == 1:
            return (output.argmax(-1) == target).sum()
        top = output.topk(self.k, dim=-1).indices
        return (top == target.unsqueeze(-1)).any(-1).sum()

    def _result(self, total: Tensor) -> float:
        return int(total) / self._samples if self._samples else math.nan


class _MatthewsCorrelation(_PredictionMetric):
    """Matthews correlation (Gorodkin's multiclass form) from a confusion matrix.

    Matches ``sklearn.metrics.matthews_corrcoef``, including ``0.0`` when the
    denominator is zero. A target outside ``[0, classes)`` cannot be seen without
    reading device data, so it is counted on the device and ``compute`` raises.
    """

    def _fold_joined(self, output: Tensor, target: Tensor) -> Tensor:
        k = self._classes
        pred = (output >= 0).long() if self._binary else output.argmax(-1)
        target = target.long()
        valid = (target >= 0) & (target < k)
        # Cells 0..k*k-1 are the confusion matrix (row = target, column = prediction);
        # cell k*k counts targets out of range, which must not index the matrix.
        cells = torch.where(valid, target * k + pred, k * k)
        counts = torch.zeros(k * k + 1, dtype=torch.long, device=output.device)
        return counts.index_add_(0, cells, torch.ones_like(cells))

    def _result(self, total: Tensor) -> float:
        counts = total.to("cpu", torch.float64)
        if counts[-1] > 0:
            raise ConfigError(
                f"Metric {self.name!r} got targets outside the classes "
                f"0..{self._classes - 1} of the output ({int(counts[-1])} of them)."
            )
        confusion = counts[:-1].reshape(self._classes, self._classes)
        true_sum, pred_sum = confusion.sum(1), confusion.sum(0)
        samples, correct = confusion.sum(), confusion.trace()
        if samples == 0:
            return math.nan
        cov_true_pred = correct * samples - true_sum @ pred_sum
        cov_pred_pred = samples * samples - pred_sum @ pred_sum
        cov_true_true = samples * samples - true_sum @ true_sum
        denominator = float(cov_true_true * cov_pred_pred)
        return 0.0 if denominator == 0 else float(cov_true_pred) / denominator**0.5


class _Perplexity(_PredictionMetric):
    """``exp`` of the token-weighted mean cross-entropy of logits, padding ignored."""

    _allow_binary = False

    def __init__(self, name: str, chunk: int, ignore_index: int) -> None:
        super().__init__(name, chunk)
        self.ignore_index = ignore_index

    def _fold_joined(self, output: Tensor, target: Tensor) -> Tensor:
        if output.dtype in (torch.float16, torch.bfloat16):
            output = output.float()
        target = target.long()
        nll = torch.nn.functional.cross_entropy(
            output, target, reduction="sum", ignore_index=self.ignore_index
        )
        tokens = (target != self.ignore_index).sum()
        dtype = _float_dtype(output.device)
        return torch.stack([nll.to(dtype), tokens.to(dtype)])

    def _result(self, total: Tensor) -> float:
        nll, tokens = total.tolist()
        return math.exp(nll / tokens) if tokens else math.nan
