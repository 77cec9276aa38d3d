"""Tests of ``statemachine_loop.metrics`` against scikit-learn and numpy oracles.

Every built-in metric is fed random batches of unequal sizes, often across several
chunks, and its value is compared with the oracle computed on all the data at once,
both part-way (the running value) and at the end. ``resolve_metrics`` is checked for
its keys, its ordering and its errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, matthews_corrcoef, top_k_accuracy_score
from torch import Tensor
from torch.overrides import TorchFunctionMode

from statemachine_loop.errors import ConfigError
from statemachine_loop.metrics import (
    KNOWN_METRICS,
    Metric,
    accuracy,
    batch_losses_of,
    loss,
    matthews_correlation,
    perplexity,
    resolve_metrics,
    top_k_accuracy,
)

# The oracles themselves warn on degenerate inputs that these tests generate on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning"),
    pytest.mark.filterwarnings("ignore:A single label was found:UserWarning"),
]

Batch = tuple[Tensor, Tensor]

FAST = settings(max_examples=25, deadline=None)
SIZES = st.lists(st.integers(1, 7), min_size=1, max_size=8)
SEEDS = st.integers(0, 2**32 - 1)
CHUNKS = st.integers(1, 4)


def _multiclass(seed: int, sizes: list[int], classes: int, integral: bool = False) -> list[Batch]:
    """Random ``(n, classes)`` logits and ``(n,)`` labels, one pair per batch size.

    Integral logits make ties and degenerate predictions likely (argmax takes the
    first maximum in both torch and numpy); continuous ones make ties impossible.
    """
    rng = np.random.default_rng(seed)
    batches = []
    for n in sizes:
        scores = rng.integers(-2, 3, (n, classes)) if integral else rng.normal(size=(n, classes))
        labels = rng.integers(0, classes, n)
        batches.append((torch.tensor(scores, dtype=torch.float32), torch.tensor(labels)))
    return batches


def _binary(seed: int, sizes: list[int], column: bool, float_target: bool) -> list[Batch]:
    """Random single logits in ``{-2, ..., 2}`` (so exactly 0 occurs) and 0/1 targets."""
    rng = np.random.default_rng(seed)
    batches = []
    for n in sizes:
        logits = torch.tensor(rng.integers(-2, 3, n), dtype=torch.float32)
        target = torch.tensor(rng.integers(0, 2, n))
        batches.append(
            (
                logits.unsqueeze(1) if column else logits,
                target.float() if float_target else target,
            )
        )
    return batches


def _feed(metric: Metric, batches: list[Batch]) -> None:
    for output, target in batches:
        metric.update(output, target, output.float().mean(), target.shape[0])


def _joined(batches: list[Batch]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    outputs = np.concatenate([out.numpy() for out, _ in batches])
    targets = np.concatenate([tgt.numpy() for _, tgt in batches])
    return outputs, targets


def _check_running(
    metric: Metric,
    batches: list[Batch],
    oracle: Callable[[list[Batch]], float],
    rel: float = 1e-12,
) -> None:
    """The value after the first half and after all batches matches the oracle.

    Counting metrics are exact up to float64 rounding (``rel=1e-12``); metrics that
    reduce float32 logits on the device get a float32 tolerance.
    """
    half = max(1, len(batches) // 2)
    _feed(metric, batches[:half])
    assert metric.compute() == pytest.approx(oracle(batches[:half]), rel=rel, abs=1e-12)
    _feed(metric, batches[half:])
    assert metric.compute() == pytest.approx(oracle(batches), rel=rel, abs=1e-12)


def _accuracy_oracle(batches: list[Batch]) -> float:
    scores, labels = _joined(batches)
    return float(accuracy_score(labels, scores.argmax(-1)))


def _binary_predictions(batches: list[Batch]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    logits, labels = _joined(batches)
    return labels.reshape(-1).astype(int), (logits.reshape(-1) >= 0).astype(int)


# --- loss ---------------------------------------------------------------------


@FAST
@given(seed=SEEDS, sizes=SIZES, chunk=CHUNKS)
def test_loss_is_the_sample_weighted_mean(seed: int, sizes: list[int], chunk: int) -> None:
    losses = np.random.default_rng(seed).uniform(0, 5, len(sizes))
    metric = loss(chunk=chunk)
    for k, (value, n) in enumerate(zip(losses, sizes, strict=True)):
        metric.update(torch.zeros(n), torch.zeros(n), torch.tensor(value, dtype=torch.float32), n)
        expected = np.average(losses[: k + 1], weights=sizes[: k + 1])
        assert metric.compute() == pytest.approx(expected, rel=1e-6)


def test_loss_weights_a_short_last_batch_less() -> None:
    metric = loss(chunk=3)
    for value, n in [(1.0, 4), (2.0, 4), (3.0, 4), (4.0, 4), (10.0, 1)]:
        metric.update(torch.zeros(n), torch.zeros(n), torch.tensor(value), n)
    assert metric.compute() == pytest.approx((4 * (1 + 2 + 3 + 4) + 10) / 17)


# --- accuracy and top-k ---------------------------------------------------------


@FAST
@given(seed=SEEDS, sizes=SIZES, classes=st.integers(2, 6), chunk=CHUNKS)
def test_accuracy_matches_sklearn(seed: int, sizes: list[int], classes: int, chunk: int) -> None:
    batches = _multiclass(seed, sizes, classes, integral=seed % 2 == 0)
    _check_running(accuracy(chunk=chunk), batches, _accuracy_oracle)


@FAST
@given(
    seed=SEEDS,
    sizes=SIZES,
    column=st.booleans(),
    float_target=st.booleans(),
    chunk=CHUNKS,
)
def test_binary_accuracy_thresholds_the_logit_at_zero(
    seed: int, sizes: list[int], column: bool, float_target: bool, chunk: int
) -> None:
    def oracle(part: list[Batch]) -> float:
        return float(accuracy_score(*_binary_predictions(part)))

    _check_running(accuracy(chunk=chunk), _binary(seed, sizes, column, float_target), oracle)


def test_binary_logit_exactly_zero_counts_as_positive() -> None:
    metric = accuracy()
    metric.update(torch.tensor([0.0, 0.0, -1.0]), torch.tensor([1, 0, 0]), torch.tensor(0.0), 3)
    assert metric.compute() == pytest.approx(2 / 3)


@FAST
@given(seed=SEEDS, sizes=SIZES, classes=st.integers(5, 8), chunk=CHUNKS, data=st.data())
def test_top_k_accuracy_matches_sklearn(
    seed: int, sizes: list[int], classes: int, chunk: int, data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, classes), label="k")

    def oracle(part: list[Batch]) -> float:
        scores, labels = _joined(part)
        return float(top_k_accuracy_score(labels, scores, k=k, labels=range(classes)))

    metric = top_k_accuracy(k, chunk=chunk)
    assert metric.name == f"top{k}_accuracy"
    _check_running(metric, _multiclass(seed, sizes, classes), oracle)


def test_top5_accuracy_refuses_fewer_than_five_classes_at_the_first_update() -> None:
    metric = resolve_metrics(["top5_accuracy"])[1]
    with pytest.raises(ConfigError, match="at least 5 classes"):
        metric.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.tensor(0.0), 4)


def test_accuracy_over_sequences_of_varying_length() -> None:
    batches = [(torch.randn(2, t, 4), torch.randint(0, 4, (2, t)), t) for t in (3, 5, 1, 6)]
    metric = accuracy(chunk=3)
    for output, target, _ in batches:
        metric.update(output, target, torch.tensor(0.0), 2)
    predictions = torch.cat([out.argmax(-1).reshape(-1) for out, _, _ in batches])
    labels = torch.cat([tgt.reshape(-1) for _, tgt, _ in batches])
    assert metric.compute() == pytest.approx(accuracy_score(labels, predictions))


@pytest.mark.parametrize("start", ["fresh", "restored", "reset"])
def test_large_outputs_fold_before_the_chunk_fills(
    monkeypatch: pytest.MonkeyPatch, start: str
) -> None:
    """The buffer holds at most BUFFER_ELEMENTS output elements, whatever the chunk says."""
    # The buffering module owns the bound; metrics.BUFFER_ELEMENTS re-exports its value.
    monkeypatch.setattr("statemachine_loop._buffered_metrics.BUFFER_ELEMENTS", 100)
    batches = _multiclass(seed=3, sizes=[8, 8, 8, 8, 8, 3], classes=5)  # 40 elements a batch
    metric = accuracy(chunk=1000)
    if start == "reset":  # a phase of small outputs before: the chunk is sized again
        metric.update(torch.randn(1, 5), torch.zeros(1, dtype=torch.long), torch.tensor(0.0), 1)
        metric.reset()
    if (
        start == "restored"
    ):  # the layout comes from a checkpoint; the chunk is still sized per batch
        metric.update(*batches[0], torch.tensor(0.0), 8)
        state = metric.state_dict()
        metric = accuracy(chunk=1000)
        metric.load_state_dict(state)
        batches = batches[1:]
    held = []
    for output, target in batches:
        metric.update(output, target, torch.tensor(0.0), len(target))
        held.append(len(metric._buffer))  # type: ignore[attr-defined]
    # 100 // 40 = 2 batches per fold: one held, folded with the second, and so on.
    assert held == [1, 0] * (len(held) // 2) + [1] * (len(held) % 2)
    everything = _multiclass(seed=3, sizes=[8, 8, 8, 8, 8, 3], classes=5)
    assert metric.compute() == pytest.approx(_accuracy_oracle(everything))


def test_multiclass_target_of_the_wrong_shape_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\(\.\.\., classes\)"):
        accuracy().update(torch.randn(4, 3), torch.zeros(4, 3), torch.tensor(0.0), 4)


# --- Matthews correlation -------------------------------------------------------


@FAST
@given(seed=SEEDS, sizes=SIZES, classes=st.integers(2, 5), chunk=CHUNKS)
def test_mcc_matches_sklearn_multiclass(
    seed: int, sizes: list[int], classes: int, chunk: int
) -> None:
    def oracle(part: list[Batch]) -> float:
        scores, labels = _joined(part)
        return float(matthews_corrcoef(labels, scores.argmax(-1)))

    batches = _multiclass(seed, sizes, classes, integral=True)
    _check_running(matthews_correlation(chunk=chunk), batches, oracle)


@FAST
@given(seed=SEEDS, sizes=SIZES, column=st.booleans(), float_target=st.booleans(), chunk=CHUNKS)
def test_mcc_matches_sklearn_binary_single_logit(
    seed: int, sizes: list[int], column: bool, float_target: bool, chunk: int
) -> None:
    def oracle(part: list[Batch]) -> float:
        return float(matthews_corrcoef(*_binary_predictions(part)))

    batches = _binary(seed, sizes, column, float_target)
    _check_running(matthews_correlation(chunk=chunk), batches, oracle)


def test_mcc_is_zero_when_everything_is_one_class() -> None:
    metric = matthews_correlation(chunk=3)
    for _ in range(10):
        metric.update(
            torch.tensor([[3.0, 1.0]] * 5), torch.zeros(5, dtype=torch.long), torch.tensor(0.0), 5
        )
    assert metric.compute() == 0.0
    assert matthews_corrcoef([0] * 50, [0] * 50) == 0.0


def test_mcc_of_perfect_and_inverted_predictions() -> None:
    logits = torch.tensor([2.0, -1.0, 0.0, -3.0])
    perfect, inverted = matthews_correlation(), matthews_correlation()
    perfect.update(logits, torch.tensor([1, 0, 1, 0]), torch.tensor(0.0), 4)
    inverted.update(logits, torch.tensor([0, 1, 0, 1]), torch.tensor(0.0), 4)
    assert (perfect.compute(), inverted.compute()) == pytest.approx((1.0, -1.0))


def test_mcc_target_outside_the_classes_is_a_config_error() -> None:
    metric = matthews_correlation()
    metric.update(torch.randn(3, 3), torch.tensor([0, 1, 3]), torch.tensor(0.0), 3)
    with pytest.raises(ConfigError, match=r"outside the classes 0\.\.2 .*\(1 of them\)"):
        metric.compute()


# --- perplexity -----------------------------------------------------------------


def _perplexity_oracle(batches: list[Batch], ignore_index: int) -> float:
    """``exp`` of the mean over kept tokens of ``logsumexp(z) - z[target]``, in numpy."""
    logits = np.concatenate([out.numpy().reshape(-1, out.shape[-1]) for out, _ in batches])
    ids = np.concatenate([tgt.numpy().reshape(-1) for _, tgt in batches])
    keep = ids != ignore_index
    logits, ids = logits[keep].astype(np.float64), ids[keep]
    peak = logits.max(-1, keepdims=True)
    logsumexp = np.log(np.exp(logits - peak).sum(-1)) + peak[:, 0]
    return float(np.exp(np.mean(logsumexp - logits[np.arange(len(ids)), ids])))


@FAST
@given(
    seed=SEEDS,
    lengths=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    ignore_index=st.sampled_from([-100, 0]),
    chunk=CHUNKS,
)
def test_perplexity_is_exp_of_the_token_mean_cross_entropy(
    seed: int, lengths: list[int], ignore_index: int, chunk: int
) -> None:
    rng = np.random.default_rng(seed)
    vocab, batches = 6, []
    for length in lengths:
        logits = torch.tensor(rng.normal(scale=2, size=(2, length, vocab)), dtype=torch.float32)
        ids = rng.integers(1, vocab, (2, length))
        ids[rng.random((2, length)) < 0.3] = ignore_index
        ids[0, 0] = 1  # at least one kept token per batch
        batches.append((logits, torch.tensor(ids)))

    def oracle(part: list[Batch]) -> float:
        return _perplexity_oracle(part, ignore_index)

    _check_running(perplexity(ignore_index, chunk=chunk), batches, oracle, rel=1e-5)


def test_perplexity_ignores_padding_and_is_nan_when_everything_is_padding() -> None:
    logits = torch.randn(3, 5)
    metric = perplexity()
    metric.update(logits, torch.tensor([2, -100, 4]), torch.tensor(0.0), 3)
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([2, 4])).exp()
    assert metric.compute() == pytest.approx(float(expected), rel=1e-5)
    metric.reset()
    metric.update(logits, torch.full((3,), -100), torch.tensor(0.0), 3)
    assert math.isnan(metric.compute())


# --- behaviour common to the built-ins --------------------------------------------


BUILTINS: list[Callable[[], Metric]] = [
    loss,
    accuracy,
    lambda: top_k_accuracy(2),
    matthews_correlation,
    perplexity,
]


@pytest.mark.parametrize("make", BUILTINS)
def test_compute_without_batches_is_nan_and_reset_forgets(make: Callable[[], Metric]) -> None:
    metric = make()
    assert math.isnan(metric.compute())
    first, second = _multiclass(1, [5, 3], 4), _multiclass(2, [4, 6], 4)
    _feed(metric, first)
    metric.compute()
    metric.reset()
    assert math.isnan(metric.compute())
    fresh = make()
    for m in (metric, fresh):
        _feed(m, second)
    assert metric.compute() == fresh.compute()


def test_chunk_boundaries_do_not_change_the_value() -> None:
    batches = _multiclass(7, [5, 3, 4, 1, 6, 2, 5, 5, 3, 1], 3, integral=True)
    for make in (accuracy, matthews_correlation, perplexity):
        values = []
        for chunk in (1, 3, 64):
            metric = make(chunk=chunk)
            _feed(metric, batches)
            values.append(metric.compute())
        assert values == pytest.approx([values[0]] * 3, rel=1e-6), make


class _RecordTorchCalls(TorchFunctionMode):
    """Collects the names of the torch functions and methods called while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.names.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


