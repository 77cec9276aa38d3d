"""``MixedPrecision``: autocast the forward pass and loss, and scale float16 gradients.

The driver owns two extension points, ``loop.autocast`` (a factory of the context
manager that forward and loss run in, in both phases) and ``loop.grad_scaler``
(used for backward and the taken ``optimizer.step()``). This callback sets them at
``fit_start`` and clears them at ``fit_end``, which fires last and always, so a loop
is never left in mixed precision after a fit, even a failed one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from statemachine_loop.callback import Callback
from statemachine_loop.errors import ConfigError

if TYPE_CHECKING:
    from statemachine_loop.view import LoopView

__all__ = ["MixedPrecision"]


class MixedPrecision(Callback):
    """Run forward and loss under ``torch.autocast(dtype)``; scale the loss for float16.

    ``dtype=torch.bfloat16`` (the default) works on CPU and on GPUs that support it,
    and needs no gradient scaling: bfloat16 has float32's exponent range.
    ``dtype=torch.float16`` is for CUDA, where it adds a ``torch.amp.GradScaler``
    (configured by ``scaler_options``, e.g. ``{"init_scale": 2.0**10}``) whose state
    survives checkpoints through :meth:`state_dict`; the scaler skips the steps whose
    gradients overflowed and adapts its scale. float16 on any other device is a
    :class:`~statemachine_loop.ConfigError` at ``fit_start``, before anything runs:
    use bfloat16 there. Parameters and optimizer state stay float32; only the
    autocast region computes in the lower precision.
    """

    def __init__(
        self,
        dtype: torch.dtype = torch.bfloat16,
        *,
        scaler_options: Mapping[str, Any] | None = None,
    ) -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(
                f"MixedPrecision dtype must be torch.bfloat16 or torch.float16; got {dtype!r}."
            )
        if scaler_options is not None and dtype is not torch.float16:
            raise ConfigError(
                "MixedPrecision scaler_options apply only to dtype=torch.float16 (bfloat16 "
                f"needs no gradient scaler); got them with {dtype}."
            )
        self.dtype = dtype
        self.scaler_options = dict(scaler_options or {})
        #: The gradient scaler of the latest float16 fit (``None`` for bfloat16).
        self.grad_scaler: torch.amp.GradScaler | None = None
        self._scaler_state: dict[str, Any] | None = None

    def guard_fit_start(self, loop: LoopView) -> None:
        """Refuse, before anything runs, float16 off CUDA or a loop already in autocast."""
        device = loop.device.type
        if self.dtype is torch.float16 and device != "cuda":
            raise ConfigError(
                f"MixedPrecision(torch.float16) needs a CUDA device, but the fit runs on "
                f"{device!r}; use MixedPrecision(torch.bfloat16) there."
            )
        if loop.autocast is not None or loop.grad_scaler is not None:
            raise ConfigError(
                "MixedPrecision found loop.autocast or loop.grad_scaler already set; "
                "use one mixed-precision callback per loop."
            )

    def on_fit_start(self, loop: LoopView) -> None:
        """Install the autocast factory and, for float16, the gradient scaler."""
        loop.autocast = functools.partial(torch.autocast, loop.device.type, dtype=self.dtype)
        if self.dtype is torch.float16:
            scaler = torch.amp.GradScaler(loop.device.type, **self.scaler_options)
            if self._scaler_state:  # loaded from a checkpoint: used once
                scaler.load_state_dict(self._scaler_state)
                self._scaler_state = None
            self.grad_scaler = loop.grad_scaler = scaler

    def on_fit_end(self, loop: LoopView) -> None:
        """Take the loop out of mixed precision."""
        loop.autocast = None
        loop.grad_scaler = None

    def state_dict(self) -> dict[str, Any]:
        """The gradient scaler's state (scale and growth tracker); empty for bfloat16."""
        if self.grad_scaler is not None:
            return {"grad_scaler": self.grad_scaler.state_dict()}
        if self._scaler_state:
            return {"grad_scaler": dict(self._scaler_state)}
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the scaler takes it at the next ``fit_start``."""
        self._scaler_state = state.get("grad_scaler")
        if self.grad_scaler is not None and self._scaler_state:
            self.grad_scaler.load_state_dict(self._scaler_state)
