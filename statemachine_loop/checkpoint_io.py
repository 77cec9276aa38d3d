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
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import torch

from statemachine_loop.errors import ConfigError, LoopError

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

FORMAT = "statemachine_loop.checkpoint"
VERSION = 1
_TMP_PREFIX = ".tmp-"
_UNTOUCHED = " Existing checkpoints were not modified."
_SHA256 = re.compile(r"[0-9a-f]{64}")
# errnos with which a directory fsync means "not supported here" rather than "failed".
_NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}
_SCALARS: tuple[type, ...] = (type(None), bool, int, float, str)
_PAYLOAD_RULE = (
    "payloads are loaded with weights_only=True, so they hold only tensors, int, float, bool, "
    "str, None, torch.dtype, and lists, tuples and dicts of them. Convert it first (numpy "
    "arrays with torch.from_numpy, numpy scalars with .item(), bytes to a uint8 tensor)"
)
_METADATA_RULE = (
    "metadata is stored as JSON, so it holds only str, int, float, bool, None, lists, and "
    "dicts with str keys. Convert it first (tuples to lists, tensors and numpy values with "
    ".item() or .tolist())"
)
# Manifest fields a reader relies on: name, what a bad value is not, and the check.
_FIELDS: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    ("payload", "not a plain file name", lambda v: isinstance(v, str) and _plain_name(v)),
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


class CheckpointContentError(CheckpointError, TypeError):
    """The payload or metadata given to :func:`save_checkpoint` cannot be stored.

    Raised before anything is written; the message names the offending entry (for
    example ``payload['rng']['numpy'][1]``), its type, and how to convert it.
    """


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is corrupt, truncated or unreadable."""


@attrs.frozen
class CheckpointInfo:
    """What a manifest says about one checkpoint.

    ``step`` is the caller's monotonically increasing global step and orders
    checkpoints; ``metadata`` is the caller's JSON dict (epoch, batch, reason,
    monitor value...). ``size`` and ``sha256`` describe the payload file: they are
    what loading verifies it against.
    """

    path: Path
    manifest: Path
    step: int
    created: float
    metadata: dict[str, Any] = attrs.field(hash=False)
    size: int
    sha256: str


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
    if not isinstance(name, str) or not _plain_name(name):
        raise ConfigError(
            f"Checkpoint name {name!r} is not a plain file name: it needs no directory part, "
            "no leading dot, and at most 250 bytes."
        )
    if type(step) is not int:
        raise CheckpointContentError(f"step must be an int, got {step!r}.")
    _check_tree(payload, "payload", _PAYLOAD_RULE, set())
    _check_tree(metadata, "metadata", _METADATA_RULE, set())
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
        raise _os_error(what, exc, _UNTOUCHED) from exc
    temps = [_write_temp(path, data)]
    try:
        temps.append(_write_temp(manifest, text.encode("utf-8")))
        _commit(temps, path, manifest)
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
    return _manifest_info(manifest, json.loads(text))


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
        for newest, file in _verified_newest_first(path):
            with file:
                return _deserialize(file, newest), newest
        raise CheckpointError(f"There is no valid checkpoint in {path} to load.")
    manifest = path.with_suffix(".json")
    if not manifest.exists():
        if not path.exists():
            raise CheckpointError(f"Checkpoint {path} does not exist.")
        raise CheckpointError(
            f"Checkpoint payload {path} has no manifest {manifest.name}: it is not a complete "
            "checkpoint (its save was interrupted before the manifest was committed)."
        )
    info = _read_manifest(manifest)
    if info is None:
        raise CheckpointError(f"{manifest} is not a statemachine_loop checkpoint manifest.")
    if path != manifest and path != info.path:
        raise CheckpointError(f"Manifest {manifest} describes {info.path.name}, not {path.name}.")
    with _open_verified(info) as file:
        return _deserialize(file, info), info


def list_checkpoints(directory: str | Path) -> list[CheckpointInfo]:
    """The checkpoints in ``directory`` whose manifest parses, lowest step first.

    Payloads are not verified here (see :func:`latest_valid_checkpoint`); damaged
    manifests and payloads without a manifest are left out. A missing directory has
    no checkpoints.
    """
    return _scan(Path(directory))[0]


def latest_valid_checkpoint(directory: str | Path) -> CheckpointInfo | None:
    """The newest checkpoint in ``directory`` whose payload verifies, or None.

    Each newer checkpoint skipped because its payload is missing, truncated or
    corrupted gets a :class:`CheckpointWarning` naming the file and the problem, as
    does each damaged manifest (whose step cannot be read, so it cannot be ordered).
    This is what ``resume="auto"`` needs: fall back, but never silently.
    """
    for info, file in _verified_newest_first(Path(directory)):
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


def _plain_name(name: str) -> bool:
    """Whether ``name`` is a bare, visible file name with room for a suffix."""
    separators = {"/", "\\", "\0", os.sep, os.altsep or "/"}
    return (
        bool(name) and name[0] != "." and not separators & set(name) and len(name.encode()) <= 250
    )


def _check_tree(value: Any, where: str, rule: str, active: set[int]) -> None:
    """Raise CheckpointContentError at the first entry of ``value`` that ``rule`` forbids."""
    kind, is_payload = type(value), rule is _PAYLOAD_RULE
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
        _check_tree(item, f"{where}[{key!r}]", rule, active)
    active.discard(id(value))


def _write_temp(target: Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to a fsynced temporary file next to ``target``; remove it on failure."""
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=_TMP_PREFIX, suffix=".partial")
    except OSError as exc:
        what = f"Could not write {target}: creating a temporary file failed"
        raise _os_error(what, exc, _UNTOUCHED) from exc
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
            raise _os_error(what, exc, _UNTOUCHED) from exc
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
                raise _os_error(f"Could not move {temp.name} into place as {target}", exc) from exc
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
            raise _os_error(f"Could not sync the checkpoint directory {directory}", exc) from exc
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
        raise _os_error(what, exc) from exc


