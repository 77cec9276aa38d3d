"""``bind_step``: the calls a fit makes per batch for a ``Step``, resolved once."""

from __future__ import annotations

import operator
from typing import Any

import torch

from statemachine_loop import Step
from statemachine_loop.step import bind_step


def test_bind_step_calls_what_the_defaults_call_and_keeps_overrides() -> None:
    default = bind_step(Step())
    assert default.forward is operator.call and default.loss is operator.call
    model = torch.nn.Linear(3, 1)
    inputs, target = torch.randn(4, 3), torch.randn(4, 1)
    assert torch.equal(default.forward(model, inputs), Step().forward(model, inputs))
    output = model(inputs)
    loss = default.loss(torch.nn.functional.mse_loss, output, target)
    assert torch.equal(loss, Step().loss(torch.nn.functional.mse_loss, output, target))

    class Halved(Step):
        def forward(self, model: torch.nn.Module, inputs: Any) -> Any:
            return model(inputs) / 2

    bound = bind_step(Halved())
    assert bound.forward.__func__ is Halved.forward  # type: ignore[attr-defined]
    assert bound.loss is operator.call
    assert torch.equal(bound.forward(model, inputs), model(inputs) / 2)
