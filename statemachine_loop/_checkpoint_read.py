"""Finding and verifying checkpoints before anything is deserialized.

This module owns the reading side of :mod:`statemachine_loop.checkpoint_io`: scanning a
directory's manifests, opening a payload and checking its size and sha256 (the bytes
verified are the bytes loaded: one open file), skipping damaged checkpoints with a
:class:`~statemachine_loop.checkpoint_io.CheckpointWarning`, and
``torch.load(weights_only=True, map_location="cpu")`` with its refusals turned into
clear errors. It builds on ``statemachine_loop._checkpoint_format`` and is imported
only by :mod:`statemachine_loop.checkpoint_io`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from statemachine_loop._checkpoint_format import (
    CheckpointError,
    CheckpointInfo,
    CheckpointWarning,
    os_error,
    read_manifest,
)


def scan(directory: Path) -> tuple[list[CheckpointInfo], list[str]]:
    """Every parseable manifest in ``directory`` by step, and the damaged ones' errors."""
    if not directory.exists():
        return [], []
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise os_error(f"Could not list the checkpoint directory {directory}", exc) from exc
    infos, problems = [], []
    for entry in entries:
        if entry.suffix != ".json" or entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            info = read_manifest(entry)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if info is not None:
            infos.append(info)
    infos.sort(key=lambda info: (info.step, info.created, info.manifest.name))
    return infos, problems


def verified_newest_first(directory: Path) -> Iterator[tuple[CheckpointInfo, BinaryIO]]:
    """(info, open payload) of each checkpoint that verifies, newest first; warns on the rest."""
    infos, problems = scan(directory)
    # stacklevel=3: past this generator and the checkpoint_io function iterating it, to
    # the caller of load_checkpoint or latest_valid_checkpoint.
    for problem in problems:
        warnings.warn(f"{problem} Skipping it.", CheckpointWarning, stacklevel=3)
    for info in reversed(infos):
        try:
            file = open_verified(info)
        except CheckpointError as exc:
            message = f"Skipping checkpoint {info.manifest.name} (step {info.step}): {exc}"
            warnings.warn(message, CheckpointWarning, stacklevel=3)
            continue
        yield info, file


def open_verified(info: CheckpointInfo) -> BinaryIO:
    """Open the payload and check its size and sha256; the file is returned at offset 0."""
    try:
        file = open(info.path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except FileNotFoundError:
        raise CheckpointError(
            f"Checkpoint payload {info.path} is missing, though its manifest exists."
        ) from None
    except OSError as exc:
        raise os_error(f"Could not open checkpoint payload {info.path}", exc) from exc
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
            raise os_error(f"Could not read checkpoint payload {info.path}", exc) from exc
        raise
    return file


def deserialize(file: BinaryIO, info: CheckpointInfo) -> dict[str, Any]:
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
