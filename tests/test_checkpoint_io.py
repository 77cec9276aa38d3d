"""Tests of ``statemachine_loop.checkpoint_io``: the checkpoint file format and its safety.

Every damage is done for real on files in ``tmp_path`` (truncation, a flipped byte, a
deleted payload, a garbage manifest, a crafted pickle whose checksum matches), and every
failed write is a real failing system call: a read-only directory, or ``os.write`` /
``os.fsync`` patched to fail with ``ENOSPC``. After each, the previous checkpoints must
still load and no temporary file may be left behind.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import pickle
import random
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from statemachine_loop import checkpoint_io
from statemachine_loop.checkpoint_io import (
    CheckpointContentError,
    CheckpointError,
    CheckpointInfo,
    CheckpointWarning,
    delete_checkpoint,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from statemachine_loop.errors import ConfigError, LoopError


def _save(directory: Path, step: int, **extra: Any) -> CheckpointInfo:
    """A small checkpoint ``step-<step>`` whose payload records its own step."""
    payload = {"step": step, "weights": torch.full((3,), float(step)), **extra}
    return save_checkpoint(directory, f"step-{step}", payload, step=step, metadata={"epoch": step})


def _assert_identical(expected: Any, actual: Any, where: str = "payload") -> None:
    """Same types, same structure, tensors and floats equal bit for bit (NaN and -0.0 too)."""
    assert type(actual) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert (actual.dtype, actual.shape, actual.device) == (
            expected.dtype,
            expected.shape,
            expected.device,
        )
        assert actual.requires_grad == expected.requires_grad, where
        raw = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (expected, actual)]
        assert torch.equal(*raw), where
    elif isinstance(expected, float):
        assert struct.pack("<d", actual) == struct.pack("<d", expected), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            _assert_identical(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for index, (e, a) in enumerate(zip(expected, actual, strict=True)):
            _assert_identical(e, a, f"{where}[{index}]")
    else:
        assert actual == expected, where


def _leftovers(directory: Path) -> list[str]:
    """Temporary files left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-"))


def _assert_intact(directory: Path, steps: list[int]) -> None:
    """Exactly the checkpoints ``steps`` exist, each loads with its own payload, no temp files."""
    assert [info.step for info in list_checkpoints(directory)] == steps
    for step in steps:
        payload, info = load_checkpoint(directory / f"step-{step}.pt")
        assert payload["step"] == info.step == step
    assert _leftovers(directory) == []


# --- the format and the round trip ------------------------------------------------------------


def test_round_trip_is_bit_for_bit(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(7)
    torch.rand(5, generator=generator)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "python_rng": random.Random(3).getstate(),
        "tensors": [
            torch.randn(2, 3, dtype=torch.float64),
            torch.randn(4).to(torch.bfloat16),
            torch.tensor([float("nan"), -0.0, float("inf")]),
            torch.arange(6).reshape(2, 3).t(),
            torch.tensor(True),
            torch.nn.Parameter(torch.ones(2)),
        ],
        "scalars": {"int": -(2**70), "float": 0.1, "nan": math.nan, "neg_zero": -0.0, "none": None},
        "flags": [True, False],
        "text": "résumé ✓",
        "nested": {"a": {"b": {"c": [1, [2, {"d": 3}]]}}},
        "shape": torch.Size([2, 3]),
        "dtype": torch.float16,
        "keys": {3: "int", 1.5: "float", True: "bool", None: "none"},
    }
    metadata = {"epoch": 2, "batch": 17, "state": "training", "reason": "every_n_batches"}
    metadata |= {"monitor": {"name": "val_loss", "value": 0.25}, "best": math.inf}
    saved = save_checkpoint(tmp_path, "ckpt", payload, step=41, metadata=metadata)

    loaded, info = load_checkpoint(saved.path)
    _assert_identical(payload, loaded)
    assert info.metadata == metadata
    assert info == saved == list_checkpoints(tmp_path)[0]
    assert (info.path, info.manifest, info.step) == (
        tmp_path / "ckpt.pt",
        tmp_path / "ckpt.json",
        41,
    )
    for source in (info.manifest, tmp_path):  # by manifest and by directory: the same checkpoint
        again, again_info = load_checkpoint(source)
        _assert_identical(payload, again)
        assert again_info == info


