"""Instructions per step of ``TrainingLoop.fit`` against the hand-written loop, under callgrind.

A benchmark, not a timed test. Wall-clock ratios on a shared 2-core machine move by
several percent between identical runs (see ``docs/benchmarks.md``); the number of
instructions a fit executes does not. This counts them with valgrind's callgrind,
for the same contenders and workload as ``overhead.py``'s tutorial model::

    python benchmarks/instructions.py             # 5 fits of 200 steps per contender
    python benchmarks/instructions.py --fits 10

Method. Each contender runs in its own process under ``valgrind --tool=callgrind
--instr-atstart=no``: importing torch and the warm-up fits run uninstrumented; the
parent then switches instrumentation on (``callgrind_control -i on``), lets the
child run ``--fits`` fits, and switches it off again, so the count covers exactly
those fits — the loop's per-fit set-up included. Everything allocated before is frozen out of the
garbage collector's reach (``gc.freeze``), as in ``overhead.py``. Children run with
``PYTHONHASHSEED=0``: string hashing, and with it every dict's layout, is otherwise
randomised per process, which moved counts by up to ~0.5 % between identical runs.
Instructions are not time (cache misses and branch mispredictions are not counted),
so this is a lower bound on the overhead and a noise-free way to see a change's
effect: two runs of the same commit give the same count.
Needs ``valgrind`` on the PATH; takes about 40 s per contender.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CONTENDERS = ("raw", "compiled")
HERE = Path(__file__).resolve().parent


def child(contender: str, fits: int) -> None:
    """Run inside valgrind: warm up, wait for the parent, run the counted fits."""
    import torch

    sys.path.insert(0, str(HERE))
    from overhead import bare_loop, raw_fit, tutorial_workload

    torch.set_num_threads(1)
    torch.manual_seed(0)
    work = tutorial_workload(1000)
    model, data, loss_fn = work["model"], work["data"], work["loss_fn"]
    optimizer = work["optimizer"](model.parameters())
    if contender == "raw":

        def run() -> object:
            return raw_fit(model, data, optimizer, loss_fn, 2)

    else:
        loop = bare_loop(training=data, optimizer=optimizer, loss_fn=loss_fn, engine=contender)

        def run() -> object:
            return loop.fit(model, 2)

    for _ in range(3):
        run()
    gc.collect()
    gc.freeze()
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(fits):
        run()
    print("done", flush=True)
    sys.stdin.readline()


def count(contender: str, fits: int) -> int:
    """Instructions executed by ``fits`` fits of ``contender``."""
    process = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            contender,
            "--fits",
            str(fits),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # String hashing is randomised per process, and with it dict and set layouts:
        # up to ~0.5 % of a step's instructions. One seed makes runs comparable.
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert process.stdin is not None and process.stdout is not None
    for expected, switch in (("ready", "on"), ("done", "off")):
        line = process.stdout.readline().strip()
        if line != expected:
            process.kill()
            raise SystemExit(f"{contender}: expected {expected!r} from the child, got {line!r}.")
        subprocess.run(
            ["callgrind_control", "-i", switch, str(process.pid)], check=True, capture_output=True
        )
        process.stdin.write("\n")
        process.stdin.flush()
    _, stderr = process.communicate()
    found = re.findall(r"Collected : (\d+)", stderr)
    if process.returncode != 0 or not found:
        raise SystemExit(f"{contender}: valgrind failed:\n{stderr[-2000:]}")
    return int(found[-1])


def main(argv: list[str] | None = None) -> None:
    """Count every contender and print instructions per step and the ratio to raw."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=5, help="counted fits of 200 steps")
    parser.add_argument("--child", choices=(*CONTENDERS, "transitions"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fits < 1:
        parser.error("--fits must be >= 1")
    if args.child is not None:
        child(args.child, args.fits)
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind (with callgrind_control) is not on the PATH.")
    steps = args.fits * 200
    print(
        f"tutorial model, {args.fits} fits x 200 steps per contender, instructions under callgrind"
    )
    counts = {name: count(name, args.fits) for name in CONTENDERS}
    raw = counts["raw"]
    for name, total in counts.items():
        print(
            f"  {name:<10}{total / steps:>12,.0f} instructions/step"
            f"{total / raw:>10.4f}x{(total - raw) / steps:>+10,.0f} per step"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
