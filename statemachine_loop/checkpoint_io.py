"""Checkpoint files on disk: atomic writes, checksums, and loading that never runs code.

A checkpoint ``name`` is two files in one directory: the payload ``<name>.pt``
(``torch.save``; read with ``torch.load(weights_only=True, map_location="cpu")``) and,
written after it, the manifest ``<name>.json`` (``format``, ``version``, ``payload``,
``sha256``, ``size``, ``step``, ``created``, ``metadata``, ``torch``). The manifest is
the commit marker: a payload without one is an interrupted save, not a checkpoint.
Files are written to a temporary name in the same directory, fsynced, moved into place
with ``os.replace``, then the directory is fsynced: a half-written file is never
visible under its final name. Size and sha256 are checked *before* deserializing.

A payload holds nested ``dict``/``OrderedDict``, ``list`` and ``tuple`` of tensors,
``int``, ``float``, ``bool``, ``str``, ``None``, ``torch.Size`` and ``torch.dtype``:
what ``weights_only=True`` accepts on every supported torch without extra globals.
Callers convert numpy arrays and scalars (``numpy.random.get_state()`` holds an array)
to tensors or Python numbers, ``bytes`` to uint8 tensors, sets to lists;
:func:`save_checkpoint` names any offending entry before writing. Loading also accepts
what the process allowlisted with ``torch.serialization.add_safe_globals``.

The format itself (error classes, :class:`CheckpointInfo`, manifest validation, what a
payload may hold) is ``statemachine_loop._checkpoint_format``; verifying and loading is
``statemachine_loop._checkpoint_read``. This module owns the public API and the write
protocol, and re-exports the public names of both.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from statemachine_loop._checkpoint_format import (
    FORMAT,
    METADATA_RULE,
    PAYLOAD_RULE,
    VERSION,
    CheckpointContentError,
    CheckpointError,
    CheckpointInfo,
    CheckpointWarning,
    check_tree,
    manifest_info,
    os_error,
    plain_name,
    read_manifest,
)
from statemachine_loop._checkpoint_read import (
    deserialize,
    open_verified,
    scan,
    verified_newest_first,
)
from statemachine_loop.errors import ConfigError

__all__ = [
    "CheckpointContentError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointWarning",
    "delete_checkpoint",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

_TMP_PREFIX = ".tmp-"
_UNTOUCHED = " Existing checkpoints were not modified."
# errnos with which a directory fsync means "not supported here" rather than "failed".
_NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}


def save_checkpoint(
    directory: str | Path,
    name: str,
    payload: dict[str, Any],
    *,
    step: int,
    metadata: dict[str, Any],
) -> CheckpointInfo:
    """Write ``payload`` as checkpoint ``name`` in ``directory`` (created if missing).

    Both files are written and fsynced under temporary names before any final name
    changes, so a full disk or a read-only directory leaves every existing checkpoint
    as it was. Re-using a name retires the old manifest first, so the old checkpoint
    is never seen paired with the new payload. Raises :class:`CheckpointContentError`
    (before writing anything) for values that cannot be stored, ``ConfigError`` for a
    name that is not a plain file name, and :class:`CheckpointError` when the disk
    refuses.
    """
    if not isinstance(name, str) or not plain_name(name):
        raise ConfigError(
            f"Checkpoint name {name!r} is not a plain file name: it needs no directory part, "
            "no leading dot, and at most 250 bytes."
        )
    if type(step) is not int:
        raise CheckpointContentError(f"step must be an int, got {step!r}.")
    check_tree(payload, "payload", PAYLOAD_RULE, set())
    check_tree(metadata, "metadata", METADATA_RULE, set())
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    directory = Path(directory)
    path, manifest = directory / f"{name}.pt", directory / f"{name}.json"
    fields = {"format": FORMAT, "version": VERSION, "payload": path.name}
    fields |= {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "step": step}
    fields |= {"created": time.time(), "metadata": metadata, "torch": str(torch.__version__)}
    text = json.dumps(fields, indent=2) + "\n"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = f"Could not create the checkpoint directory {directory}"
        raise os_error(what, exc, _UNTOUCHED) from exc
    temps = [_write_temp(path, data)]
    try:
        temps.append(_write_temp(manifest, text.encode("utf-8")))
        _commit(temps, path, manifest)
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
    return manifest_info(manifest, json.loads(text))


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], CheckpointInfo]:
    """Verify and load a checkpoint; ``path`` is its payload, its manifest or a directory.

    For a directory, the newest checkpoint that verifies is loaded, with a
    :class:`CheckpointWarning` for each newer one skipped. Size and sha256 are checked
    before ``torch.load(weights_only=True, map_location="cpu")`` reads a byte, and
    the bytes verified are the bytes loaded (one open file). Raises
    :class:`CheckpointError` for a missing, incomplete, corrupt or unsafe checkpoint,
    or a directory without a valid one.
    """
    path = Path(path)
    if path.is_dir():
        for newest, file in verified_newest_first(path):
            with file:
                return deserialize(file, newest), newest
        raise CheckpointError(f"There is no valid checkpoint in {path} to load.")
    manifest = path.with_suffix(".json")
    if not manifest.exists():
        if not path.exists():
            raise CheckpointError(f"Checkpoint {path} does not exist.")
        raise CheckpointError(
            f"Checkpoint payload {path} has no manifest {manifest.name}: it is not a complete "
            "checkpoint (its save was interrupted before the manifest was committed)."
        )
    info = read_manifest(manifest)
    if info is None:
        raise CheckpointError(f"{manifest} is not a statemachine_loop checkpoint manifest.")
    if path != manifest and path != info.path:
        raise CheckpointError(f"Manifest {manifest} describes {info.path.name}, not {path.name}.")
    with open_verified(info) as file:
        return deserialize(file, info), info


def list_checkpoints(directory: str | Path) -> list[CheckpointInfo]:
    """The checkpoints in ``directory`` whose manifest parses, lowest step first.

    Payloads are not verified here (see :func:`latest_valid_checkpoint`); damaged
    manifests and payloads without a manifest are left out. A missing directory has
    no checkpoints.
    """
    return scan(Path(directory))[0]


def latest_valid_checkpoint(directory: str | Path) -> CheckpointInfo | None:
    """The newest checkpoint in ``directory`` whose payload verifies, or None.

    Each newer checkpoint skipped because its payload is missing, truncated or
    corrupted gets a :class:`CheckpointWarning` naming the file and the problem, as
    does each damaged manifest (whose step cannot be read, so it cannot be ordered).
    This is what ``resume="auto"`` needs: fall back, but never silently.
    """
    for info, file in verified_newest_first(Path(directory)):
        file.close()
        return info
    return None


def delete_checkpoint(info: CheckpointInfo) -> None:
    """Delete a checkpoint: manifest first, then payload.

    Removing the commit marker first means a crash half-way leaves an orphan payload,
    never a manifest that vouches for a missing file. Files already gone are fine;
    other failures raise :class:`CheckpointError`.
    """
    _unlink(info.manifest, f"Could not delete checkpoint manifest {info.manifest}")
    _fsync_directory(info.manifest.parent)
    _unlink(info.path, f"Could not delete checkpoint payload {info.path}")


# The write protocol stays in this module, with its own ``os`` and ``_unlink``: the
# fault-injection tests (tests/test_checkpoint_callback.py, tests/kill_target.py) replace
# ``checkpoint_io.os`` and ``checkpoint_io._unlink`` to fail or die at each of its steps.


def _write_temp(target: Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to a fsynced temporary file next to ``target``; remove it on failure."""
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=_TMP_PREFIX, suffix=".partial")
    except OSError as exc:
        what = f"Could not write {target}: creating a temporary file failed"
        raise os_error(what, exc, _UNTOUCHED) from exc
    temp, doing = Path(name), "writing"
    try:
        try:
            if hasattr(os, "fchmod"):  # mkstemp makes files 0o600; give them open()'s mode
                os.fchmod(fd, _default_file_mode())
            # Raw os.write keeps no user-space buffer, so there is nothing to flush.
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            doing = "syncing"
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(exc, OSError):
            what = f"Could not write {target}: {doing} the temporary file {temp.name} failed"
            raise os_error(what, exc, _UNTOUCHED) from exc
        raise
    return temp