def test_manifest_records_format_checksum_and_size(tmp_path: Path) -> None:
    info = save_checkpoint(tmp_path, "a", {"x": torch.ones(2)}, step=5, metadata={"k": [1, "v"]})
    manifest = json.loads(info.manifest.read_text())
    data = info.path.read_bytes()
    assert list(manifest) == [
        "format", "version", "payload", "sha256", "size", "step", "created", "metadata", "torch"
    ]  # fmt: skip
    assert manifest["format"] == "statemachine_loop.checkpoint"
    assert manifest["version"] == 1
    assert manifest["payload"] == "a.pt"
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() == info.sha256
    assert manifest["size"] == len(data) == info.size
    assert (manifest["step"], manifest["metadata"]) == (5, {"k": [1, "v"]})
    assert manifest["created"] == info.created
    assert manifest["torch"] == str(torch.__version__)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.pt"]


def test_files_get_the_mode_open_would_give(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    info = _save(tmp_path, 1)
    for path in (info.path, info.manifest):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=5)
    | st.builds(torch.randn, st.integers(0, 3)),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=3) | st.integers(), children, max_size=3)
    ),
    max_leaves=12,
)


@given(tree=st.dictionaries(st.text(max_size=4), PLAIN, max_size=4), step=st.integers())
def test_any_plain_tree_round_trips(tree: dict[str, Any], step: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, "c", tree, step=step, metadata={})
        loaded, info = load_checkpoint(directory)
        _assert_identical(tree, loaded)
        assert info.step == step


def test_listing_orders_by_step_not_by_name_or_time(tmp_path: Path) -> None:
    for step in (3, 10, 1, 2):
        _save(tmp_path, step)
    (tmp_path / "notes.json").write_text('{"not": "a checkpoint"}')  # not ours: ignored
    (tmp_path / "orphan.pt").write_bytes(b"interrupted save")  # no manifest: not a checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [info.step for info in list_checkpoints(tmp_path)] == [1, 2, 3, 10]
        latest = latest_valid_checkpoint(tmp_path)
    assert latest is not None and latest.step == 10
    assert load_checkpoint(tmp_path)[0]["step"] == 10


def test_reusing_a_name_replaces_that_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "last", {"v": 1}, step=1, metadata={})
    save_checkpoint(tmp_path, "last", {"v": 2}, step=2, metadata={})
    payload, info = load_checkpoint(tmp_path / "last.pt")
    assert (payload, info.step) == ({"v": 2}, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.pt"]


def test_delete_removes_manifest_before_payload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep, doomed = _save(tmp_path, 1), _save(tmp_path, 2)
    removed: list[str] = []
    real_unlink = os.unlink

    def recording_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        removed.append(Path(path).name)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", recording_unlink)
    delete_checkpoint(doomed)
    assert removed == ["step-2.json", "step-2.pt"]
    delete_checkpoint(doomed)  # already gone: fine
    assert list_checkpoints(tmp_path) == [keep]


# --- atomicity --------------------------------------------------------------------------------


def test_nothing_is_visible_under_a_final_name_until_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is fsynced under a temporary name; the payload is in place before the manifest."""
    seen: list[tuple[str, set[str]]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def spying_fsync(fd: int) -> None:
        seen.append(("fsync", {p.name for p in tmp_path.iterdir()}))
        real_fsync(fd)

    def spying_replace(source: Any, target: Any) -> None:
        assert Path(source).parent == Path(target).parent == tmp_path
        assert Path(source).name.startswith(".tmp-")
        seen.append((f"replace {Path(target).name}", {p.name for p in tmp_path.iterdir()}))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", spying_fsync)
    monkeypatch.setattr(os, "replace", spying_replace)
    save_checkpoint(tmp_path, "c", {"x": torch.ones(1000)}, step=1, metadata={})
    monkeypatch.undo()

    kinds = [kind for kind, _ in seen]
    # payload temp, manifest temp, then: replace payload, fsync dir, replace manifest, fsync dir
    assert kinds == ["fsync", "fsync", "replace c.pt", "fsync", "replace c.json", "fsync"]
    for kind, names in seen[:3]:
        assert not names & {"c.pt", "c.json"}, kind  # temps are complete before any final name
    assert "c.json" not in seen[4][1]
    assert _leftovers(tmp_path) == []


def test_directory_fsync_failure_that_means_unsupported_is_tolerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open, real_fsync = os.open, os.fsync
    directory_fds: set[int] = set()

    def open_tracking_directories(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if Path(path).is_dir():
            directory_fds.add(fd)
        return fd

    def fsync_unsupported_on_directories(fd: int) -> None:
        if fd in directory_fds:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real_fsync(fd)

    monkeypatch.setattr(os, "open", open_tracking_directories)
    monkeypatch.setattr(os, "fsync", fsync_unsupported_on_directories)
    _save(tmp_path, 1)
    assert directory_fds
    monkeypatch.undo()
    _assert_intact(tmp_path, [1])


def test_directory_that_cannot_be_opened_is_tolerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on Windows, where a directory cannot be opened for fsync."""
    real_open = os.open

    def no_directories(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path).is_dir():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_directories)
    _save(tmp_path, 1)
    monkeypatch.undo()
    _assert_intact(tmp_path, [1])


