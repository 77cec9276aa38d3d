"""``Precision``: the two extension points a mixed-precision callback sets on the loop.

``loop.autocast`` is a factory of the context manager forward and loss run in, and
``loop.grad_scaler`` the scaler backward and the taken optimizer step go through. A
callback (``MixedPrecision``) sets them at ``fit_start`` and clears them at ``fit_end``;
the driver reads them for every batch. They belong to the loop, not to one fit's run
state, so a value set before a fit is seen by it (and refused by ``MixedPrecision``
when it would be overwritten).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import attrs
import torch

__all__ = ["AutocastFactory", "Precision"]

#: What ``loop.autocast`` holds: a factory of the context manager forward and loss run in.
AutocastFactory = Callable[[], AbstractContextManager[Any]]


@attrs.define(eq=False)
class Precision:
    """The loop's autocast factory and gradient scaler, ``None`` when unset."""

    autocast: AutocastFactory | None = None
    grad_scaler: torch.amp.GradScaler | None = None
