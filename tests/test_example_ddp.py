"""``examples/ddp.py --smoke`` runs unchanged in one process and under ``torchrun``.

Both runs see the same global batches, so they print the same final accuracy. They
are started together (each is mostly Python and torch starting up) and each has a
hard timeout; ``torchrun`` gets a free port and its own process group, so a hung run
is killed with its workers instead of blocking CI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ddp.py"
TIMEOUT = 240.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start(command: list[str], out: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen(
        [*command, str(EXAMPLE), "--smoke", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # torchrun and its workers, killed together on a timeout
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"timed out after {TIMEOUT:.0f}s:\n{stdout}\n{stderr}") from None
    return process.returncode, stdout, stderr


def accuracy_line(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith("final validation accuracy")]
    return line


def test_ddp_example_runs_alone_and_under_torchrun_to_the_same_accuracy(tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    torchrun += ["--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    torchrun += ["--master_port", str(free_port())]
    processes = {
        "single": start([sys.executable], tmp_path / "single"),
        "torchrun": start(torchrun, tmp_path / "torchrun"),
    }
    outputs = {}
    try:
        for name, process in processes.items():
            code, stdout, stderr = finish(process)
            assert code == 0, f"{name} exited {code}:\n{stdout}\n{stderr}"
            outputs[name] = stdout
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    single, distributed = outputs["single"], outputs["torchrun"]
    assert "processes: 1, batch per process: 64" in single
    assert "processes: 2, batch per process: 32" in distributed
    # Rank 0 alone prints: one metrics line per epoch, and one progress line per phase.
    lines = distributed.splitlines()
    assert sum(line.startswith("epoch ") and "|" in line for line in lines) == 3
    assert sum(line.startswith("epoch ") and " batches in " in line for line in lines) == 6
    assert accuracy_line(single) == accuracy_line(distributed)
    # Rank 0 alone wrote the checkpoints, one per epoch.
    assert len(list((tmp_path / "torchrun" / "checkpoints").glob("*.json"))) == 3