# --- failed writes ----------------------------------------------------------------------------


def test_read_only_directory_leaves_previous_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path, 1)
    if os.geteuid() == 0:  # root ignores permissions: simulate what the kernel would say

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(CheckpointError) as caught:
            _save(tmp_path, 2)
    finally:
        os.chmod(tmp_path, 0o700)
        monkeypatch.undo()
    message = str(caught.value)
    assert "step-2.pt" in message and "temporary file" in message
    assert "Permission denied" in message and "EACCES" in message
    assert caught.value.errno == errno.EACCES
    _assert_intact(tmp_path, [1])


def _full_disk_after(budget: int) -> Any:
    """An ``os.write`` that writes ``budget`` bytes in all, then fails with ENOSPC."""
    real_write = os.write
    left = [budget]

    def write(fd: int, data: Any) -> int:
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = real_write(fd, memoryview(data)[: left[0]])
        left[0] -= written
        return written

    return write


@pytest.mark.parametrize("failing", ["payload write", "manifest write", "fsync"])
def test_full_disk_leaves_previous_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    size = (tmp_path / "step-2.pt").stat().st_size
    if failing == "fsync":

        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)
    else:  # half the payload, or the whole payload and half a manifest
        monkeypatch.setattr(
            os, "write", _full_disk_after(size // 2 if "payload" in failing else size + 50)
        )
    with pytest.raises(CheckpointError) as caught:
        _save(tmp_path, 3)
    monkeypatch.undo()
    message = str(caught.value)
    target = "step-3.json" if failing == "manifest write" else "step-3.pt"
    assert target in message
    assert "No space left on device" in message and "ENOSPC" in message
    assert ("syncing" if failing == "fsync" else "writing") in message
    assert "Existing checkpoints were not modified" in message
    assert caught.value.errno == errno.ENOSPC
    assert isinstance(caught.value, OSError) and isinstance(caught.value, LoopError)
    _assert_intact(tmp_path, [1, 2])
    assert not (tmp_path / "step-3.pt").exists()


def test_full_disk_while_replacing_a_name_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, "last", {"v": 1}, step=1, metadata={})
    monkeypatch.setattr(os, "write", _full_disk_after(10))
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tmp_path, "last", {"v": 2}, step=2, metadata={})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")[0] == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_failed_rename_removes_the_new_payload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the manifest cannot be moved into place, the new payload is not left as an orphan."""
    _save(tmp_path, 1)
    real_replace = os.replace

    def replace(source: Any, target: Any) -> None:
        if str(target).endswith(".json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match=r"step-2\.json: Input/output error \(EIO\)"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1.json", "step-1.pt"]


# --- damaged checkpoints ----------------------------------------------------------------------


