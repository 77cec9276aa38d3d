"""What the loop knows about wrapped models.

Under ``torch.distributed`` the loop trains a wrapper around the user's module; the
weights a checkpoint holds, and the ones a callback copies or loads, are always the
user's module's, with its own parameter names.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

__all__ = ["unwrap"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a ``DistributedDataParallel`` wrapper (or the module)."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    assert isinstance(inner, torch.nn.Module)
    return inner
