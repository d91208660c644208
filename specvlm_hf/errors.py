"""Errors a user can cause and fix, how the command line shows them, and the file checks that find them early.

`UserError` is a `ValueError` whose message names the problem and the fix in one line; `specvlm` prints it
as one line (the traceback only with `--debug` or `SPECVLM_DEBUG=1`). Library code raises it (or a subclass)
wherever the cause is an input, a file or a setting rather than a bug.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class UserError(ValueError):
    """A problem the user can fix; the message says what is wrong and what to do, in one line."""

    exit_status = 2


class EnvironmentProblem(UserError):
    """A problem outside the command line: the network, a server, the disk (exit status 1)."""

    exit_status = 1


def write_atomic(path, data: str | bytes) -> None:
    """Writes `data` to `path` through a temporary file of its own in the same folder, then renamed over `path`: a
    reader (another process, or this one after a crash) finds the old file or the new one, never part of one, and
    two writers never share a temporary file."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb" if isinstance(data, bytes) else "w") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def read_json(path, what: str = "") -> object:
    """The parsed JSON of `path`; a malformed file raises `UserError` naming the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); {what or 'fix or replace the file'}."
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(json_error_message(path, error, what)) from None


def json_error_message(path, error: json.JSONDecodeError, what: str = "", line_offset: int = 0) -> str:
    """`FILE line L column C: problem; fix` for a `JSONDecodeError` (`line_offset` for JSON-lines records)."""
    fix = what or "fix the file (or re-save it with the tool that wrote it)"
    if not error.doc.strip():
        return f"{path} is empty, not JSON; {fix}."
    return f"{path} line {error.lineno + line_offset} column {error.colno}: invalid JSON ({error.msg}); {fix}."


def check_writable_folder(folder, flag: str = "--output-dir") -> None:
    """Creates `folder` if needed and writes (then deletes) a probe file in it, so that a folder on a read-only
    filesystem, without permission, or under a file is refused before any work is done."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise EnvironmentProblem(
            f"{flag} {folder} is not writable ({error.strerror or error}); pass a folder you can write to."
        ) from None
