"""The documented custom ``Step``: dict batches, several inputs, devices, loss weighting.

A custom step must train exactly as a hand-written loop does (bit-for-bit, same
seed); the hand-written loops below follow the contract's order of work: gradients
zeroed at training_start, then per batch forward, loss, backward, step, zero_grad.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import helpers as h
import pytest
import torch
from helpers import BS
from torch.nn.functional import mse_loss
from torch.utils.data import DataLoader, Dataset, TensorDataset

from statemachine_loop import Step, TrainingLoop
from statemachine_loop.step import move_to_device, needs_move

pytestmark = pytest.mark.parametrize("engine", h.ENGINES)


class _Dicts(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = h.tensors(n, seed=seed)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "label": self.y[i]}


class DictStep(Step):
    def split(self, batch: Any) -> tuple[Any, Any]:
        return batch["features"], batch["label"]


def _hand_fit(model: torch.nn.Module, data: Any, epochs: int, forward: Any) -> list[float]:
    """The reference loop; returns each epoch's sample-weighted mean training loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    means = []
    for _ in range(epochs):
        model.train()
        optimizer.zero_grad()
        total, count = 0.0, 0
        for batch in data:
            output, target = forward(model, batch)
            loss = mse_loss(output, target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item() * len(target)
            count += len(target)
        means.append(total / count)
    return means


def test_dict_batches_train_like_a_hand_written_loop(engine: str) -> None:
    data = DataLoader(_Dicts(10, seed=1), batch_size=4)  # 4, 4, 2
    model = h.make_model()
    loop = TrainingLoop(
        training=data,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=mse_loss,
        step=DictStep(),
        engine=engine,  # type: ignore[arg-type]
    )
    history = loop.fit(model, 3)

    hand = h.make_model()
    means = _hand_fit(hand, data, 3, lambda m, b: (m(b["features"]), b["label"]))
    assert h.same_tensors(h.params_of(model), h.params_of(hand))
    assert [e["loss"] for e in history.training] == pytest.approx(means, rel=1e-6)


class TwoInputs(torch.nn.Module):
    """``model(a, b)`` returning ``(output, auxiliary)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(3, 2)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.a(a) + self.b(b)
        return out, out.detach().abs()


class TwoInputStep(Step):
    def split(self, batch: Any) -> tuple[Any, Any]:
        a, b, target = batch
        return (a, b), target

    def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
        return model(*inputs)

    def loss(self, loss_fn: Any, output: Any, target: Any) -> torch.Tensor:
        return loss_fn(output[0], target)


def test_multi_input_model_trains_like_a_hand_written_loop(engine: str) -> None:
    g = torch.Generator().manual_seed(3)
    a, b, y = torch.randn(9, 3, generator=g), torch.randn(9, 4, generator=g), torch.randn(9, 2)
    data = DataLoader(TensorDataset(a, b, y), batch_size=4)
    model = TwoInputs()
    loop = TrainingLoop(
        training=data,
        validation=data,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=mse_loss,
        step=TwoInputStep(),
        engine=engine,  # type: ignore[arg-type]
    )
    history = loop.fit(model, 2)

    hand = TwoInputs()
    means = _hand_fit(hand, data, 2, lambda m, batch: (m(batch[0], batch[1])[0], batch[2]))
    assert h.same_tensors(h.params_of(model), h.params_of(hand))
    assert [e["loss"] for e in history.training] == pytest.approx(means, rel=1e-6)
    assert len(history.validation) == 2


def test_cpu_batches_are_not_copied(engine: str) -> None:
    batches = h.batches_of(h.loader(2, seed=1))
    seen: list[tuple[Any, Any]] = []

    def observe(loop: TrainingLoop, event: Any) -> None:
        if event is BS:
            seen.append((loop.last_step_input, loop.last_step_target))

    model = h.make_model()
    loop = h.make_loop(engine, model, training=batches, validation=batches, callbacks=[observe])
    loop.fit(model, 1, device="cpu")
    assert len(seen) == 4
    for (x, y), (seen_x, seen_y) in zip(batches * 2, seen, strict=True):
        assert seen_x is x and seen_y is y


def test_nested_cpu_batches_reach_the_step_unchanged(engine: str) -> None:
    x, y = h.tensors(4, seed=1)
    batch = ({"main": x, "extra": [x.clone(), "tag"]}, y)
    got: list[Any] = []

    class NestedStep(Step):
        def split(self, batch: Any) -> tuple[Any, Any]:
            got.append(batch)
            return batch[0]["main"], batch[1]

    model = h.make_model()
    h.make_loop(engine, model, training=[batch], step=NestedStep()).fit(model, 1, device="cpu")
    assert got[0] is batch


Pair = namedtuple("Pair", ["first", "second"])


def test_nested_batches_move(engine: str) -> None:
    # Moving itself is device-independent; the "meta" device needs no accelerator.
    x = torch.ones(2, 3)
    batch = {"a": [x, (x, "name")], "b": Pair(x, 7), "c": x}
    meta = torch.device("meta")
    assert needs_move(batch, meta) and not needs_move(batch, torch.device("cpu"))
    moved = move_to_device(batch, meta, non_blocking=False)
    assert type(moved) is dict and type(moved["a"]) is list and type(moved["a"][1]) is tuple
    assert type(moved["b"]) is Pair and moved["b"].second == 7 and moved["a"][1][1] == "name"
    tensors = [moved["a"][0], moved["a"][1][0], moved["b"].first, moved["c"]]
    assert all(t.device == meta and t.shape == (2, 3) for t in tensors)
    assert x.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nested_batches_move_to_cuda_in_a_fit(engine: str) -> None:
    x, y = h.tensors(4, seed=1)
    devices: list[Any] = []

    class NestedStep(Step):
        def split(self, batch: Any) -> tuple[Any, Any]:
            devices.extend([batch[0]["main"].device, batch[0]["extra"][0].device, batch[1].device])
            return batch[0]["main"], batch[1]

    model = h.make_model()
    batch = ({"main": x, "extra": [x.clone()]}, y)
    h.make_loop(engine, model, training=[batch], step=NestedStep()).fit(model, 1, device="cuda")
    assert {d.type for d in devices} == {"cuda"}


class UnitWeights(Step):
    def batch_size(self, inputs: Any, target: Any) -> int:
        return 1


@pytest.mark.parametrize("step", [None, UnitWeights()], ids=["sizes", "unit-weights"])
def test_loss_metric_is_weighted_by_step_batch_size(engine: str, step: Step | None) -> None:
    val = h.loader(3, batch_size=4, seed=2, last=1)  # batches of 4, 4 and 1 samples
    model = h.make_model()
    kwargs = {} if step is None else {"step": step}
    history = h.make_loop(engine, model, train=1, validation=val, **kwargs).fit(model, 1)

    with torch.no_grad():
        losses = [mse_loss(model(x), y).item() for x, y in val]
    weighted = (4 * losses[0] + 4 * losses[1] + 1 * losses[2]) / 9
    unweighted = sum(losses) / 3
    assert abs(weighted - unweighted) > 1e-3 * abs(weighted)  # the data tells them apart
    expected = weighted if step is None else unweighted
    assert history.validation[0]["loss"] == pytest.approx(expected, rel=1e-6)
