"""Fixtures: settings on tmp_path, an in-process client on a real socket, the real daemon as a
subprocess, and the shared real ROOT files when they are present."""

from __future__ import annotations

import asyncio
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
from dqm_daemon.appkeys import UPLOADS
from dqm_daemon.settings import Settings

from .rootfiles import write_dqm_file, write_one_histogram_file, write_shift_file

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
        self.extra_env: dict[str, str] = {}
        self.command = [sys.executable, "-m", "dqm_daemon"]  # or tests/faulty_daemon.py
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def configure(self, toml_text: str) -> None:
        """Start (and restart) with this config file, written beside the data directory."""
        config = self.data_dir.parent / "config.toml"
        config.write_text(toml_text)
        self.extra_args = ["--config", str(config)]

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        environment = dict(os.environ, DQM_DAEMON_TOKEN=TOKEN, **self.extra_env)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [*self.command, "serve", "--port", str(self.port),
                 "--data-dir", str(self.data_dir), *self.extra_args],
                stdout=log_file, stderr=subprocess.STDOUT, env=environment,
                start_new_session=True,  # its own process group, as under a terminal or systemd
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


# Agent times of the prepared run: an hour ago, so names and pages look like a live run.
RUN_START = int(time.time()) - 3600
# Scaled-down time: agents send every few tenths of a second, silence shows within a second.
FAST_CLOCK = dict(silent_after_intervals=2.0, silent_minimum_seconds=0.5,
                  default_agent_interval_seconds=0.3)


async def _post(client, content: bytes, **header_values) -> dict:
    response = await client.post("/rest/api/files", data=multipart_file(content),
                                 headers=dqm_headers(**header_values))
    return await response.json()


@pytest.fixture
async def control_room(aiohttp_client, data_dir, tmp_path):
    """A receiver mid-run: EMC started run 100 and went silent, TPC started and ended it, MFT
    sends without a start, TRD sent an invalid file, and LIVE is uploading right now."""
    client = await aiohttp_client(create_app(make_settings(data_dir, **FAST_CLOCK)))
    content = write_shift_file(tmp_path / "dqm.root", seed=1).read_bytes()
    other = write_dqm_file(tmp_path / "dqm2.root", n_histograms=2).read_bytes()
    files = {}
    files["emc_start"] = await _post(client, content, agent="EMC", run=100, timestamp=RUN_START,
                                     dataStatus="1")
    files["emc_next"] = await _post(client, other, agent="EMC", run=100, timestamp=RUN_START + 60)
    files["tpc_start"] = await _post(client, content, agent="TPC", run=100, timestamp=RUN_START,
                                     dataStatus="1")
    files["tpc_end"] = await _post(client, content, agent="TPC", run=100, timestamp=RUN_START + 120,
                                   dataStatus="2")
    files["mft"] = await _post(client, content, agent="MFT", run=101, timestamp=RUN_START + 300)
    files["trd_bad"] = await _post(client, b"not a ROOT file\n" * 30, agent="TRD", run=101,
                                   timestamp=RUN_START + 301)
    await asyncio.sleep(1.0)  # EMC's usual interval is ~0.1 s: it is now silent
    release = asyncio.Event()

    async def live_body():
        yield content[:5000]
        await release.wait()
        yield content[5000:]

    live = asyncio.create_task(client.post("/rest/api/files", data=live_body(),
                                           headers=dqm_headers(agent="LIVE", run=102)))
    while not client.server.app[UPLOADS].snapshot() or \
            client.server.app[UPLOADS].snapshot()[0].received_bytes == 0:
        await asyncio.sleep(0.01)
    yield client, files
    release.set()
    await live


async def analysis_of(base_url: str, name: str, timeout: float = 60.0) -> dict:
    """A file's info from a running daemon once its analysis is no longer pending."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(headers={"token": TOKEN}) as session:
        while True:
            async with session.get(f"{base_url}/rest/api/files/{name}/info") as response:
                details = await response.json()
            if details["analysis"] != "pending" or time.monotonic() > deadline:
                return details
            await asyncio.sleep(0.1)
