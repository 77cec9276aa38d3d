"""Metrics the loop tracks per phase, and the names that select the built-in ones.

This is the public metrics module. It owns the :class:`Metric` protocol (anything
with a ``name`` and ``reset`` / ``update`` / ``compute``), the factories of the
built-in metrics (:func:`loss`, :func:`accuracy`, :func:`top_k_accuracy`,
:func:`matthews_correlation`, :func:`perplexity`) with their default chunks,
:func:`resolve_metrics`, which turns the user's list of names and objects into
metrics, always with ``loss`` first, and :func:`batch_losses_of`, which reads the
per-batch record the built-in loss keeps. The loop calls ``update`` once per batch,
so the built-ins only buffer there and fold a chunk of batches at a time on the
device; their buffered implementations live in a private module of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

from statemachine_loop._buffered_metrics import BUFFER_ELEMENTS
from statemachine_loop._buffered_metrics import _BufferedMetric as _BufferedMetric
from statemachine_loop._buffered_metrics import _flat_cat as _flat_cat
from statemachine_loop._buffered_metrics import _float_dtype as _float_dtype
from statemachine_loop._buffered_metrics import _Loss as _Loss
from statemachine_loop._buffered_metrics import _MatthewsCorrelation as _MatthewsCorrelation
from statemachine_loop._buffered_metrics import _Perplexity as _Perplexity
from statemachine_loop._buffered_metrics import _PredictionMetric as _PredictionMetric
from statemachine_loop._buffered_metrics import _TopKAccuracy as _TopKAccuracy
from statemachine_loop.errors import ConfigError

__all__ = [
    "BUFFER_ELEMENTS",
    "DEFAULT_CHUNK",
    "LOSS_CHUNK",
    "KNOWN_METRICS",
    "Metric",
    "accuracy",
    "batch_losses_of",
    "loss",
    "matthews_correlation",
    "perplexity",
    "resolve_metrics",
    "top_k_accuracy",
]

#: How many batches a built-in prediction metric buffers, at most, before folding them
#: on the device (see :data:`BUFFER_ELEMENTS` for the other bound). Longer chunks of
#: small outputs save folds but not time, so the default keeps the buffer small.
DEFAULT_CHUNK = 64
#: The loss buffers only a scalar per batch, so it can afford a much longer chunk.
LOSS_CHUNK = 1024


@runtime_checkable
class Metric(Protocol):
    """What the loop needs from a metric: a key, and reset / update / compute.

    ``name`` is the key of the value in ``History`` and ``loop.metrics``. ``reset``
    runs at each phase start; ``update`` runs once per batch with the model output
    (possibly still attached to the graph), the target, the batch's scalar mean loss
    and the batch size; ``compute`` returns the value over the batches seen so far
    (the final value at phase end), ``nan`` when there were none.
    """

    name: str

    def reset(self) -> None:
        """Forget every batch seen, ready for a new phase."""

    def update(self, output: Tensor, target: Tensor, loss: Tensor, batch_size: int) -> None:
        """Record one batch; called on the hot path, so it must stay cheap."""

    def compute(self) -> float:
        """Return the value over the batches recorded since the last reset."""


def loss(*, name: str = "loss", chunk: int = LOSS_CHUNK) -> Metric:
    """The loop's loss averaged over samples: ``sum(loss_b * n_b) / sum(n_b)``.

    Weighting by batch size keeps a short last batch from counting as much as a
    full one, so the value equals the mean loss over the whole phase. Buffered
    losses are scalars, so it folds only every :data:`LOSS_CHUNK` batches: the fold's
    handful of kernel launches then costs next to nothing per batch.
    """
    return _Loss(name, chunk)


def accuracy(*, name: str = "accuracy", chunk: int = DEFAULT_CHUNK) -> Metric:
    """Fraction of samples predicted right: argmax of ``(..., C)`` logits, or one logit.

    A single logit per sample (output ``(N,)`` or ``(N, 1)``, target 0/1 as int or
    float) counts as positive when it is ``>= 0``, the sigmoid's 0.5 threshold.
    """
    return _TopKAccuracy(name, chunk, 1)


def top_k_accuracy(k: int, *, name: str | None = None, chunk: int = DEFAULT_CHUNK) -> Metric:
    """Fraction of samples whose target is among the ``k`` largest logits.

    Named ``top{k}_accuracy`` unless ``name`` is given. An output with fewer than
    ``k`` classes is a :class:`ConfigError` at the first batch.
    """
    return _TopKAccuracy(f"top{k}_accuracy" if name is None else name, chunk, k)


def matthews_correlation(
    *, name: str = "matthews_correlation_coefficient", chunk: int = DEFAULT_CHUNK
) -> Metric:
    """Matthews correlation coefficient, binary (one logit) or multiclass (argmax).

    Unlike accuracy it stays informative on unbalanced classes; it equals
    ``sklearn.metrics.matthews_corrcoef`` and is ``0.0`` when undefined.
    """
    return _MatthewsCorrelation(name, chunk)


def perplexity(ignore_index: int = -100, *, name: str = "perplexity", chunk: int = 1) -> Metric:
    """``exp`` of the mean cross-entropy per token of logits ``(..., V)``, ids ``(...)``.

    Computed from the output itself, not the loop's loss, so it is comparable across
    loss functions; tokens equal to ``ignore_index`` (padding) are left out. It folds
    every batch by default (``chunk=1``): language-model logits are large, holding
    many batches of them would cost gigabytes, and the fold is a device-side
    cross-entropy that needs no host synchronisation.
    """
    return _Perplexity(name, chunk, ignore_index)


_BUILTINS: dict[str, Callable[[str], Metric]] = {
    "loss": lambda name: loss(name=name),
    "accuracy": lambda name: accuracy(name=name),
    "top5_accuracy": lambda name: top_k_accuracy(5, name=name),
    "matthews_correlation_coefficient": lambda name: matthews_correlation(name=name),
    "mcc": lambda name: matthews_correlation(name=name),
    "perplexity": lambda name: perplexity(name=name),
}

#: The metric names :func:`resolve_metrics` accepts (``mcc`` is an alias).
KNOWN_METRICS: tuple[str, ...] = tuple(_BUILTINS)


def resolve_metrics(specs: Sequence[str | Metric]) -> list[Metric]:
    """Turn names and metric objects into the metrics a loop tracks, ``loss`` first.

    Names build the built-ins, keyed by the spelling asked for (``"mcc"`` stays
    ``"mcc"``); objects that satisfy :class:`Metric` pass through unchanged. The
    loss metric is added when missing, because the loop always reports it.

    Raises:
        ConfigError: for an unknown name, an entry that is neither a name nor a
            metric, or two metrics with the same name.
    """
    if isinstance(specs, str):
        raise ConfigError(
            f"metrics must be a sequence of names or Metric objects, not the string "
            f"{specs!r}; write [{specs!r}] for a single metric."
        )
    metrics: list[Metric] = []
    for spec in specs:
        if isinstance(spec, str):
            if spec not in _BUILTINS:
                raise ConfigError(
                    f"Unknown metric {spec!r}; the known metrics are {', '.join(KNOWN_METRICS)}."
                )
            metrics.append(_BUILTINS[spec](spec))
        elif isinstance(spec, Metric):
            metrics.append(spec)
        else:
            raise ConfigError(
                f"A metric must be a name or an object with name, reset, update and "
                f"compute; got an object of type {type(spec).__name__}."
            )
    names = [metric.name for metric in metrics]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(
                f"Two metrics are named {name!r}; each needs its own name because the "
                f"name is its key in the history."
            )
    if "loss" in names:
        return [metrics[names.index("loss")]] + [m for m in metrics if m.name != "loss"]
    return [loss(), *metrics]


def batch_losses_of(metric: Metric) -> Tensor | None:
    """The per-batch losses a built-in loss metric keeps, or ``None`` for a user's own metric.

    For a metric built by :func:`loss` (or the name ``"loss"``) this is its record of
    the phase so far: one detached 1-D tensor on the losses' device, in batch order,
    empty before the first batch. Any other metric keeps no such record.
    """
    return metric.batch_losses() if isinstance(metric, _Loss) else None
