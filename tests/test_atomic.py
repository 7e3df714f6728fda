"""raydrat.atomic: a file replaced whole, or left as it was."""

from __future__ import annotations

import os

import pytest

from raydrat.atomic import replacing, write_text


def test_write_text_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    for durable in (False, True):
        assert write_text(path, f"new {durable} ü", durable=durable) == path
        assert path.read_text(encoding="utf-8") == f"new {durable} ü"
    assert os.listdir(tmp_path) == ["record.json"]


def test_a_write_that_fails_leaves_the_old_content_and_no_temporary_file(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("complete")
    with pytest.raises(RuntimeError, match="disk full"), replacing(path) as tmp:
        tmp.write_text("half of the ne")
        assert tmp.parent == tmp_path and tmp.name.startswith(".")  # beside it: one filesystem, one rename
        raise RuntimeError("disk full")
    assert path.read_text() == "complete"
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_a_missing_folder_is_an_error_before_anything_is_written(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_text(tmp_path / "absent" / "state.json", "{}")
    assert os.listdir(tmp_path) == []
