"""The process ``test_kill_resume.py`` kills: a small training run that resumes itself.

``python tests/kill_target.py run DIR OUT [--die SAVE:STAGE]`` trains a tiny MLP with
dropout on seeded, shuffled data for a few hundred steps, checkpointing every few
batches into ``DIR`` with ``resume="auto"``, and finally writes the model's
``state_dict`` to ``OUT`` (atomically). Every start appends a line to ``DIR/../log``
saying where it resumed from, so the test can tell that kills did interrupt training,
and prints ``training`` once its ``fit`` has started.

``--die SAVE:STAGE`` makes the process SIGKILL itself inside its ``SAVE``-th checkpoint
write, at a chosen point of the write protocol: ``write`` (half the payload written to
its temporary file), ``payload`` (payload moved into place, no manifest yet),
``manifest`` (both in place, directory not yet synced) or ``rotate`` (an old
checkpoint's manifest deleted, its payload not yet).

``python tests/kill_target.py serve`` is a fork server: importing torch costs seconds,
so it imports once and forks one worker per request, which keeps each kill trial to
the training time. On stdin, ``start DIR OUT [SAVE:STAGE]`` forks a worker and answers
``pid N``; ``wait`` reaps it and answers ``exit CODE`` (``-9`` when SIGKILLed). The
worker is reaped only on ``wait``, so the test can SIGKILL it without racing its exit.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

from statemachine_loop import TrainingLoop  # noqa: E402
from statemachine_loop import checkpoint_io as io  # noqa: E402
from statemachine_loop.callbacks.checkpoint import Checkpoint  # noqa: E402

EPOCHS, FEATURES, CLASSES, BATCH = 8, 8, 3, 16
TRAINING, VALIDATION = 512, 64
EVERY_N_BATCHES = 5
STAGES = ("write", "payload", "manifest", "rotate")


def train(directory: Path, out: Path) -> None:
    """One start of the run: resume from ``directory`` if it can, finish, write ``out``."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)  # the model's init and dropout of a fresh start
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(TRAINING + VALIDATION, FEATURES, generator=generator)
    targets = inputs[:, :CLASSES] + 0.5 * torch.randn(len(inputs), CLASSES, generator=generator)
    targets = targets.argmax(dim=1)
    order = torch.Generator().manual_seed(2)
    training = DataLoader(
        TensorDataset(inputs[:TRAINING], targets[:TRAINING]),
        batch_size=BATCH,
        shuffle=True,
        generator=order,
    )
    validation = DataLoader(TensorDataset(inputs[TRAINING:], targets[TRAINING:]), batch_size=BATCH)
    nn = torch.nn
    model = nn.Sequential(
        nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, CLASSES)
    )
    checkpoint = Checkpoint(directory, every_n_batches=EVERY_N_BATCHES, keep_last=2)
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        loss_fn=nn.functional.cross_entropy,
        metrics=["accuracy"],
        callbacks=[checkpoint],
    )

    def log_start(_: TrainingLoop, event: Any) -> None:
        if event.value == "fit_start":
            with open(directory.parent / "log", "a") as log:
                log.write(f"start resumed_from={loop.resumed_from}\n")
            print("training", flush=True)  # the direct run's "kill me now" signal

    loop.fit(model, EPOCHS, resume="auto", callbacks=[log_start])
    temporary = out.with_name(out.name + ".partial")
    torch.save(model.state_dict(), temporary)
    os.replace(temporary, out)


def die_during_save(save: int, stage: str) -> None:
    """SIGKILL this process inside its ``save``-th checkpoint write, at ``stage``."""
    real_os, real_unlink = io.os, io._unlink
    replaced = [0]  # each save moves two files into place: payload, then manifest

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    class DyingOs:
        def __getattr__(self, name: str) -> Any:
            return getattr(real_os, name)

        def write(self, fd: int, data: Any) -> int:
            if stage == "write" and replaced[0] == 2 * (save - 1):
                real_os.write(fd, memoryview(data)[: len(memoryview(data)) // 2])
                die()
            return real_os.write(fd, data)

        def replace(self, source: Any, target: Any) -> None:
            real_os.replace(source, target)
            replaced[0] += 1
            if (stage, replaced[0]) in (("payload", 2 * save - 1), ("manifest", 2 * save)):
                die()

    def unlink(path: Path, what: str) -> None:
        real_unlink(path, what)
        if stage == "rotate" and replaced[0] >= 2 * save and path.suffix == ".json":
            die()

    io.os = DyingOs()  # type: ignore[assignment]
    io._unlink = unlink


def run(arguments: list[str]) -> None:
    directory, out = Path(arguments[0]), Path(arguments[1])
    directory.parent.mkdir(parents=True, exist_ok=True)
    if len(arguments) > 2:
        save, stage = arguments[2].split(":")
        assert stage in STAGES, stage
        die_during_save(int(save), stage)
    signal.alarm(60)  # never outlive a broken test
    train(directory, out)


def serve() -> None:
    """Fork one worker per ``start`` request; reap it on ``wait``."""
    # The first optimizer imports torch._dynamo (seconds): do it once, before forking.
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    print("ready", flush=True)
    pid = 0
    for line in sys.stdin:
        command, *arguments = line.split()
        if command == "start":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # keep the protocol clean
                    run(arguments)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif command == "wait":
            _, status = os.waitpid(pid, 0)
            print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
    os._exit(0)  # stdin closed: leave at once, without torch's slow interpreter teardown


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        assert sys.argv[1] == "run", sys.argv
        run(sys.argv[2:])
