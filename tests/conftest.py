"""Fixtures: settings on tmp_path, an in-process client on a real socket, the real daemon as a
subprocess, and the shared real ROOT files when they are present."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from dqm_daemon.app import create_app
from dqm_daemon.settings import Settings

from .rootfiles import write_one_histogram_file

TOKEN = "test-token-0123456789"
UPLOADER_NAME = "emc-agent"
SHARED_ROOT_FILES = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "root"


def make_settings(data_dir: Path, **overrides) -> Settings:
    return Settings(data_dir=data_dir, tokens={TOKEN: UPLOADER_NAME}, **overrides)


def dqm_headers(run: int = 123456, timestamp: int = 140844, agent: str = "EMC", **extra) -> dict:
    headers = {"token": TOKEN, "runNumber": str(run), "timeStamp": str(timestamp),
               "amoreAgent": agent}
    headers.update(extra)
    return headers


def multipart_file(content: bytes, filename: str = "upload.root") -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", io.BytesIO(content), filename=filename, content_type="application/octet-stream")
    return form


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return make_settings(data_dir)


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def one_histogram_file(tmp_path: Path) -> bytes:
    return write_one_histogram_file(tmp_path / "one_histogram.root").read_bytes()


@pytest.fixture
def shared_root_files() -> list[Path]:
    """The real ROOT files beside the project; the test is skipped where they are absent."""
    if not SHARED_ROOT_FILES.is_dir():
        pytest.skip(f"{SHARED_ROOT_FILES} is absent")
    files = sorted(SHARED_ROOT_FILES.glob("*.root"))
    if not files:
        pytest.skip(f"no ROOT files in {SHARED_ROOT_FILES}")
    return files


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DaemonProcess:
    """The real `dqm-daemon serve` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, data_dir: Path, log_path: Path, extra_args: list[str] | None = None):
        self.data_dir = data_dir
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        environment = dict(os.environ, DQM_DAEMON_TOKEN=TOKEN)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dqm_daemon", "serve", "--port", str(self.port),
                 "--data-dir", str(self.data_dir), *self.extra_args],
                stdout=log_file, stderr=subprocess.STDOUT, env=environment,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                    probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if probe.recv(16).startswith(b"HTTP/1.1 200"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("daemon did not become healthy in time")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=30)

    def rss_kib(self, field: str = "VmRSS") -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path / "daemon-data", tmp_path / "daemon.log")
    yield process
    if process.process is not None and process.process.poll() is None:
        process.kill(signal.SIGKILL)
