"""The ``smloop`` command: logs show / summary / validate, diagram, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from statemachine_loop import Callback, Stop, TrainingLoop, Veto
from statemachine_loop.callbacks.structured import StructuredLogger
from statemachine_loop.cli import main
from statemachine_loop.logs import LogReadError, read_log, summarize


class Skeptic(Callback):
    """Vetoes one update and stops the loop after two epochs."""

    def guard_update_start(self, loop: TrainingLoop) -> Veto | None:
        return Veto("accumulate this one") if loop.batch_index == 1 else None

    def on_epoch_end(self, loop: TrainingLoop) -> Stop | None:
        return Stop("two epochs are enough") if loop.epoch_index == 1 else None


def write_run(directory: Path, *, level: str = "info", epochs: int = 5) -> Path:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=generator)
    y = (x.sum(1, keepdim=True) > 0).float()
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 24, 4)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    loop = TrainingLoop(
        training=batches[:4],
        validation=batches[4:],
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.functional.binary_cross_entropy_with_logits,
        metrics=["accuracy"],
        callbacks=[Skeptic(), StructuredLogger(directory / "events.jsonl", level=level)],
    )
    loop.fit(model, epochs)
    return directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def lines_of(run: Path) -> list[str]:
    return (run / "events.jsonl").read_text().splitlines()


def write_lines(path: Path, lines: list[str], *, final_newline: bool = True) -> Path:
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""))
    return path


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- validate --------------------------------------------------------------------------


def test_validate_accepts_a_real_run_by_directory_or_file(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for target in (run_dir, run_dir / "events.jsonl"):
        code, out, err = run_main(["logs", "validate", str(target)], capsys)
        assert (code, err) == (0, "")
        transitions = sum(1 for r in read_log(run_dir) if r.kind == "transition")
        assert f"valid: {transitions} transitions in 1 run(s)" in out


def test_validate_names_the_line_the_event_and_what_was_legal(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(run_dir)
    index = next(i for i, line in enumerate(lines) if '"event": "training_end"' in line)
    broken = write_lines(tmp_path / "broken.jsonl", lines[:index] + lines[index + 2 :])
    # without training_end (and its metrics), validation_start comes from state 'training'
    code, out, err = run_main(["logs", "validate", str(broken)], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert (
        f"line {index + 1}: event 'validation_start' cannot be taken from state 'training'" in err
    )
    assert "['batch_start', 'training_end']" in err


def test_validate_checks_the_recorded_states_against_the_machine(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [json.loads(line) for line in lines_of(run_dir)]
    target = next(i for i, r in enumerate(records) if r["event"] == "epoch_end")
    records[target]["to_state"] = "epoch"
    edited = write_lines(tmp_path / "edited.jsonl", [json.dumps(r) for r in records])
    code, _, err = run_main(["logs", "validate", str(edited)], capsys)
    assert code == 1
    assert f"line {target + 1}: event 'epoch_end' is recorded as 'validated' -> 'epoch'" in err
    assert "'validated' -> 'fit'" in err


def test_validate_refuses_a_run_that_never_reaches_done(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = write_lines(tmp_path / "cut.jsonl", lines_of(run_dir)[:-1])
    code, _, err = run_main(["logs", "validate", str(cut)], capsys)
    assert code == 1
    assert "ends in state 'fit' without reaching 'done'" in err
    assert "['epoch_start', 'fit_end']" in err


def test_validate_replays_each_run_of_an_appended_log_from_idle(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(run_dir)
    second = [json.dumps({**json.loads(line), "run_id": "second"}) for line in lines]
    both = write_lines(tmp_path / "both.jsonl", lines + second)
    code, out, _ = run_main(["logs", "validate", str(both)], capsys)
    assert code == 0 and "in 2 run(s)" in out
    unfinished = write_lines(tmp_path / "unfinished.jsonl", lines[:-1] + second)
    code, _, err = run_main(["logs", "validate", str(unfinished)], capsys)
    last = max(i for i, line in enumerate(lines[:-1]) if '"kind": "transition"' in line)
    assert code == 1 and f"line {last + 1}: run " in err


def test_validate_a_debug_log_strictly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path, level="debug", epochs=1)
    assert run_main(["logs", "validate", str(run)], capsys)[0] == 0
    lines = lines_of(run)
    index = next(i for i, line in enumerate(lines) if '"event": "update_start"' in line)
    dropped = write_lines(tmp_path / "dropped.jsonl", lines[: index - 1] + lines[index:])
    code, _, err = run_main(["logs", "validate", str(dropped)], capsys)
    assert code == 1 and "event 'update_start' cannot be taken from state 'training'" in err


# -- unreadable logs -------------------------------------------------------------------

_VALID = json.dumps({"kind": "transition", "event": "fit_start", "run_id": "r", "level": "info"})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("\n\n", "is empty"),
        (_VALID + '\n{"kind": "trans', "is truncated: line 2 is a partial record"),
        (_VALID + "\nnot json\n" + _VALID + "\n", "line 2 is not JSON"),
        ("not json at all\n", "line 1 is not JSON"),
        ('{"kind": "transition"}\n[1, 2]\n', "line 1 is not a statemachine_loop record"),
    ],
)
@pytest.mark.parametrize("action", ["show", "summary", "validate"])
def test_unreadable_logs_give_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    action: str,
    content: str | None,
    message: str,
) -> None:
    path = tmp_path / "events.jsonl"
    if content is not None:
        path.write_text(content)
    code, out, err = run_main(["logs", action, str(path)], capsys)
    assert code == 2 and out == ""
    assert err.startswith("smloop: error: ") and err.count("\n") == 1
    assert message in err and "Traceback" not in err


def test_a_truncated_real_log_is_reported_as_truncated(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (run_dir / "events.jsonl").read_text()
    path = tmp_path / "events.jsonl"
    path.write_text(text[: len(text) - 40])
    code, _, err = run_main(["logs", "summary", str(tmp_path)], capsys)
    assert code == 2 and "is truncated" in err


def test_a_directory_without_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["logs", "show", str(tmp_path)], capsys)
    assert code == 2 and "is a directory without a events.jsonl log" in err


def test_a_log_without_transitions_cannot_be_validated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = {"kind": "failure", "event": "fit_end", "run_id": "r", "level": "error"}
    path = write_lines(tmp_path / "e.jsonl", [json.dumps(record)])
    code, _, err = run_main(["logs", "validate", str(path)], capsys)
    assert code == 1 and "no transition records" in err


# -- show and summary ------------------------------------------------------------------


def test_show_lists_every_record_and_filters(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    total = len(lines_of(run_dir))
    code, out, _ = run_main(["logs", "show", str(run_dir)], capsys)
    assert code == 0 and f"{total} records" in out
    assert "idle -> fit" in out and "two epochs are enough (by Skeptic)" in out
    assert "veto of update_start by Skeptic: accumulate this one" in out
    _, out, _ = run_main(["logs", "show", str(run_dir), "--event", "training_end"], capsys)
    assert "4 of " in out  # two transitions and two metrics records
    _, out, _ = run_main(
        ["logs", "show", str(run_dir), "--epoch", "1", "--level", "warning"], capsys
    )
    assert "1 of " in out and "stop" in out


def test_show_refuses_an_unknown_event(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["logs", "show", str(run_dir), "--event", "epoch_begin"])
    assert exit_info.value.code == 2
    assert "'epoch_begin' is not a lifecycle event" in capsys.readouterr().err


def test_summary_reports_epochs_metrics_decisions_and_the_stop(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(["logs", "summary", str(run_dir)], capsys)
    assert code == 0
    (run,) = summarize(read_log(run_dir))
    assert f"Run {run.run_id}" in out
    assert "Epochs: 2/5  outcome: stopped: two epochs are enough" in out
    assert "training loss" in out and "validation accuracy" in out
    assert "Decisions (3)" in out and "accumulate this one" in out
    assert "Stop reason: two epochs are enough" in out
    assert sorted(run.epochs) == [0, 1]
    assert set(run.epochs[0]) == {"training", "validation", "duration_s"}


def test_summary_of_a_failed_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Boom(Callback):
        def on_validation_start(self, loop: TrainingLoop) -> None:
            raise KeyError("missing batch")

    model = torch.nn.Linear(4, 1)
    batches = [(torch.randn(4, 4), torch.randn(4, 1))]
    loop = TrainingLoop(
        training=batches,
        validation=batches,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.functional.mse_loss,
        callbacks=[Boom(), StructuredLogger(tmp_path / "events.jsonl")],
    )
    with pytest.raises(KeyError):
        loop.fit(model, 2)
    code, out, _ = run_main(["logs", "summary", str(tmp_path)], capsys)
    assert code == 0
    assert "outcome: failed with KeyError: 'missing batch'" in out
    assert run_main(["logs", "validate", str(tmp_path)], capsys)[0] == 0


# -- diagram and the module entry point ------------------------------------------------


def test_diagram_prints_the_machines_mermaid_diagram(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["diagram"], capsys)
    assert code == 0
    assert "stateDiagram" in out
    for event in ("fit_start", "inference_prediction_end", "fit_end"):
        assert event in out


def test_diagram_dot(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("graphviz")
    code, out, _ = run_main(["diagram", "--format", "dot"], capsys)
    assert code == 0 and out.startswith("digraph") and "inference_prediction_end" in out


def test_diagram_dot_without_graphviz_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from statemachine_loop import machine
    from statemachine_loop.errors import MissingDependencyError

    def missing(fmt: str) -> str:
        raise MissingDependencyError("The DOT diagram needs the graphviz Python package.")

    monkeypatch.setattr(machine, "lifecycle_diagram", missing)
    code, out, err = run_main(["diagram", "--format", "dot"], capsys)
    assert (code, out) == (2, "")
    assert err == "smloop: error: The DOT diagram needs the graphviz Python package.\n"


def test_python_dash_m_runs_the_cli(run_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "statemachine_loop.cli", "logs", "validate", str(run_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("valid: ")


def test_read_log_error_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_log(tmp_path / "nope")
    assert issubclass(LogReadError, ValueError)