#: What ``update`` may do to a tensor until the chunk is full: detach, read metadata.
HOT_PATH_CALLS = {"detach", "__get__", "numel", "dim", "size"}


#: Perplexity folds every batch by default; buffering is tested with an explicit chunk.
BUFFERING = [*BUILTINS[:-1], lambda: perplexity(chunk=64)]


def test_perplexity_folds_every_batch_by_default() -> None:
    metric = perplexity()
    logits = torch.randn(2, 5, 7)
    metric.update(logits, torch.randint(0, 7, (2, 5)), logits.mean(), 2)
    held = [value for value in vars(metric).values() if isinstance(value, list)]
    assert not any(held), "large logits must not be held between batches"


@pytest.mark.parametrize("make", BUFFERING)
def test_update_only_detaches_until_the_chunk_is_full(make: Callable[[], Metric]) -> None:
    metric = make()
    weight = torch.randn(4, 4, requires_grad=True)
    output = torch.randn(8, 4) @ weight
    target = torch.randint(0, 4, (8,))
    batch_loss = (output**2).mean()
    with _RecordTorchCalls() as recorder:
        for _ in range(5):
            metric.update(output, target, batch_loss, 8)
    assert set(recorder.names) <= HOT_PATH_CALLS
    assert "detach" in recorder.names

    held = [value for value in vars(metric).values() if isinstance(value, list)]
    tensors = [t for items in held for item in items for t in item if isinstance(t, Tensor)]
    assert tensors, "the metric should be holding the batches it has not folded yet"
    assert not any(t.requires_grad for t in tensors)
    assert math.isfinite(metric.compute())


