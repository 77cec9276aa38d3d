"""The record of a fit: final metric values per phase, one entry per phase that ran."""

from __future__ import annotations

import attrs

__all__ = ["History"]


@attrs.define
class History:
    """Per-phase metric values of a fit, as returned by ``TrainingLoop.fit``.

    ``training`` and ``validation`` get one entry per phase that ran at least one
    batch: a dict of the phase's final metric values plus ``"epoch"``, the epoch
    index. A phase cut short by a stop still adds its entry, over the batches it
    ran; a skipped phase adds none, so ``training[-1]`` is always the latest phase
    that actually trained.
    """

    training: list[dict[str, float]] = attrs.field(factory=list)
    validation: list[dict[str, float]] = attrs.field(factory=list)

    def as_dict(self) -> dict[str, list[dict[str, float]]]:
        """A JSON-ready copy, for logs and checkpoints."""
        return {
            "training": [dict(entry) for entry in self.training],
            "validation": [dict(entry) for entry in self.validation],
        }
