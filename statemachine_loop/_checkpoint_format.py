"""What a checkpoint is, shared by the code that writes and the code that reads one.

This module owns the checkpoint vocabulary and format rules: the error and warning
classes, :class:`CheckpointInfo`, the manifest's ``format``/``version`` and the
validation of its fields, what a payload or its metadata may hold, and what a
checkpoint name may be. It imports no other checkpoint module, so both
:mod:`statemachine_loop.checkpoint_io` (the public API and the write protocol) and
``statemachine_loop._checkpoint_read`` (verifying and loading) can import it; the public
names are re-exported from, and documented under, :mod:`statemachine_loop.checkpoint_io`.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from statemachine_loop.errors import LoopError

FORMAT = "statemachine_loop.checkpoint"
VERSION = 1
# The module these classes are used and documented from: type(error).__module__ is what
# tracebacks, pickles and StructuredLogger's exception records name.
PUBLIC_MODULE = "statemachine_loop.checkpoint_io"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SCALARS: tuple[type, ...] = (type(None), bool, int, float, str)
PAYLOAD_RULE = (
    "payloads are loaded with weights_only=True, so they hold only tensors, int, float, bool, "
    "str, None, torch.dtype, and lists, tuples and dicts of them. Convert it first (numpy "
    "arrays with torch.from_numpy, numpy scalars with .item(), bytes to a uint8 tensor)"
)
METADATA_RULE = (
    "metadata is stored as JSON, so it holds only str, int, float, bool, None, lists, and "
    "dicts with str keys. Convert it first (tuples to lists, tensors and numpy values with "
    ".item() or .tolist())"
)


# Manifest fields a reader relies on: name, what a bad value is not, and the check.
_FIELDS: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    ("payload", "not a plain file name", lambda v: isinstance(v, str) and plain_name(v)),
    ("sha256", "not 64 hex digits", lambda v: isinstance(v, str) and bool(_SHA256.fullmatch(v))),
    ("size", "not a non-negative int", lambda v: type(v) is int and v >= 0),
    ("step", "not an int", lambda v: type(v) is int),
    ("created", "not a number", lambda v: type(v) in (int, float)),
    ("metadata", "not an object", lambda v: isinstance(v, dict)),
)


class CheckpointError(LoopError, OSError):
    """A checkpoint could not be written, read, verified or safely loaded.

    The message names the file and what went wrong: the failed system call and its
    errno text, a size or sha256 mismatch, an unknown manifest format, or a payload
    refused because it holds Python objects. When an OS error caused it, ``errno`` is
    copied from that error (``errno.ENOSPC`` for a full disk).
    """

    __module__ = PUBLIC_MODULE


class CheckpointContentError(CheckpointError, TypeError):
    """The payload or metadata given to :func:`save_checkpoint` cannot be stored.

    Raised before anything is written; the message names the offending entry (for
    example ``payload['rng']['numpy'][1]``), its type, and how to convert it.
    """

    __module__ = PUBLIC_MODULE


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is corrupt, truncated or unreadable."""

    __module__ = PUBLIC_MODULE


@attrs.frozen
class CheckpointInfo:
    """What a manifest says about one checkpoint.

    ``step`` is the caller's monotonically increasing global step and orders
    checkpoints; ``metadata`` is the caller's JSON dict (epoch, batch, reason,
    monitor value...). ``size`` and ``sha256`` describe the payload file: they are
    what loading verifies it against.
    """

    __module__ = PUBLIC_MODULE

    path: Path
    manifest: Path
    step: int
    created: float
    metadata: dict[str, Any] = attrs.field(hash=False)
    size: int
    sha256: str


def os_error(what: str, exc: OSError, tail: str = "") -> CheckpointError:
    """A CheckpointError saying what failed and why, carrying the OS error's errno."""
    code = errno.errorcode.get(exc.errno or 0)
    error = CheckpointError(f"{what}: {exc.strerror or exc}{f' ({code})' if code else ''}.{tail}")
    error.errno = exc.errno
    return error


def plain_name(name: str) -> bool:
    """Whether ``name`` is a bare, visible file name with room for a suffix."""
    separators = {"/", "\\", "\0", os.sep, os.altsep or "/"}
    return (
        bool(name) and name[0] != "." and not separators & set(name) and len(name.encode()) <= 250
    )


def check_tree(value: Any, where: str, rule: str, active: set[int]) -> None:
    """Raise CheckpointContentError at the first entry of ``value`` that ``rule`` forbids."""
    kind, is_payload = type(value), rule is PAYLOAD_RULE
    if where in ("payload", "metadata") and not isinstance(value, dict):  # the roots
        raise CheckpointContentError(f"{where} must be a dict, got a {kind.__name__}.")
    if kind in _SCALARS or (is_payload and kind in (torch.Tensor, torch.nn.Parameter, torch.dtype)):
        return
    containers = (dict, collections.OrderedDict, list) + ((tuple, torch.Size) if is_payload else ())
    if kind not in containers:
        name = f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")
        raise CheckpointContentError(f"{where} is a {name}, which cannot be stored: {rule}.")
    if id(value) in active:
        raise CheckpointContentError(f"{where} contains itself; a checkpoint cannot hold a cycle.")
    active.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(value, dict) and type(key) not in (_SCALARS if is_payload else (str,)):
            raise CheckpointContentError(
                f"{where} has the key {key!r} of type {type(key).__name__}, which cannot be "
                f"stored: {rule}."
            )
        check_tree(item, f"{where}[{key!r}]", rule, active)
    active.discard(id(value))


def read_manifest(manifest: Path) -> CheckpointInfo | None:
    """Parse a manifest; None for a JSON file that is not a checkpoint manifest at all."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except OSError as exc:
        raise os_error(f"Could not read checkpoint manifest {manifest}", exc) from exc
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
        raise CheckpointError(f"Checkpoint manifest {manifest} is damaged: {exc}.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        if not manifest.with_suffix(".pt").exists():
            return None  # some other JSON file, not ours to judge
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"Checkpoint manifest {manifest} has an unknown format {found!r}; expected {FORMAT!r}."
        )
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"Checkpoint manifest {manifest} has format version {data.get('version')!r}, but this "
            f"statemachine_loop reads only version {VERSION} (was it written by a newer release?)."
        )
    problem = next((f"'{key}' is {what}" for key, what, ok in _FIELDS if not ok(data.get(key))), "")
    if problem:
        raise CheckpointError(f"Checkpoint manifest {manifest} is invalid: its {problem}.")
    return manifest_info(manifest, data)


def manifest_info(manifest: Path, data: dict[str, Any]) -> CheckpointInfo:
    """The CheckpointInfo of a manifest already known to be valid."""
    path = manifest.parent / data["payload"]
    step, created, metadata = data["step"], float(data["created"]), data["metadata"]
    return CheckpointInfo(path, manifest, step, created, metadata, data["size"], data["sha256"])