@pytest.mark.parametrize(
    "make",
    [
        loss,
        accuracy,
        matthews_correlation,
        perplexity,
        lambda chunk: top_k_accuracy(2, chunk=chunk),
    ],
)
def test_the_chunk_th_update_folds_the_buffer(make: Callable[..., Metric]) -> None:
    metric = make(chunk=3)
    output, target = torch.randn(2, 3), torch.tensor([0, 1])
    for _ in range(2):
        metric.update(output, target, torch.tensor(0.0), 2)
    with _RecordTorchCalls() as recorder:
        metric.update(output, target, torch.tensor(0.0), 2)
    assert {"cat", "stack"} & set(recorder.names)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_chunk_and_k_must_be_positive_ints(bad: Any) -> None:
    with pytest.raises(ConfigError):
        accuracy(chunk=bad)
    with pytest.raises(ConfigError):
        top_k_accuracy(bad)


# --- resolve_metrics --------------------------------------------------------------


class _Constant:
    """A user metric satisfying the protocol without inheriting anything."""

    def __init__(self, name: str) -> None:
        self.name = name

    def reset(self) -> None:
        pass

    def update(self, output: Tensor, target: Tensor, loss: Tensor, batch_size: int) -> None:
        pass

    def compute(self) -> float:
        return 1.0