def _commit(temps: list[Path], path: Path, manifest: Path) -> None:
    """Move payload then manifest into place, removing the new files if a step fails."""
    directory, committed = path.parent, []
    try:
        if manifest.exists():  # retire the old checkpoint of this name before its payload goes
            _unlink(manifest, f"Could not replace checkpoint {manifest}: removing the old manifest")
            _fsync_directory(directory)
        for temp, target in zip(temps, (path, manifest), strict=True):
            try:
                os.replace(temp, target)
            except OSError as exc:
                raise os_error(f"Could not move {temp.name} into place as {target}", exc) from exc
            committed.append(target)
            _fsync_directory(directory)  # the payload must be durable before its manifest
    except BaseException:
        for target in reversed(committed):  # manifest first, as in delete_checkpoint
            with contextlib.suppress(OSError):
                target.unlink()
        raise


def _fsync_directory(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open a directory; os.replace is as durable as it gets there
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise os_error(f"Could not sync the checkpoint directory {directory}", exc) from exc
    finally:
        os.close(fd)


@functools.cache
def _default_file_mode() -> int:
    """0o666 minus the umask: the mode ``open()`` would have given a new file."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()  # Linux: read the umask without setting it
        return 0o666 & ~int(next(ln for ln in status.splitlines() if ln[:6] == "Umask:")[6:], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _unlink(path: Path, what: str) -> None:
    """Remove ``path`` if it exists, reporting any other failure as a CheckpointError."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise os_error(what, exc) from exc
