"""A pytest plugin with fixtures for testing callbacks: ``tiny_loop`` and ``check_callback``.

Installed with the package (entry point ``statemachine_loop`` in the ``pytest11``
group), so a project's tests can use the fixtures without a ``conftest.py``::

    def test_my_callback_conforms(check_callback):
        check_callback(MyCallback)

    def test_my_callback_logs_each_epoch(tiny_loop):
        loop, model = tiny_loop(callbacks=[MyCallback()])
        loop.fit(model, 2)

``check_callback`` runs :func:`statemachine_loop.testing.conformance.check_callback`
with ``max_examples`` taken from ``--callback-examples=N`` or the ini option
``callback_examples`` (default 50); keyword arguments override it per call.

Importing this module imports neither torch nor hypothesis, so every pytest session
of a project that merely has the package installed stays fast, and one without
hypothesis (a test dependency, not a runtime one) still starts; the fixtures need
hypothesis and say so when it is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch

    from statemachine_loop.loop import TrainingLoop

__all__ = ["check_callback", "pytest_addoption", "tiny_loop"]

#: The default of ``--callback-examples`` and of the ``callback_examples`` ini option.
DEFAULT_EXAMPLES = 50


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--callback-examples`` and the ``callback_examples`` ini option."""
    group = parser.getgroup("statemachine_loop", "statemachine_loop callback conformance")
    group.addoption(
        "--callback-examples",
        type=int,
        default=None,
        metavar="N",
        help="random examples per check_callback call (default: the callback_examples "
        f"ini option, else {DEFAULT_EXAMPLES}); the deterministic sweep always runs.",
    )
    parser.addini(
        "callback_examples",
        help=f"random examples per check_callback call (default {DEFAULT_EXAMPLES}).",
        default=str(DEFAULT_EXAMPLES),
    )


def _require_hypothesis(fixture: str) -> None:
    try:
        import hypothesis  # noqa: F401
    except ImportError as error:
        from statemachine_loop.errors import MissingDependencyError

        raise MissingDependencyError(
            f"The {fixture} fixture needs hypothesis, a test dependency of statemachine_loop; "
            "install it with `pip install hypothesis` (or the package's `dev` extra)."
        ) from error


@pytest.fixture
def tiny_loop() -> Callable[..., tuple[TrainingLoop, torch.nn.Linear]]:
    """A factory of tiny real fits: ``tiny_loop(shape=None, callbacks=(), engine="compiled")``.

    Returns ``(loop, model)``: a ``Linear`` classifier on seeded random tensors (see
    :func:`statemachine_loop.testing.strategies.tiny_loop`); ``shape`` defaults to
    2 epochs of 3 training and 2 validation batches. Call ``loop.fit(model, epochs)``.
    """
    _require_hypothesis("tiny_loop")
    from statemachine_loop.testing.strategies import RunShape
    from statemachine_loop.testing.strategies import tiny_loop as build

    def make(
        shape: RunShape | None = None, callbacks: Any = (), engine: Any = "compiled", **options: Any
    ) -> tuple[TrainingLoop, torch.nn.Linear]:
        chosen = shape if shape is not None else RunShape(2, 3, 2)
        return build(chosen, callbacks, engine, **options)

    return make


@pytest.fixture
def check_callback(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``check_callback(factory, **options)``: the conformance kit, sized by the command line.

    ``max_examples`` comes from ``--callback-examples`` or the ``callback_examples``
    ini option unless given; other options (``engines``, ``resume``, ``seed``) pass
    through. Raises ``ConformanceError`` with a snippet of the minimal failing example.
    """
    _require_hypothesis("check_callback")
    from statemachine_loop.testing.conformance import check_callback as check

    config = request.config
    chosen = config.getoption("callback_examples")
    examples = int(chosen if chosen is not None else config.getini("callback_examples"))

    def run(factory: Callable[[], Any], **options: Any) -> None:
        options.setdefault("max_examples", examples)
        check(factory, **options)

    return run
