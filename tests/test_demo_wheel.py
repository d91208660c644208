"""`specvlm demo` runs from a plain (wheel) install, not only from a source checkout: the wheel is built once,
installed with `--no-deps` into a fresh virtual environment that borrows this environment's dependencies (torch,
transformers, Gradio: nothing is downloaded), and the installed `specvlm demo` is started outside the repository
just long enough to answer HTTP requests on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason='the demo needs Gradio: pip install -e ".[test]" installs it')

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def build_wheel(folder: Path) -> Path:
    """The project's wheel, built from a copy of the source tree (so no build files land in the checkout)."""
    source = folder / "source"
    shutil.copytree(
        REPO_ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".venv*", ".gradio", "results"
        ),
    )
    # with setuptools here, build offline with it; else pip fetches the build backend (as `pip install -e .` did)
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            *isolation,
            "--quiet",
            "--wheel-dir",
            str(folder / "dist"),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    return next((folder / "dist").glob("specvlm_hf-*.whl"))


def fresh_venv(folder: Path) -> Path:
    """A new virtual environment whose own site-packages comes first, and which sees this environment's
    site-packages after it (a plain path in a .pth file: the editable install's finder there is not activated)."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_specvlm_demo_serves_from_a_wheel_installed_in_a_fresh_venv(tmp_path):
    started = time.perf_counter()
    wheel = build_wheel(tmp_path)
    venv = fresh_venv(tmp_path)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--quiet",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import specvlm_hf; print(specvlm_hf.__file__)"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    installed = Path(where).parent
    assert installed.is_relative_to(venv), f"specvlm_hf imported from {where}, not the wheel"
    assert (installed / "demo_app.py").is_file() and (installed / "demo_examples" / "scene-7070-60.png").is_file()

    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp_path / "uploads"),
        "PYTHONPATH": "",
        "OMP_NUM_THREADS": "1",
    }
    log = open(tmp_path / "demo.log", "w")
    demo = subprocess.Popen(
        [str(venv / "bin" / "specvlm"), "demo", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.perf_counter() + STARTUP_SECONDS
        status = None
        while time.perf_counter() < deadline and demo.poll() is None:
            try:
                status, page = get(f"http://127.0.0.1:{port}/")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        output = (tmp_path / "demo.log").read_text()
        assert status == 200, f"no answer (exit {demo.poll()}):\n{output[-3000:]}"
        assert b"SpecVLM demo" in page
        example = installed / "demo_examples" / "scene-7070-60.png"
        assert get(f"http://127.0.0.1:{port}/gradio_api/file={example}")[0] == 200, "the packaged examples are served"
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        try:
            demo.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        log.close()
    assert time.perf_counter() - started < 600