def _names(metrics: list[Metric]) -> list[str]:
    return [metric.name for metric in metrics]


def test_known_metrics() -> None:
    assert set(KNOWN_METRICS) == {
        "loss",
        "accuracy",
        "top5_accuracy",
        "matthews_correlation_coefficient",
        "mcc",
        "perplexity",
    }
    assert _names(resolve_metrics(KNOWN_METRICS)) == list(KNOWN_METRICS)


def test_loss_is_always_first_and_never_duplicated() -> None:
    assert _names(resolve_metrics([])) == ["loss"]
    assert _names(resolve_metrics(["accuracy"])) == ["loss", "accuracy"]
    assert _names(resolve_metrics(["accuracy", "loss", "mcc"])) == ["loss", "accuracy", "mcc"]


def test_names_are_keyed_as_spelled() -> None:
    short, long = resolve_metrics(["mcc", "matthews_correlation_coefficient"])[1:]
    assert (short.name, long.name) == ("mcc", "matthews_correlation_coefficient")
    assert type(short) is type(long)


def test_user_metrics_pass_through_unchanged() -> None:
    mine, custom_loss = _Constant("f1"), _Constant("loss")
    assert isinstance(mine, Metric)
    resolved = resolve_metrics(["accuracy", mine])
    assert resolved[2] is mine
    assert resolve_metrics([mine, custom_loss]) == [custom_loss, mine]


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"Unknown metric 'f1'.*accuracy.*perplexity\.$"):
        resolve_metrics(["f1"])


