"""`specvlm push` never hangs and answers in one line: a server that accepts connections but never answers times
out, a missing token is found before anything is sent, a refused token or a closed port says what to do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from specvlm_hf.cli import main
from test_hub_server import hub  # noqa: F401  (the `hub` fixture)
from tiny_models import oracle_draft, tiny_llava


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("push") / "draft"
    oracle_draft(tiny_llava()).save_pretrained(folder)
    return folder


@pytest.fixture
def online(monkeypatch):
    """The suite runs offline; these tests talk to servers on 127.0.0.1 only."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


@contextmanager
def silent_server():
    """A socket on 127.0.0.1 that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield sock, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def push(capsys, *argv):
    start = time.perf_counter()
    status = main(["push", *map(str, argv)])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return status, lines[0], seconds


def test_push_to_a_server_that_never_answers_stops_at_the_timeout_in_one_line(capsys, online, draft_folder):
    with silent_server() as (_, url):
        status, line, seconds = push(
            capsys, draft_folder, "me/draft", "--endpoint", url, "--token", "hf_x", "--timeout", 2
        )
    assert status == 1
    assert line == (
        f"specvlm push: error: the Hub at {url} did not answer within 2 s; check the address (--endpoint / "
        "HF_ENDPOINT) and your network, or allow more time with --timeout."
    )
    assert seconds < 20, f"took {seconds:.0f} s"


def test_push_without_a_token_sends_nothing_and_says_how_to_log_in(tmp_path, draft_folder):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE")
    }
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0")
    with silent_server() as (sock, url):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "specvlm_hf.cli", "push", str(draft_folder), "me/draft", "--endpoint", url],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        seconds = time.perf_counter() - start
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.accept()  # nobody connected
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "specvlm push: error: No Hugging Face token: run `hf auth login`, set HF_TOKEN, or "
        "pass --token (a token with write access to the repo's namespace)."
    )
    assert seconds < 60


def test_a_refused_token_is_one_line_that_says_to_log_in_again(capsys, hub, draft_folder):  # noqa: F811
    status, line, _ = push(capsys, draft_folder, "me/draft", "--endpoint", hub.url, "--token", "hf_wrong")
    assert status == 1
    assert f"the Hub at {hub.url} refused the token (401 Unauthorized" in line
    assert "log in again with `hf auth login`, or pass a valid --token / HF_TOKEN." in line
    assert hub.repos == {}


def test_a_closed_port_is_one_line_that_names_the_address(capsys, online, draft_folder):
    with silent_server() as (_, url):
        pass  # closed again: nothing listens there now
    status, line, seconds = push(capsys, draft_folder, "me/draft", "--endpoint", url, "--token", "hf_x")
    assert status == 1
    assert line.startswith(f"specvlm push: error: Could not connect to the Hub at {url} (")
    assert line.endswith("check the address (--endpoint / HF_ENDPOINT) and your network.")
    assert seconds < 20


def test_a_folder_that_is_not_a_draft_is_one_line(capsys, tmp_path):
    status, line, _ = push(capsys, tmp_path, "me/draft", "--token", "hf_x")
    assert status == 2 and "is not a saved SpecVLM draft" in line and "draft.save_pretrained(folder)" in line