def _os_error(what: str, exc: OSError, tail: str = "") -> CheckpointError:
    """A CheckpointError saying what failed and why, carrying the OS error's errno."""
    code = errno.errorcode.get(exc.errno or 0)
    error = CheckpointError(f"{what}: {exc.strerror or exc}{f' ({code})' if code else ''}.{tail}")
    error.errno = exc.errno
    return error


def _read_manifest(manifest: Path) -> CheckpointInfo | None:
    """Parse a manifest; None for a JSON file that is not a checkpoint manifest at all."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _os_error(f"Could not read checkpoint manifest {manifest}", exc) from exc
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
    return _manifest_info(manifest, data)


def _manifest_info(manifest: Path, data: dict[str, Any]) -> CheckpointInfo:
    """The CheckpointInfo of a manifest already known to be valid."""
    path = manifest.parent / data["payload"]
    step, created, metadata = data["step"], float(data["created"]), data["metadata"]
    return CheckpointInfo(path, manifest, step, created, metadata, data["size"], data["sha256"])


def _scan(directory: Path) -> tuple[list[CheckpointInfo], list[str]]:
    """Every parseable manifest in ``directory`` by step, and the damaged ones' errors."""
    if not directory.exists():
        return [], []
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise _os_error(f"Could not list the checkpoint directory {directory}", exc) from exc
    infos, problems = [], []
    for entry in entries:
        if entry.suffix != ".json" or entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            info = _read_manifest(entry)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if info is not None:
            infos.append(info)
    infos.sort(key=lambda info: (info.step, info.created, info.manifest.name))
    return infos, problems


def _verified_newest_first(directory: Path) -> Iterator[tuple[CheckpointInfo, BinaryIO]]:
    """(info, open payload) of each checkpoint that verifies, newest first; warns on the rest."""
    infos, problems = _scan(directory)
    for problem in problems:
        warnings.warn(f"{problem} Skipping it.", CheckpointWarning, stacklevel=3)
    for info in reversed(infos):
        try:
            file = _open_verified(info)
        except CheckpointError as exc:
            message = f"Skipping checkpoint {info.manifest.name} (step {info.step}): {exc}"
            warnings.warn(message, CheckpointWarning, stacklevel=3)
            continue
        yield info, file


def _open_verified(info: CheckpointInfo) -> BinaryIO:
    """Open the payload and check its size and sha256; the file is returned at offset 0."""
    try:
        file = open(info.path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except FileNotFoundError:
        raise CheckpointError(
            f"Checkpoint payload {info.path} is missing, though its manifest exists."
        ) from None
    except OSError as exc:
        raise _os_error(f"Could not open checkpoint payload {info.path}", exc) from exc
    try:
        size = os.fstat(file.fileno()).st_size
        if size != info.size:
            state = "truncated" if size < info.size else "longer than its manifest records"
            raise CheckpointError(
                f"Checkpoint payload {info.path} is {state}: it has {size} bytes, its manifest "
                f"{info.manifest.name} records {info.size}."
            )
        digest = hashlib.file_digest(file, "sha256").hexdigest()
        if digest != info.sha256:
            raise CheckpointError(
                f"Checkpoint payload {info.path} is corrupted: its sha256 is {digest}, its "
                f"manifest {info.manifest.name} records {info.sha256}."
            )
        file.seek(0)
    except BaseException as exc:
        file.close()
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise _os_error(f"Could not read checkpoint payload {info.path}", exc) from exc
        raise
    return file


def _deserialize(file: BinaryIO, info: CheckpointInfo) -> dict[str, Any]:
    """``torch.load`` with weights_only=True, turning its refusals into clear errors."""
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"Refused to load {info.path}: it contains Python objects other than tensors and "
            "plain data; checkpoints are loaded with weights_only=True, so loading never runs "
            f"code. torch says: {_torch_reason(str(exc))}"
        ) from None
    except Exception as exc:  # a checksum-valid file torch cannot parse was made by hand
        raise CheckpointError(
            f"Could not deserialize checkpoint payload {info.path}: {exc}"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"Checkpoint payload {info.path} holds a {type(payload).__name__}.")
    return payload


def _torch_reason(message: str) -> str:
    """The specific part of torch's weights_only message, without its generic advice."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message).replace("WeightsUnpickler error:", "")
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation", "(")
    kept = [
        ln.strip()
        for ln in message.splitlines()
        if ln.strip() and not ln.strip().startswith(generic)
    ]
    return " ".join(kept) or "the unpickler refused it."
