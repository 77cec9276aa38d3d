"""File-system helpers the writing callbacks share."""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_directory"]


def make_directory(directory: Path) -> None:
    """Create ``directory`` and its parents unless it already exists.

    A file in the way is a ``FileExistsError`` naming it.
    """
    directory.mkdir(parents=True, exist_ok=True)