@pytest.mark.parametrize("bad", [3, None, torch.nn.MSELoss()])
def test_a_spec_that_is_neither_name_nor_metric_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match=type(bad).__name__):
        resolve_metrics(["accuracy", bad])


@pytest.mark.parametrize(
    "specs",
    [["accuracy", "accuracy"], ["mcc", _Constant("mcc")], [_Constant("loss"), "loss"]],
)
def test_two_metrics_with_one_name_are_refused(specs: list[Any]) -> None:
    with pytest.raises(ConfigError, match="Two metrics are named"):
        resolve_metrics(specs)


def test_a_bare_string_is_refused() -> None:
    with pytest.raises(ConfigError, match="not the string 'accuracy'"):
        resolve_metrics("accuracy")


# --- batch_losses_of --------------------------------------------------------------


def test_batch_losses_of_the_built_in_loss_is_its_record() -> None:
    metric = resolve_metrics([])[0]
    record = batch_losses_of(metric)
    assert record is not None and record.numel() == 0
    losses = [0.5, 0.25, 2.0]
    for value in losses:
        metric.update(torch.zeros(3), torch.zeros(3), torch.tensor(value), 3)
    record = batch_losses_of(metric)
    assert record is not None
    assert record.tolist() == losses
    assert batch_losses_of(loss(name="other_loss", chunk=2)) is not None


def test_batch_losses_of_a_user_metric_is_none() -> None:
    mine = _Constant("loss")
    mine.update(torch.zeros(3), torch.zeros(3), torch.tensor(1.0), 3)
    assert batch_losses_of(mine) is None
    assert batch_losses_of(accuracy()) is None
