"""Two gloo ranks on the CPU run one lifecycle: same events, same decisions, same results.

Starting two Python processes with torch costs seconds each on a loaded machine, so
one launch serves every two-rank test: the module-scoped ``two_ranks`` fixture starts
``ddp_worker.py`` twice, with the environment ``torchrun`` would set, and the workers
run every scenario in one process group (the error scenarios in the middle, so the
ones after them also show that both ranks came out of the error in step). The launch
has a hard timeout: a hang is a failure naming the scenarios that never finished,
with both ranks' output, never a blocked CI job.

The single-process references run in the test process itself, on the same data,
model and optimizer, with the global batch in one piece.

The last tests need no process group: ``distribute_data`` and ``set_sampler_epoch``
only read a ``Collective``'s rank and size, so a fake one for rank 1 of 2 will do.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import ddp_worker
import helpers as h
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from statemachine_loop import ConfigError, Event
from statemachine_loop.callbacks import Checkpoint
from statemachine_loop.checkpoint_io import list_checkpoints
from statemachine_loop.distributed import Collective, distribute_data, set_sampler_epoch

WORKER = Path(__file__).with_name("ddp_worker.py")
#: The whole two-rank launch; it normally takes 15-30 s here.
LAUNCH_TIMEOUT = 240.0
#: A scenario in which one rank decided alone must end in far less than that.
SCENARIO_BOUND = 30.0
WORLD = 2
EPOCH = h.epoch_trace(4, 2)  # 4 training and 2 validation batches, whatever the world size


# -- the launch ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@attrs.frozen
class Launch:
    """What the two workers left: each scenario's per-rank results, and their output."""

    out: Path
    returncodes: list[int | None]
    timed_out: bool
    elapsed: float
    logs: list[str]

    def results(self, scenario: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Rank 0's and rank 1's result of ``scenario``; fails with the workers' output."""
        found = [self.out / f"{scenario}.rank{rank}.pt" for rank in range(WORLD)]
        if not all(path.exists() for path in found):
            what = f"timed out after {LAUNCH_TIMEOUT:.0f}s" if self.timed_out else "exited"
            raise AssertionError(
                f"Scenario {scenario!r} left no result on every rank: the workers {what} "
                f"with codes {self.returncodes}.\n"
                + "\n".join(f"--- rank {r} ---\n{log[-4000:]}" for r, log in enumerate(self.logs))
            )
        rank0, rank1 = (torch.load(path, weights_only=False) for path in found)
        return rank0, rank1

    def ok(self, scenario: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Like :meth:`results`, for a scenario that must not have raised."""
        results = self.results(scenario)
        for rank, result in enumerate(results):
            assert "error" not in result, (
                f"rank {rank} raised in {scenario}:\n{result['traceback']}"
            )
            assert result["elapsed"] < SCENARIO_BOUND, (scenario, rank, result["elapsed"])
        return results


def launch(out: Path, scenarios: list[str]) -> Launch:
    """Run ``scenarios`` on two ranks, as ``torchrun --nproc_per_node 2`` would start them."""
    port = free_port()
    processes, logs = [], []
    start = time.monotonic()
    for rank in range(WORLD):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "LOCAL_WORLD_SIZE": str(WORLD),
            "OMP_NUM_THREADS": "1",
        }
        log = (out / f"worker{rank}.log").open("w")
        logs.append(log)
        processes.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out), *scenarios],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    timed_out = False
    deadline = start + LAUNCH_TIMEOUT
    try:
        for process in processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for process in processes:  # only our own two children
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    return Launch(
        out=out,
        returncodes=[process.returncode for process in processes],
        timed_out=timed_out,
        elapsed=time.monotonic() - start,
        logs=[(out / f"worker{rank}.log").read_text() for rank in range(WORLD)],
    )


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launch]:
    out = tmp_path_factory.mktemp("ddp")
    # A one-process checkpoint for the workers to refuse.
    loop, model = ddp_worker.make_loop(1, [Checkpoint(out / "single")])
    loop.fit(model, epochs=1)
    yield launch(out, list(ddp_worker.SCENARIOS))


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    """The single-process reference: the same run, the global batch in one process."""
    return ddp_worker.baseline(1)


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def events(result: dict[str, Any]) -> list[Event]:
    return [Event(entry[0]) for entry in result["trace"]]


def assert_lockstep(rank0: dict[str, Any], rank1: dict[str, Any]) -> None:
    """Both ranks fired the same events, recorded the same decisions, stopped alike."""
    assert rank0["trace"] == rank1["trace"]
    assert rank0["decisions"] == rank1["decisions"]
    assert rank0["stop_reason"] == rank1["stop_reason"]
    assert_same_params(rank0["params"], rank1["params"])


# -- (a) and (d): the same training as one process -------------------------------------


def test_parameters_equal_the_single_process_run(two_ranks: Launch, single: dict[str, Any]) -> None:
    rank0, rank1 = two_ranks.ok("baseline")
    assert [r["rank"] for r in (rank0, rank1)] == [0, 1]
    assert [r["world_size"] for r in (rank0, rank1)] == [2, 2]
    assert [r["is_main_process"] for r in (rank0, rank1)] == [True, False]
    assert_same_params(rank0["params"], rank1["params"])  # bit for bit: DDP all-reduced
    for name, value in single["params"].items():
        torch.testing.assert_close(rank0["params"][name], value, rtol=0, atol=1e-6)


def test_ranks_fire_the_single_process_trace(two_ranks: Launch, single: dict[str, Any]) -> None:
    rank0, rank1 = two_ranks.ok("baseline")
    assert rank0["trace"] == rank1["trace"] == single["trace"]
    assert events(rank0) == h.fit_of(EPOCH, EPOCH, EPOCH)


@pytest.mark.parametrize("phase", ["training", "validation"])
def test_phase_metrics_are_the_global_single_process_values(
    two_ranks: Launch, single: dict[str, Any], phase: str
) -> None:
    rank0, rank1 = two_ranks.ok("baseline")
    assert rank0[phase] == rank1[phase]  # every rank reports the global values
    assert len(rank0[phase]) == len(single[phase]) == 3
    for got, expected in zip(rank0[phase], single[phase], strict=True):
        assert got.keys() == expected.keys() == {"loss", "accuracy", "epoch"}
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)


# -- (b): a decision on rank 1 alone is taken by both ------------------------------------


@pytest.mark.parametrize(
    ("scenario", "expected_trace", "reason"),
    [
        pytest.param(
            "observer_stop",
            h.fit_of(EPOCH, EPOCH),
            "rank 1 says stop",
            id="observer-stop-at-epoch-end",
        ),
        pytest.param(
            "guard_stop",
            # batch_start of epoch 1's training batch 2: 6 batch_starts per epoch before it
            h.interrupted(h.fit_of(*[EPOCH] * 4), Event.BATCH_START, 6 + 2, taken=False),
            "GuardBatchStartOnRank1 stopped the loop at batch_start on rank 1",
            id="guard-stop-at-batch-start",
        ),
    ],
)
def test_stop_on_rank_1_only_stops_both_ranks_alike(
    two_ranks: Launch, scenario: str, expected_trace: list[Event], reason: str
) -> None:
    rank0, rank1 = two_ranks.ok(scenario)
    assert_lockstep(rank0, rank1)
    assert events(rank0) == expected_trace
    assert rank0["stop_reason"] == reason
    [decision] = rank0["decisions"]
    assert decision["kind"] == "stop"
    assert decision["rank"] == 1
    assert decision["applied"]


def test_veto_on_rank_1_only_skips_the_batch_on_both_ranks(two_ranks: Launch) -> None:
    rank0, rank1 = two_ranks.ok("guard_veto")
    assert_lockstep(rank0, rank1)  # equal parameters: both ranks skipped the same batch
    vetoed_epoch = [h.ES, *h.training_phase(3), *h.validation_phase(2), h.EE]
    assert events(rank0) == h.fit_of(vetoed_epoch, EPOCH)
    starts = [(e, b) for name, _, e, b, training, _ in rank0["trace"] if name == "batch_start"]
    assert starts[:3] == [(0, 0), (0, 2), (0, 3)]
    [decision] = rank0["decisions"]
    assert (decision["kind"], decision["rank"], decision["reason"]) == ("veto", 1, "rank 1 skips")
    assert rank0["stop_reason"] is None


# -- (c) and (g): what cannot be agreed is an error on every rank, not a hang ------------


def test_different_redirects_raise_on_every_rank(two_ranks: Launch) -> None:
    rank0, rank1 = two_ranks.results("conflict")
    for result in (rank0, rank1):
        assert result["error"] == "ConflictingDecisionsError", result.get("traceback")
        assert "validation_start" in result["message"] and "epoch_end" in result["message"]
        assert result["elapsed"] < SCENARIO_BOUND
    assert rank0["message"] == rank1["message"]
    assert_lockstep(rank0, rank1)
    assert events(rank0) == [h.FS, h.ES, h.EE, h.FE]  # training_start refused, wound down
    assert [(d["rank"], d["target"], d["ignored_because"]) for d in rank0["decisions"]] == [
        (0, "validation_start", "refused"),
        (1, "epoch_end", "refused"),
    ]


def test_different_callbacks_raise_config_error_on_every_rank(two_ranks: Launch) -> None:
    for result in two_ranks.results("mismatch"):
        assert result["error"] == "ConfigError", result.get("traceback")
        assert "different callbacks" in result["message"]
        assert result["elapsed"] < SCENARIO_BOUND


# -- (e): rank 0 alone writes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("writer", "path"),
    [
        ("Checkpoint", "checkpoints"),
        ("CSVLogger", "log.csv"),
        ("StructuredLogger", "events.jsonl"),
        ("TensorBoardLogger", "tensorboard"),
    ],
)
def test_only_rank_0_writes(two_ranks: Launch, writer: str, path: str) -> None:
    rank0, _ = two_ranks.ok("writers")
    assert writer in rank0["writers"]
    rank0_files, rank1_files = (
        files_under(two_ranks.out / "writers" / f"rank{rank}" / path) for rank in range(WORLD)
    )
    assert rank0_files, f"{writer} wrote nothing on rank 0"
    assert rank1_files == [], f"{writer} wrote on rank 1: {rank1_files}"


def files_under(path: Path) -> list[Path]:
    """``path`` if it is a file, else the files somewhere below it."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("**/*") if p.is_file())


# -- (f): checkpoints under two ranks ---------------------------------------------------


def test_preemption_on_rank_1_checkpoints_and_resumes_bit_for_bit(two_ranks: Launch) -> None:
    straight = two_ranks.ok("straight")
    preempt = two_ranks.ok("preempt")
    for rank in range(WORLD):
        interrupted, resumed = preempt[rank]["interrupted"], preempt[rank]["resumed"]
        assert interrupted["stop_reason"] == "preempted"
        # Both ranks' Checkpoint observers saw the agreed request at the same boundary:
        # the batch_end during which rank 1 was signalled.
        assert [
            (d["rank"], d["kind"], d["event"], d["epoch_index"], d["batch_index"])
            for d in interrupted["decisions"]
        ] == [
            (0, "stop", "batch_end", 1, 1),
            (1, "stop", "batch_end", 1, 1),
        ]
        assert resumed["resumed_from"] is not None
        assert "e0001-training-b000001" in resumed["resumed_from"]
        assert resumed["stop_reason"] is None
        assert_same_params(resumed["params"], straight[rank]["params"])
    assert preempt[0]["interrupted"]["decisions"] == preempt[1]["interrupted"]["decisions"]
    assert_same_params(preempt[0]["interrupted"]["params"], preempt[1]["interrupted"]["params"])


def test_scheduled_checkpoint_resumes_bit_for_bit(two_ranks: Launch) -> None:
    straight = two_ranks.ok("straight")
    scheduled = two_ranks.ok("scheduled")
    positions = [
        (m["epoch_index"], m["state"], m["batch_index"]) for m in scheduled[0]["checkpoints"]
    ]
    assert positions == [
        (0, "training", 2),
        (1, "training", 1),
        (2, "training", 0),
        (2, "training", 3),
    ]
    for rank in range(WORLD):
        assert scheduled[rank]["resumed"]["resumed_from"] == scheduled[rank]["chosen"]
        assert_same_params(scheduled[rank]["full"]["params"], straight[rank]["params"])
        assert_same_params(scheduled[rank]["resumed"]["params"], straight[rank]["params"])


def test_two_rank_checkpoint_is_refused_in_one_process(two_ranks: Launch) -> None:
    two_ranks.ok("preempt")
    checkpoint = list_checkpoints(two_ranks.out / "preempt")[-1]
    loop, model = ddp_worker.make_loop(1, shuffle=True, dropout=True, adam=True)
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\) but this fit runs 1"):
        loop.fit(model, epochs=3, resume=checkpoint.path)


def test_one_process_checkpoint_is_refused_under_two_ranks(two_ranks: Launch) -> None:
    for result in two_ranks.results("single_to_two"):
        assert result["error"] == "ConfigError", result.get("traceback")
        assert "written by 1 process(es) but this fit runs 2" in result["message"]


# -- sharding, without a process group --------------------------------------------------


def rank_of(rank: int) -> Collective:
    return Collective(rank=rank, world_size=2, device=torch.device("cpu"))


def indices(data: Any) -> list[int]:
    return [int(i) for batch in data for i in batch[0]]


def numbered(n: int) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.arange(n), torch.zeros(n))


def test_collective_is_main_on_rank_0_only() -> None:
    assert rank_of(0).is_main and not rank_of(1).is_main


def test_an_unshuffled_loader_gives_each_rank_every_other_sample() -> None:
    original = DataLoader(numbered(16), batch_size=4, drop_last=True)
    sharded = distribute_data(original, rank_of(1), name="training")
    assert isinstance(sharded, DataLoader) and sharded is not original
    assert isinstance(sharded.sampler, DistributedSampler)
    assert (sharded.sampler.num_replicas, sharded.sampler.rank) == (2, 1)
    assert not sharded.sampler.shuffle
    assert (sharded.batch_size, sharded.drop_last) == (4, True)  # per rank, as given
    assert [batch[0].tolist() for batch in sharded] == [[1, 3, 5, 7], [9, 11, 13, 15]]


def test_a_shuffled_loader_shards_a_permutation_that_changes_with_the_epoch() -> None:
    shards = [
        distribute_data(DataLoader(numbered(16), batch_size=4, shuffle=True), rank_of(r), name="t")
        for r in range(2)
    ]
    assert all(shard.sampler.shuffle for shard in shards)  # type: ignore[attr-defined]
    orders = []
    for epoch in (0, 1):
        for shard in shards:
            set_sampler_epoch(shard, epoch)
        first, second = (indices(shard) for shard in shards)
        assert sorted(first + second) == list(range(16))  # disjoint, and all of it
        orders.append(first)
    assert orders[0] != orders[1]
    set_sampler_epoch(shards[0], 0)
    assert indices(shards[0]) == orders[0]  # the epoch alone fixes the order


def test_an_uneven_dataset_is_padded_with_repeated_samples() -> None:
    # The caveat of DistributedSampler: 9 samples on 2 ranks are read as 10.
    sharded = distribute_data(DataLoader(numbered(9), batch_size=5), rank_of(1), name="t")
    assert indices(sharded) == [1, 3, 5, 7, 0]


def test_loader_options_survive_the_rebuild() -> None:
    def collate(batch: list[Any]) -> Any:
        return torch.utils.data.default_collate(batch)

    original = DataLoader(numbered(8), batch_size=2, collate_fn=collate, pin_memory=False)
    sharded = distribute_data(original, rank_of(0), name="t")
    assert isinstance(sharded, DataLoader)
    assert sharded.collate_fn is collate
    assert sharded.dataset is original.dataset


def test_already_sharded_data_passes_through() -> None:
    dataset = numbered(8)
    ready = DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, 2, 1))
    batches = [(torch.zeros(1), torch.zeros(1))]
    assert distribute_data(ready, rank_of(1), name="t") is ready
    assert distribute_data(batches, rank_of(1), name="t") is batches


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield torch.zeros(1), torch.zeros(1)


def test_what_the_loop_cannot_shard_is_a_config_error_naming_the_data() -> None:
    with pytest.raises(ConfigError, match="validation is a DataLoader over an IterableDataset"):
        distribute_data(DataLoader(Stream(), batch_size=1), rank_of(1), name="validation")

    custom = DataLoader(numbered(4), batch_sampler=[[0, 1], [2, 3]])  # any iterable of lists
    with pytest.raises(ConfigError, match="training uses a custom batch sampler"):
        distribute_data(custom, rank_of(1), name="training")


def test_set_sampler_epoch_touches_only_distributed_samplers() -> None:
    dataset = numbered(8)
    plain = DataLoader(dataset, sampler=SequentialSampler(dataset))
    set_sampler_epoch(plain, 3)  # nothing to set, and no error
    set_sampler_epoch([(torch.zeros(1), torch.zeros(1))], 3)
    sharded = DataLoader(dataset, sampler=DistributedSampler(dataset, 2, 0))
    set_sampler_epoch(sharded, 3)
    assert sharded.sampler.epoch == 3  # type: ignore[attr-defined]


def test_the_torchrun_environment_is_read_once_per_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from statemachine_loop import distributed

    monkeypatch.setattr(distributed, "_torchrun_environment", None)
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    assert distributed._launched_by_torchrun()
    monkeypatch.delenv("MASTER_ADDR")  # no longer torchrun's, but read once per process
    assert distributed._launched_by_torchrun()
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)  # a forked child
    assert not distributed._launched_by_torchrun()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(distributed, "_torchrun_environment", None)
    assert not distributed._launched_by_torchrun()  # a world of one is no world
