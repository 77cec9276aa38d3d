"""``make_directory``: what the writing callbacks call at every fit start."""

from __future__ import annotations

from pathlib import Path

import pytest

from statemachine_loop.callbacks._files import make_directory


def test_it_creates_missing_parents_and_accepts_an_existing_directory(tmp_path: Path) -> None:
    nested = tmp_path / "run" / "deep" / "er"
    make_directory(nested)
    assert nested.is_dir()
    (nested / "kept.txt").write_text("still here")
    make_directory(nested)  # the usual case from the second fit on
    assert (nested / "kept.txt").read_text() == "still here"


def test_a_file_in_the_way_is_an_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    with pytest.raises(FileExistsError) as info:
        make_directory(blocker)
    assert info.value.filename == str(blocker)
