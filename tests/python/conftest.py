"""Starts one `mlxd serve` process on a free loopback port for the Python client tests."""

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Every test server's log of the latest run, one file per server (`mlxd-<port>.log`), kept so
#: that a failure can be read afterwards (a test's own output does not show the server's side).
LOGS = ROOT / "target" / "test-server-logs"


def pytest_sessionstart(session):
    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True, exist_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(extra_args, model=None):
    """Starts `mlxd serve` on `model` (default: the repo's stories260k) with `extra_args`;
    yields its base URL, then stops it."""
    binary = os.environ.get("MLXD_BIN", str(ROOT / "target" / "debug" / "mlxd"))
    port = _free_port()
    model = model or ROOT / "models" / "stories260k"
    # The log goes to a file, not a pipe nobody reads: a server's log outgrowing the pipe's
    # buffer would block it mid-request.
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / f"mlxd-{port}.log", "w+b")
    proc = subprocess.Popen(
        [binary, "serve", "--model", str(model), "--port", str(port),
         "--kv-memory", "64MiB", *extra_args],
        stdout=subprocess.DEVNULL,
        stderr=log,
        # Hermetic: the machine's own Ollama store and Hugging Face cache are not offered.
        env={**os.environ, "OLLAMA_MODELS": "/nonexistent/mlxd-tests", "HF_HUB_CACHE": "/nonexistent/mlxd-tests"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"mlxd exited early: {log.read().decode()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("mlxd did not become healthy within 60 s")
        time.sleep(0.1)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


#: The key the keyed server requires.
API_KEY = "sk-test-key"


@pytest.fixture(scope="session")
def server_url():
    yield from _start([])


@pytest.fixture(scope="session")
def keyed_server_url():
    yield from _start(["--api-key", API_KEY])