def _truncate(info: CheckpointInfo) -> str:
    info.path.write_bytes(info.path.read_bytes()[: info.size // 2])
    return "is truncated"


def _flip_a_byte(info: CheckpointInfo) -> str:
    data = bytearray(info.path.read_bytes())
    data[len(data) // 2] ^= 0x01
    info.path.write_bytes(bytes(data))
    return "is corrupted: its sha256"


def _delete_payload(info: CheckpointInfo) -> str:
    info.path.unlink()
    return "is missing"


def _garbage_manifest(info: CheckpointInfo) -> str:
    info.manifest.write_bytes(b"\x00\xffgarbage{")
    return "is damaged"


def _truncate_manifest(info: CheckpointInfo) -> str:
    info.manifest.write_text(info.manifest.read_text()[:40])
    return "is damaged"


DAMAGES = [_truncate, _flip_a_byte, _delete_payload, _garbage_manifest, _truncate_manifest]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_newest_falls_back_with_a_warning(tmp_path: Path, damage: Any) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    problem = damage(_save(tmp_path, 3))

    with pytest.warns(CheckpointWarning) as caught:
        latest = latest_valid_checkpoint(tmp_path)
    assert latest is not None and latest.step == 2
    assert len(caught) == 1
    assert "step-3" in str(caught[0].message) and problem in str(caught[0].message)

    with pytest.warns(CheckpointWarning, match=problem):
        payload, info = load_checkpoint(tmp_path)
    assert payload["step"] == info.step == 2

    for direct in (tmp_path / "step-3.pt", tmp_path / "step-3.json"):
        with pytest.raises(CheckpointError, match=problem) as raised:
            load_checkpoint(direct)
        assert "step-3" in str(raised.value)


def test_mismatch_messages_name_the_file_and_the_numbers(tmp_path: Path) -> None:
    info = _save(tmp_path, 1)
    _truncate(info)
    with pytest.raises(CheckpointError) as truncated:
        load_checkpoint(info.path)
    assert f"{info.path} is truncated: it has {info.size // 2} bytes" in str(truncated.value)
    assert f"records {info.size}" in str(truncated.value)
    info = _save(tmp_path, 1)
    _flip_a_byte(info)
    with pytest.raises(CheckpointError) as flipped:
        load_checkpoint(info.manifest)
    assert str(info.path) in str(flipped.value) and info.sha256 in str(flipped.value)


def test_every_skipped_checkpoint_warns_and_none_valid_means_none(tmp_path: Path) -> None:
    _truncate(_save(tmp_path, 1))
    _flip_a_byte(_save(tmp_path, 2))
    with pytest.warns(CheckpointWarning) as caught:
        assert latest_valid_checkpoint(tmp_path) is None
    assert [("step-2" in str(w.message), "step-1" in str(w.message)) for w in caught] == [
        (True, False),
        (False, True),
    ]
    with (
        pytest.warns(CheckpointWarning),
        pytest.raises(CheckpointError, match="no valid checkpoint"),
    ):
        load_checkpoint(tmp_path)


def test_empty_or_missing_directory_has_no_checkpoint(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_valid_checkpoint(tmp_path) is None
        assert latest_valid_checkpoint(tmp_path / "absent") is None
        assert list_checkpoints(tmp_path / "absent") == []
    with pytest.raises(CheckpointError, match=f"no valid checkpoint in {tmp_path}"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_payload_without_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"x": 1}, tmp_path / "half.pt")
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(CheckpointError, match=r"has no manifest half\.json"):
        load_checkpoint(tmp_path / "half.pt")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"version": 2}, "format version 2, but this statemachine_loop reads only version 1"),
        ({"format": "someone.else"}, "unknown format 'someone.else'"),
        ({"payload": "../outside.pt"}, "'payload' is not a plain file name"),
        ({"sha256": "abc"}, "'sha256' is not 64 hex digits"),
        ({"step": "7"}, "'step' is not an int"),
        ({"size": -1}, "'size' is not a non-negative int"),
    ],
)
def test_unknown_or_invalid_manifest_is_refused(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    _save(tmp_path, 1)
    info = _save(tmp_path, 2)
    info.manifest.write_text(json.dumps(json.loads(info.manifest.read_text()) | change))
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(")):
        load_checkpoint(info.manifest)
    assert [i.step for i in list_checkpoints(tmp_path)] == [1]
    with pytest.warns(CheckpointWarning, match=r"step-2\.json"):
        latest = latest_valid_checkpoint(tmp_path)
    assert latest is not None and latest.step == 1


# --- loading never runs code ------------------------------------------------------------------


class _RunsShell:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _RunsPython:
    """Unpickling this runs Python code that writes a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _crafted(kind: str, marker: Path) -> bytes:
    """Payload bytes that would run code under a plain ``torch.load``."""
    if kind == "raw pickle":
        return pickle.dumps({"weights": _RunsPython(marker)}, protocol=2)
    buffer = io.BytesIO()
    evil = _RunsShell(marker) if kind == "torch.save + os.system" else _RunsPython(marker)
    torch.save({"weights": torch.ones(2), "evil": evil}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["torch.save + os.system", "torch.save + exec", "raw pickle"])
def test_crafted_pickle_with_a_valid_checksum_is_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_RunsPython(marker)))  # the payload really would run...
    assert marker.exists()
    marker.unlink()  # ...so start clean

    data = _crafted(kind, marker)
    (tmp_path / "evil.pt").write_bytes(data)
    manifest = {"format": "statemachine_loop.checkpoint", "version": 1, "payload": "evil.pt"}
    manifest |= {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "step": 9}
    manifest |= {"created": 0.0, "metadata": {}, "torch": str(torch.__version__)}
    (tmp_path / "evil.json").write_text(json.dumps(manifest))

    latest = latest_valid_checkpoint(tmp_path)  # the checksum matches: only weights_only protects
    assert latest is not None and latest.step == 9
    for source in (tmp_path / "evil.pt", tmp_path / "evil.json", tmp_path):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            with pytest.raises(CheckpointError) as caught:
                load_checkpoint(source)
        message = str(caught.value)
        assert message.startswith(f"Refused to load {tmp_path / 'evil.pt'}: it contains Python")
        assert "checkpoints are loaded with weights_only=True" in message
        assert "Weights only load failed" not in message  # torch's generic advice is dropped
    assert not marker.exists()


# --- what cannot be saved ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        (
            {"rng": ("MT19937", np.zeros(3, dtype=np.uint32))},
            r"payload\['rng'\]\[1\] is a numpy.ndarray",
        ),
        ({"lr": np.float64(0.1)}, r"payload\['lr'\] is a numpy.float64"),
        ({"blob": b"bytes"}, r"payload\['blob'\] is a bytes"),
        ({"seen": {1, 2}}, r"payload\['seen'\] is a set"),
        (
            {"module": torch.nn.Linear(1, 1)},
            r"payload\['module'\] is a torch.nn.modules.linear.Linear",
        ),
        ({"f": len}, r"payload\['f'\] is a builtin_function_or_method"),
        ({(1, 2): 0}, r"payload has the key \(1, 2\) of type tuple"),
    ],
)
def test_payload_that_weights_only_would_refuse_is_not_written(
    tmp_path: Path, payload: dict[str, Any], where: str
) -> None:
    with pytest.raises(CheckpointContentError, match=where) as caught:
        save_checkpoint(tmp_path / "run", "c", payload, step=1, metadata={})
    assert "weights_only=True" in str(caught.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("metadata", "where"),
    [
        ({"monitor": object()}, r"metadata\['monitor'\] is a object, which cannot be stored"),
        ({"pair": (1, 2)}, r"metadata\['pair'\] is a tuple"),
        ({"loss": torch.tensor(0.5)}, r"metadata\['loss'\] is a torch.Tensor"),
        ({"nested": {"x": [1, np.int64(3)]}}, r"metadata\['nested'\]\['x'\]\[1\] is a numpy.int64"),
        ({"by_epoch": {1: 0.5}}, r"metadata\['by_epoch'\] has the key 1 of type int"),
    ],
)
def test_metadata_that_is_not_json_is_refused_before_writing(
    tmp_path: Path, metadata: dict[str, Any], where: str
) -> None:
    with pytest.raises(CheckpointContentError, match=where) as caught:
        save_checkpoint(tmp_path / "run", "c", {"x": 1}, step=1, metadata=metadata)
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, CheckpointError)
    assert "stored as JSON" in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_other_bad_arguments_are_refused_before_writing(tmp_path: Path) -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(CheckpointContentError, match="payload must be a dict, got a list"):
        save_checkpoint(tmp_path, "c", [1], step=1, metadata={})  # type: ignore[arg-type]
    with pytest.raises(CheckpointContentError, match=r"payload\['loop'\]\[0\] contains itself"):
        save_checkpoint(tmp_path, "c", {"loop": cycle}, step=1, metadata={})
    with pytest.raises(CheckpointContentError, match="step must be an int, got True"):
        save_checkpoint(tmp_path, "c", {}, step=True, metadata={})
    for name in ("", ".hidden", "a/b", "../up", "x" * 251):
        with pytest.raises(ConfigError, match="plain file name"):
            save_checkpoint(tmp_path, name, {}, step=1, metadata={})
    assert list(tmp_path.iterdir()) == []


def test_error_classes() -> None:
    assert issubclass(CheckpointError, LoopError) and issubclass(CheckpointError, OSError)
    assert issubclass(CheckpointContentError, CheckpointError)
    assert issubclass(CheckpointContentError, TypeError)
    assert issubclass(CheckpointWarning, UserWarning)
    assert sorted(checkpoint_io.__all__) == checkpoint_io.__all__
