"""Bad input gives a clear ConfigError, raised by the library, naming what was wrong.

Each case checks the error type (``ConfigError`` is also a ``ValueError``), key words
of the message (the argument, what was expected, what was given), that the innermost
frame of the traceback is the library's own code (not torch's or transitions'), and,
for pre-flight errors, that nothing ran: no event, no forward, no parameter change.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import helpers as h
import pytest
import torch
from helpers import BS, FS
from torch.nn.functional import mse_loss
from torch.utils.data import DataLoader, TensorDataset

import statemachine_loop
from statemachine_loop import Callback, ConfigError, LifecycleError, TrainingLoop
from statemachine_loop.testing import TraceRecorder

pytestmark = pytest.mark.parametrize("engine", h.ENGINES)

PACKAGE = Path(statemachine_loop.__file__).resolve().parent


def _raised_by_library(info: pytest.ExceptionInfo[BaseException]) -> None:
    frames = list(traceback.walk_tb(info.tb))
    innermost = Path(frames[-1][0].f_code.co_filename).resolve()
    assert PACKAGE in innermost.parents, innermost


def _check(info: pytest.ExceptionInfo[BaseException], *words: str) -> None:
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    _raised_by_library(info)


def _build(engine: str, model: torch.nn.Module | None = None, **overrides: Any) -> TrainingLoop:
    model = model or h.make_model()
    kwargs: dict[str, Any] = {
        "training": h.loader(2, seed=1),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "loss_fn": mse_loss,
    }
    kwargs.update(overrides)
    kwargs.setdefault("engine", engine)
    return TrainingLoop(**kwargs)


class _Misspelled(Callback):
    def on_batch_ned(self, loop: TrainingLoop) -> None:
        pass


EMPTY = DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 2)), batch_size=4)

CONSTRUCTION = [
    ({"training": EMPTY}, ["training", "no batches"]),
    ({"validation": EMPTY}, ["validation", "no batches"]),
    ({"training": 42}, ["training", "iterable", "int"]),
    ({"training": torch.randn(8, 3)}, ["training", "iterable", "Tensor"]),
    ({"validation": 3.5}, ["validation", "iterable", "float"]),
    ({"optimizer": "sgd"}, ["optimizer", "torch.optim.Optimizer", "str"]),
    ({"optimizer": [torch.zeros(1)]}, ["optimizer", "torch.optim.Optimizer", "list"]),
    ({"loss_fn": "mse"}, ["loss_fn", "callable", "str"]),
    ({"engine": "fast"}, ["engine", "compiled", "transitions", "'fast'"]),
    ({"metrics": ["acuracy"]}, ["'acuracy'", "accuracy"]),
    ({"metrics": "accuracy"}, ["metrics", "'accuracy'"]),
    ({"callbacks": [42]}, ["callbacks", "Callback", "int"]),
    ({"callbacks": [_Misspelled()]}, ["_Misspelled", "'on_batch_ned'", "batch_end"]),
]


@pytest.mark.parametrize(("overrides", "words"), CONSTRUCTION)
def test_bad_construction(engine: str, overrides: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        _build(**{"engine": engine, **overrides})
    _check(info, *words)


def _other_model_optimizer(model: torch.nn.Module) -> Any:
    return torch.optim.SGD(h.make_model(seed=5).parameters(), lr=0.1)


PREFLIGHT = [
    ({"epochs": 0}, ["epochs", "1", "0"]),
    ({"epochs": -1}, ["epochs", "-1"]),
    ({"epochs": 1.5}, ["epochs", "integer", "1.5"]),
    ({"epochs": True}, ["epochs", "integer", "True"]),
    ({"device": "gpu0"}, ["device", "'gpu0'", "cpu"]),
    ({"device": 3.5}, ["device", "3.5"]),
    ({"callbacks": [object()]}, ["callbacks", "Callback", "object"]),
    ({"callbacks": [_Misspelled()]}, ["_Misspelled", "'on_batch_ned'"]),
    ({"optimizer": _other_model_optimizer}, ["optimizer", "parameter", "model"]),
    ({"model": "not a model"}, ["model", "torch.nn.Module", "str"]),
]


@pytest.mark.parametrize(("bad", "words"), PREFLIGHT)
def test_bad_fit_arguments_fail_before_anything_runs(
    engine: str, bad: dict[str, Any], words: list[str]
) -> None:
    recorder, model = TraceRecorder(), h.CountingLinear()
    before = h.params_of(model)
    bad = dict(bad)
    optimizer = bad.pop("optimizer", None)
    loop = _build(engine, model, callbacks=[recorder])
    if optimizer is not None:
        loop = _build(engine, model, callbacks=[recorder], optimizer=optimizer(model))
    args: dict[str, Any] = {"model": model, "epochs": 1, **bad}
    with pytest.raises(ConfigError) as info:
        loop.fit(args.pop("model"), args.pop("epochs"), **args)
    _check(info, *words)
    assert recorder.events == [] and model.calls == 0 and loop.state == "idle"
    assert h.same_tensors(h.params_of(model), before)
    # The loop is still usable once the input is fixed.
    loop = _build(engine, model, callbacks=[recorder])
    loop.fit(model, 1)
    assert recorder.events == h.fit_trace(1, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda(engine: str) -> None:
    recorder, model = TraceRecorder(), h.CountingLinear()
    loop = _build(engine, model, callbacks=[recorder])
    with pytest.raises(ConfigError) as info:
        loop.fit(model, 1, device="cuda")
    _check(info, "'cuda'", "CUDA", "not available")
    assert recorder.events == [] and model.calls == 0


def test_loss_that_is_not_scalar(engine: str) -> None:
    recorder, model, steps = TraceRecorder(), h.make_model(), []
    before = h.params_of(model)

    def per_sample(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse_loss(output, target, reduction="none")

    loop = _build(engine, model, loss_fn=per_sample, callbacks=[recorder])
    loop.optimizer.register_step_post_hook(lambda *args: steps.append(1))
    with pytest.raises(ConfigError) as info:
        loop.fit(model, 1)
    _check(info, "loss_fn", "scalar", "(4, 2)", "reduction")
    assert steps == [] and h.same_tensors(h.params_of(model), before)
    assert recorder.events == h.interrupted(h.fit_trace(1, 2), BS, 0, taken=True)


BAD_BATCHES = [
    (
        [{"x": torch.zeros(4, 3), "y": torch.zeros(4, 2)}],
        ["(input, target)", "dict", "'x'", "Step"],
    ),
    ([(torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4))], ["(input, target)", "3 items"]),
    ([torch.zeros(4, 3)], ["(input, target)", "tensor", "(4, 3)"]),
]


@pytest.mark.parametrize(("training", "words"), BAD_BATCHES, ids=["dict", "3-tuple", "tensor"])
def test_batches_that_are_not_pairs(engine: str, training: list[Any], words: list[str]) -> None:
    recorder, model = TraceRecorder(), h.CountingLinear()
    loop = _build(engine, model, training=training, callbacks=[recorder])
    with pytest.raises(ConfigError) as info:
        loop.fit(model, 1)
    _check(info, *words)
    assert model.calls == 0
    # Found while fetching the first batch, before its batch_start: the loop winds down.
    assert recorder.events == h.interrupted(h.fit_trace(1, 1), BS, 0, taken=False)


def test_fit_called_from_a_callback_is_a_lifecycle_error(engine: str) -> None:
    recorder, model = TraceRecorder(), h.make_model()

    def reenter(loop: TrainingLoop, event: Any) -> None:
        if event is BS:
            loop.fit(model, 1)

    loop = _build(engine, model, callbacks=[recorder, reenter])
    with pytest.raises(LifecycleError) as info:
        loop.fit(model, 1)
    assert "already fitting" in str(info.value) and "fit" in str(info.value)
    assert loop.failure is info.value
    assert recorder.events == h.interrupted(h.fit_trace(1, 2), BS, 0, taken=True)
    assert recorder.events[0] is FS


def test_unset_parameters_buffers_and_shared_weights_pass_the_set_up(engine: str) -> None:
    # The set-up walks each module's own parameters and buffers once: a parameter set
    # to None (bias=False), BatchNorm's buffers and a layer used twice all pass, and a
    # model already on the device is trained in place.
    nn, size = torch.nn, h.IN_FEATURES
    shared = nn.Linear(size, size, bias=False)
    model = nn.Sequential(shared, nn.BatchNorm1d(size), shared, nn.Linear(size, h.OUT_FEATURES))
    loop = _build(engine, model)
    loop.fit(model, 1)
    assert loop.model is model
    assert int(model[1].num_batches_tracked) == 2  # two training batches


def test_a_parameter_missing_from_the_model_is_still_named(engine: str) -> None:
    model = h.make_model()
    stray = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    with pytest.raises(ConfigError) as info:
        _build(engine, model, optimizer=optimizer).fit(model, 1)
    _check(info, "1 parameter(s)", "do not belong", "Linear")
