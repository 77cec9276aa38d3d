"""What exact resume needs beyond model and optimizer: random state and data order.

A resumed run must see the same batches in the same order and draw the same random
numbers as the run it continues. Two snapshots make that possible:

* at every phase start, *before* the data iterator is created, the loop keeps a
  :func:`phase_start_rng` snapshot (the global torch generator and the data's own
  generators): the iterator's creation and the sampler's shuffle draw from them;
* at the checkpoint, :func:`capture_rng` keeps every generator (Python, NumPy, torch
  CPU and CUDA) as they are at that batch boundary.

:func:`resumed_data` then rebuilds the phase's ``DataLoader`` around a batch sampler
that skips the first ``k`` index batches — at the sampler, so no batch is loaded and
discarded — and restores the checkpoint's generators right after the skip, which is
exactly when the interrupted run had reached that state. Where that cannot be exact,
it says so (:class:`InexactResumeWarning`).
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

__all__ = [
    "InexactResumeWarning",
    "capture_rng",
    "data_rng",
    "loader_options",
    "phase_start_rng",
    "restore_data_rng",
    "restore_phase_start_rng",
    "restore_rng",
    "resumed_data",
]


class InexactResumeWarning(UserWarning):
    """A resume that cannot reproduce the interrupted run bit for bit, and why."""


def capture_rng() -> dict[str, Any]:
    """Every global random generator's state, as plain data and tensors."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state["numpy"] = {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put every global generator back as :func:`capture_rng` found it."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        saved = state["numpy"]
        np.random.set_state(
            (
                saved["name"],
                saved["keys"].numpy().astype(np.uint32),
                saved["pos"],
                saved["has_gauss"],
                saved["cached"],
            )
        )


def _generators(data: object) -> list[torch.Generator]:
    found: list[torch.Generator] = []
    if isinstance(data, DataLoader):
        samplers = [data.sampler, getattr(data.batch_sampler, "sampler", None)]
        candidates = [data.generator, *(getattr(s, "generator", None) for s in samplers)]
        for generator in candidates:
            # ``is not None`` first: torch.Generator's isinstance check runs in Python.
            if (
                generator is not None
                and isinstance(generator, torch.Generator)
                and all(generator is not g for g in found)
            ):
                found.append(generator)
    return found


def phase_start_rng(data: object) -> dict[str, Any]:
    """The generators a phase's data iterator draws from, before it is created."""
    return {
        "torch": torch.get_rng_state(),
        "generators": [generator.get_state() for generator in _generators(data)],
    }


def data_rng(datas: Sequence[object]) -> list[list[torch.Tensor]]:
    """The current state of every data set's own generators (for a checkpoint)."""
    return [[generator.get_state() for generator in _generators(data)] for data in datas]


def restore_data_rng(datas: Sequence[object], states: list[list[torch.Tensor]]) -> None:
    """Put the data sets' generators back as :func:`data_rng` found them."""
    for data, saved in zip(datas, states, strict=True):
        for generator, state in zip(_generators(data), saved, strict=True):
            generator.set_state(state)


def restore_phase_start_rng(data: object, state: dict[str, Any]) -> None:
    """Rewind the data's generators to the phase start, before re-creating its iterator."""
    generators = _generators(data)
    if len(generators) != len(state["generators"]):
        raise ValueError(
            f"the data now has {len(generators)} random generator(s) but the checkpoint "
            f"saved {len(state['generators'])}; resume with the same data loader setup."
        )
    torch.set_rng_state(state["torch"])
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved)


class _SkipThenRestore(Sampler[Any]):
    """Yields the wrapped iterable's items after the first ``skip``; then restores the RNG.

    It wraps a sampler (skipping index batches, nothing loaded) or, for data that has
    no sampler, the data itself (skipped batches are loaded and discarded).
    ``__iter__`` is a generator, so nothing is drawn until the first item is asked
    for — the moment the interrupted run drew its shuffle too.
    """

    def __init__(self, inner: Iterable[Any], skip: int, after_skip: Callable[[], None]) -> None:
        self._inner = inner
        self._skip = skip
        self._after_skip = after_skip

    def __len__(self) -> int:
        return max(0, len(self._inner) - self._skip)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        items = iter(self._inner)
        for _ in itertools.islice(items, self._skip):
            pass
        self._after_skip()
        yield from items


def resumed_data(data: Iterable[Any], skip: int, after_skip: Callable[[], None]) -> Iterable[Any]:
    """The phase's data from batch ``skip`` on, calling ``after_skip`` once skipped.

    A map-style ``DataLoader`` is rebuilt around a sampler that skips index batches,
    so no skipped batch is loaded; a sequence is sliced. Anything else (an iterable
    dataset, a generator) can only be iterated and discarded, with a warning.
    """
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        if data.num_workers > 0:
            warnings.warn(
                "Resuming mid-epoch with num_workers > 0: worker processes restart with "
                "fresh random state, so random augmentations inside the dataset differ "
                "from the interrupted run (batch order and everything else is exact).",
                InexactResumeWarning,
                stacklevel=3,
            )
        return _rebuild(data, skip, after_skip)
    if isinstance(data, Sequence):
        after_skip()
        return data[skip:]
    warnings.warn(
        f"Resuming mid-epoch on a {type(data).__name__} that cannot skip at the sampler: "
        f"its first {skip} batches are loaded and discarded, and the result is exact only "
        "if iterating it is deterministic.",
        InexactResumeWarning,
        stacklevel=3,
    )
    return _SkipThenRestore(data, skip, after_skip)


def loader_options(loader: DataLoader[Any]) -> dict[str, Any]:
    """Everything but dataset and sampling that builds a ``DataLoader`` like ``loader``."""
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
        "in_order": loader.in_order,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return options


def _rebuild(loader: DataLoader[Any], skip: int, after_skip: Callable[[], None]) -> DataLoader[Any]:
    options = loader_options(loader)
    if loader.batch_sampler is not None:
        batches = _SkipThenRestore(loader.batch_sampler, skip, after_skip)
        return DataLoader(loader.dataset, batch_sampler=batches, **options)
    samples = _SkipThenRestore(loader.sampler, skip, after_skip)
    return DataLoader(loader.dataset, batch_size=None, sampler=samples, **options)
