"""Every example runs: ``python examples/X.py --smoke`` exits 0 and reports its metric.

Each example runs in its own subprocess (``sys.executable``), as a reader would run
it, with the working directory in a temporary folder so whatever it writes under
``run/`` stays out of the repository. ``demo.py``, ``resume.py`` and ``ddp.py`` have
tests of their own and are left out here.

The selected examples are started together, two at a time, when the first of their
tests runs, each with one intra-op thread: the examples are small, and two processes
of one thread each finish sooner than one after the other on two cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: Examples tested elsewhere (``tests/test_demo.py``, ``tests/test_resume.py``, the DDP tests).
OWN_TESTS = frozenset({"demo.py", "resume.py", "ddp.py"})
SMOKE_EXAMPLES = sorted(
    path.name
    for path in EXAMPLES.glob("*.py")
    if path.name not in OWN_TESTS and not path.name.startswith("_")
)
#: Per example, the line that says it did its job; any other example must end its
#: output with a line holding a number.
EXPECTED: dict[str, str] = {
    "regression.py": r"^final validation mse \d+\.\d+",
    "lenet_digits.py": r"^final validation accuracy \d\.\d{4}",
    "resnet_digits.py": r"^final validation accuracy \d\.\d{4}, top-5 accuracy \d\.\d{4}$",
    "text_classifier_schedule.py": r"^final validation mcc -?\d\.\d{4}, accuracy \d\.\d{4}$",
    "char_lm_tensorboard.py": r"^final validation perplexity \d+\.\d+$",
    "custom_callback.py": r"^final validation accuracy \d\.\d{4}; decisions: veto 2, redirect 1$",
    "early_stopping_resume.py": r"^early-stopping state survived the crash: yes$",
}
#: Files an example must have written, relative to its working directory.
WRITES: dict[str, str] = {
    "lenet_digits.py": "run/smoke/lenet_digits/log.csv",
    "char_lm_tensorboard.py": "run/smoke/char_lm/tensorboard/*/training/events.out.tfevents.*",
    "early_stopping_resume.py": "run/smoke/early_stopping/checkpoints/*",
}
TIMEOUT_S = 120


def _run(name: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--smoke"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def smoke_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Path, subprocess.CompletedProcess[str]]]]:
    """Run every selected example once, two at a time; ``name -> (workdir, result)``."""
    selected = sorted(
        {
            item.callspec.params["name"]
            for item in request.session.items
            if item.path == request.path and hasattr(item, "callspec")
        }
    )
    root = tmp_path_factory.mktemp("examples")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, name, root / Path(name).stem) for name in selected}
        yield {name: (root / Path(name).stem, future.result()) for name, future in futures.items()}


def test_every_example_is_covered() -> None:
    assert SMOKE_EXAMPLES, "no examples found"
    missing = sorted(set(EXPECTED) - set(SMOKE_EXAMPLES))
    assert not missing, f"examples expected but not found: {missing}"


@pytest.mark.parametrize("name", SMOKE_EXAMPLES)
def test_example_runs_with_smoke(
    name: str, smoke_runs: dict[str, tuple[Path, subprocess.CompletedProcess[str]]]
) -> None:
    workdir, result = smoke_runs[name]
    report = f"examples/{name} --smoke\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, report
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, report
    pattern = EXPECTED.get(name)
    if pattern is None:
        assert re.search(r"\d", lines[-1]), report
    else:
        assert any(re.search(pattern, line) for line in lines), (
            f"no line matches {pattern}\n{report}"
        )
    if name in WRITES:
        assert list(workdir.glob(WRITES[name])), f"{name} wrote nothing to {WRITES[name]}"
    assert "Traceback" not in result.stderr, report
