"""`errors.write_atomic`, which every file a run, a compile store or a warm-up writes for later goes through: a
reader sees the old file or the new one, never part of one, and a failed write leaves nothing behind."""

from __future__ import annotations

import os

import pytest

from specvlm_hf.errors import write_atomic


def test_text_and_bytes_replace_the_file_whole_and_leave_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_atomic(path, '{"step": 1}\n')
    assert path.read_text() == '{"step": 1}\n'
    write_atomic(str(path), b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "latest"
    path.write_text("checkpoint-2\n")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "checkpoint-4\n")
    assert path.read_text() == "checkpoint-2\n"
    assert os.listdir(tmp_path) == ["latest"]


def test_two_writers_of_one_file_use_temporaries_of_their_own(tmp_path, monkeypatch):
    """A server's processes may save the same compiled round's description at once: each writes its own
    temporary file, so neither renames a file the other is still writing."""
    import tempfile

    made = []
    mkstemp = tempfile.mkstemp

    def recorded(*args, **kwargs):
        made.append(mkstemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkstemp", recorded)
    path = tmp_path / "verify-abc.json"
    write_atomic(path, "one")
    write_atomic(path, "two")
    assert len({name for _, name in made}) == 2 and all(os.path.dirname(n) == str(tmp_path) for _, n in made)
    assert path.read_text() == "two"
