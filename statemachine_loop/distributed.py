"""One lifecycle across ``torch.distributed`` ranks: agreed decisions, global metrics.

Under ``torchrun`` every rank runs the same script and the same loop. The classic
failure of training loops is a decision taken on one rank only — early stopping, a
skipped NaN batch — after which the ranks fire different events and hang in the
next collective. Here every proposal that can carry a decision is agreed before
the machine moves (:meth:`Collective.agree`): one tiny ``MAX`` all-reduce says
whether any rank decided anything, and only then are the decisions themselves
gathered, so every rank resolves the same union by the same precedence and takes
the same event. Proposals that no callback hooks cost nothing.

:func:`join_process_group` finds an initialised process group, or initialises one
from the ``torchrun`` environment. :func:`distribute_data` gives each rank its
shard through a ``DistributedSampler``; :meth:`Collective.global_metrics` sums the
metric accumulators of all ranks so every rank reports the global values.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import attrs
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from statemachine_loop.errors import ConfigError
from statemachine_loop.metrics import Metric

__all__ = [
    "Collective",
    "check_same_hooks",
    "distribute_data",
    "join_process_group",
    "set_sampler_epoch",
    "wrap_model",
]

_T = TypeVar("_T")


@attrs.define
class Collective:
    """The loop's view of the process group: its rank, its size, and the few collectives."""

    rank: int
    world_size: int
    device: torch.device  # where collective tensors live (CUDA for nccl)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs and checkpoints."""
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (one tiny all-reduce)."""
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, item: _T) -> list[_T]:
        """Every rank's ``item``, in rank order (pickled: for rare, small objects)."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, item)
        return gathered

    def agree(self, local: Sequence[tuple[str, _T]]) -> list[tuple[str, _T, int]]:
        """The union of every rank's ``(callback name, decision)``, tagged with the rank.

        Costs one all-reduce when no rank decided anything, and a gather otherwise.
        The result is the same on every rank, in rank order then callback order.
        """
        if not self.any(bool(local)):
            return []
        return [
            (name, decision, rank)
            for rank, items in enumerate(self.gather(list(local)))
            for name, decision in items
        ]

    def global_metrics(self, metrics: Sequence[Metric]) -> dict[str, float]:
        """Each metric computed over every rank's batches: accumulators summed, then read."""
        states = [getattr(metric, "state_dict", None) for metric in metrics]
        local: list[dict[str, Any] | None] = [None if s is None else s() for s in states]
        everyone = self.gather(local)
        values: dict[str, float] = {}
        for index, metric in enumerate(metrics):
            if local[index] is None:
                warnings.warn(
                    f"Metric {metric.name!r} has no state_dict(), so it cannot be summed "
                    "across ranks; its value is this rank's alone.",
                    stacklevel=3,
                )
                values[metric.name] = metric.compute()
                continue
            merged = _sum_states([states_of_rank[index] for states_of_rank in everyone])
            summed = copy.deepcopy(metric)  # holds only folded accumulators: small
            summed.load_state_dict(merged)  # type: ignore[attr-defined]
            values[metric.name] = summed.compute()
        return values


def _sum_states(states: list[dict[str, Any] | None]) -> dict[str, Any]:
    present = [s for s in states if s is not None and s["total"] is not None]
    if not present:
        return {**next(s for s in states if s is not None), "total": None, "samples": 0}
    merged = dict(present[0])
    merged["total"] = sum((s["total"].cpu() for s in present[1:]), present[0]["total"].cpu())
    merged["samples"] = sum(int(s["samples"]) for s in present)
    return merged


def join_process_group(device: torch.device) -> Collective | None:
    """The process group this fit runs in, or ``None`` for a single process.

    Uses an initialised default group; otherwise initialises one from the
    ``torchrun`` environment (``WORLD_SIZE`` > 1 with ``RANK`` and ``MASTER_ADDR``),
    with nccl for CUDA devices and gloo for the CPU. The group is looked for at every
    fit; the environment is read once per process (see :func:`_launched_by_torchrun`).
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not _launched_by_torchrun():
            return None
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() <= 1:
        return None
    backend = dist.get_backend()
    collective_device = device if backend == "nccl" else torch.device("cpu")
    return Collective(dist.get_rank(), dist.get_world_size(), collective_device)


#: ``(process id, answer)`` of :func:`_launched_by_torchrun`, once read.
_torchrun_environment: tuple[int, bool] | None = None


def _launched_by_torchrun() -> bool:
    """Whether ``torchrun``'s environment names a world of several processes.

    Read once per process, since ``torchrun`` sets it before the process starts (a
    forked child, with another process id, reads it again). Variables set later in the
    same process are not seen; call ``torch.distributed.init_process_group`` instead,
    which every fit notices.
    """
    global _torchrun_environment
    pid = os.getpid()
    if _torchrun_environment is None or _torchrun_environment[0] != pid:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        found = world > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ
        _torchrun_environment = (pid, found)
    return _torchrun_environment[1]


def check_same_hooks(signature: Sequence[object], collective: Collective) -> None:
    """Refuse a fit whose ranks hook different events: they would wait on each other forever.

    ``signature`` says which events this rank's callbacks hook and how
    (``HookMap.signature``); every rank must give the same.
    """
    if any(other != signature for other in collective.gather(list(signature))):
        raise ConfigError(
            "Ranks were given different callbacks (their hooks differ), so they would "
            "wait on each other forever; pass the same callbacks on every rank (the "
            "built-in writers already write on rank 0 only)."
        )


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in a ``DistributedDataParallel`` wrapper, unless it already is one."""
    if isinstance(model, DistributedDataParallel):
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def distribute_data(data: Iterable[_T], collective: Collective, *, name: str) -> Iterable[_T]:
    """``data`` with each rank reading its own shard through a ``DistributedSampler``.

    A ``DataLoader`` that already has a ``DistributedSampler`` is used as it is; a
    map-style one is rebuilt around one (shuffled when the original shuffled).
    Other iterables must already be sharded by the user: they pass through.
    """
    if not isinstance(data, DataLoader) or isinstance(data.sampler, DistributedSampler):
        return data
    if isinstance(data.dataset, IterableDataset):
        raise ConfigError(
            f"{name} is a DataLoader over an IterableDataset, which the loop cannot "
            "shard; shard it per rank yourself (torch.distributed.get_rank())."
        )
    if data.batch_sampler is None or not hasattr(data.batch_sampler, "batch_size"):
        raise ConfigError(
            f"{name} uses a custom batch sampler; give it a DistributedSampler yourself."
        )
    sampler: DistributedSampler[Any] = DistributedSampler(
        data.dataset,
        num_replicas=collective.world_size,
        rank=collective.rank,
        shuffle=isinstance(data.sampler, RandomSampler),
    )
    from statemachine_loop.resume import loader_options

    return DataLoader(
        data.dataset,
        batch_size=data.batch_sampler.batch_size,
        drop_last=data.drop_last,
        sampler=sampler,
        **loader_options(data),
    )


def set_sampler_epoch(data: object, epoch: int) -> None:
    """Call ``set_epoch`` on a distributed sampler, so each epoch shuffles differently."""
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
