"""The daemon as a service: the systemd unit, the notify protocol on a real datagram socket,
graceful and forced shutdown, logs of a whole session, health, metrics and check-config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from dqm_daemon import cli
from dqm_daemon import metrics as metrics_module
from dqm_daemon.app import create_app
from dqm_daemon.middlewares import refuse_malformed_requests_in_json

from .conftest import (
    TOKEN,
    DaemonProcess,
    analysis_of,
    dqm_headers,
    free_port,
    make_settings,
    multipart_file,
)
from .rootfiles import th1f, write_one_histogram_file

REPOSITORY = Path(__file__).resolve().parents[1]
UNIT = REPOSITORY / "systemd" / "dqm-daemon.service"
CONSOLE_SCRIPT = Path(sys.executable).with_name("dqm-daemon")


# --- the unit ------------------------------------------------------------------------------

def test_unit_has_the_service_settings(tmp_path):
    """The unit asks for notify, watchdog, restarts (not after a bad config, which exits 2), a
    dynamic user, credentials, hardening."""
    text = UNIT.read_text()
    bad_config = tmp_path / "config.toml"
    bad_config.write_text("port = 'eighty'\n")
    assert cli.main(["serve", "--config", str(bad_config)]) == 2
    for directive in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "TimeoutStopSec=60",
                      "RestartPreventExitStatus=2", "StartLimitBurst=",
                      "DynamicUser=yes", "StateDirectory=dqm-daemon",
                      "LoadCredential=tokens:/etc/dqm-daemon/tokens.toml",
                      "--config /etc/dqm-daemon/config.toml", "NoNewPrivileges=yes",
                      "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                      "PrivateDevices=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                      "SystemCallFilter=@system-service", "LimitNOFILE="):
        assert directive in text, directive
    # systemd must wait longer than the daemon's own grace period.
    from dqm_daemon.settings import Settings
    assert 60 > Settings().shutdown_grace_seconds


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    """systemd itself finds nothing wrong with the unit (ExecStart pointed at this install)."""
    unit = tmp_path / "dqm-daemon.service"
    unit.write_text(UNIT.read_text().replace("/opt/dqm-daemon/bin/dqm-daemon",
                                             str(CONSOLE_SCRIPT)))
    finished = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                              text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "dqm-daemon.service" not in finished.stderr, finished.stderr


# --- notify protocol -----------------------------------------------------------------------

class NotifySocket:
    """A real datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, address: str, bind_to: str | bytes) -> None:
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(bind_to)
        self.socket.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        for _, message in self.messages:
            if key in message:
                return message
        while time.monotonic() < deadline:
            try:
                data = self.socket.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), message))
            if key in message:
                return message
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    listener = NotifySocket(str(path), str(path))
    yield listener
    listener.close()


def _healthz(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return int(probe.recv(64).split()[1])


def _start_notified(daemon: DaemonProcess, notify: NotifySocket, watchdog_usec: int | None):
    """Start the daemon the way systemd does: no health polling, just wait for READY=1."""
    environment = dict(os.environ, DQM_DAEMON_TOKEN=TOKEN, NOTIFY_SOCKET=notify.address,
                       **daemon.extra_env)
    if watchdog_usec:
        environment["WATCHDOG_USEC"] = str(watchdog_usec)
    log_file = open(daemon.log_path, "ab")  # noqa: SIM115 - closed with the process
    daemon.process = subprocess.Popen(
        [sys.executable, "-m", "dqm_daemon", "serve", "--port", str(daemon.port),
         "--data-dir", str(daemon.data_dir), *daemon.extra_args],
        stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    log_file.close()
    return notify.wait_for("READY", 30)


def test_ready_watchdog_status_and_stopping(daemon, notify_socket):
    """READY=1 comes once the daemon answers; WATCHDOG=1 at half the period; STOPPING=1 and
    exit 0 on SIGTERM."""
    ready = _start_notified(daemon, notify_socket, watchdog_usec=400_000)
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(daemon.process.pid)
    assert "uploads in flight: 0" in ready["STATUS"]
    assert _healthz(daemon.port) == 200  # listening by the time READY=1 arrives
    pings = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        notify_socket.wait_for("READY", 0)  # drain
        try:
            data = notify_socket.socket.recv(4096)
        except TimeoutError:
            continue
        if b"WATCHDOG=1" in data:
            pings.append(time.monotonic())
    assert len(pings) >= 6, pings  # every 0.2 s for 2 s (some slack for a busy machine)
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < 0.4  # never as late as the full watchdog period
    daemon.process.send_signal(signal.SIGTERM)
    stopping = notify_socket.wait_for("STOPPING", 10)
    assert stopping["STOPPING"] == "1"
    assert daemon.process.wait(timeout=30) == 0


async def test_status_says_stopping_while_uploads_finish(tmp_path, daemon, notify_socket):
    """After STOPPING=1 the watchdog pings go on while uploads finish, and every STATUS= they
    refresh still says the daemon is stopping."""
    daemon.configure("shutdown_grace_seconds = 1.5\n")
    await asyncio.to_thread(_start_notified, daemon, notify_socket, 200_000)
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        upload, _ = await _start_held_upload(session, daemon, content, run=8)
        daemon.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.process.wait, 30) == 0
        with contextlib.suppress(aiohttp.ClientError):
            await upload
    with contextlib.suppress(AssertionError):  # take in every message sent
        await asyncio.to_thread(notify_socket.wait_for, "NEVER-SENT", 0.5)
    messages = [message for _, message in notify_socket.messages]
    stopping_at = next(index for index, message in enumerate(messages) if "STOPPING" in message)
    after = [message["STATUS"] for message in messages[stopping_at:] if "STATUS" in message]
    assert len(after) >= 3, after  # pings every 0.1 s for the grace of 1.5 s
    assert all(status.startswith("stopping: ") for status in after), after


def test_ready_does_not_wait_for_start_up_recovery(daemon, notify_socket):
    """A file in the data directory the catalog does not know (a lost catalog), large: the
    daemon is READY while it is still adopting it, and a SIGTERM stops it part way through
    hashing it, rather than running into systemd's start or stop timeout."""
    daemon.data_dir.mkdir(parents=True)
    with open(daemon.data_dir / "EMChistos_1_DQM_2024_01_01_00_00_00.root", "wb") as unknown:
        unknown.truncate(16 << 30)  # sparse: 16 GiB to hash, several seconds here
    assert _start_notified(daemon, notify_socket, watchdog_usec=None)["READY"] == "1"
    assert _healthz(daemon.port) == 200
    assert '"file_adopted"' not in daemon.log_path.read_text(), "READY came after adoption"
    signalled = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=60) == 0
    assert time.monotonic() - signalled < 3, "the exit waited for the file's hash"
    assert '"file_adopted"' not in daemon.log_path.read_text()


async def test_a_shutdown_does_not_wait_for_a_commit_hashing_a_large_leftover(tmp_path, daemon):
    """An upload whose name is held on disk by a large file the catalog does not know (left by
    a crash) hashes that file to tell whether it is the same: a SIGTERM meanwhile stops the
    hashing, the upload is answered 503 (retry later), and the daemon exits at once."""
    daemon.data_dir.mkdir(parents=True)
    dqm = {"runNumber": "5", "timeStamp": "1700000000", "amoreAgent": "EMC"}
    leftover = daemon.data_dir / "EMChistos_5_DQM_2023_11_14_23_13_20.root"
    leftover.touch()
    os.truncate(leftover, 16 << 30)  # sparse: several seconds to hash
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        upload = asyncio.create_task(session.post(f"{daemon.url}/rest/api/files", data=content,
                                                  headers={"token": TOKEN, **dqm}))
        await asyncio.sleep(1.5)  # the upload (and adoption) hash the leftover
        signalled = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        async with await upload as answer:
            assert answer.status == 503, await answer.text()
            assert "shutting down" in (await answer.json())["message"]
        assert await asyncio.to_thread(daemon.process.wait, 60) == 0
    assert time.monotonic() - signalled < 3
    assert leftover.stat().st_size == 16 << 30  # left as it was, for the next start


def test_abstract_notify_socket(daemon):
    """An abstract $NOTIFY_SOCKET ('@name') works too."""
    name = f"dqm-daemon-test-{uuid.uuid4().hex}"
    listener = NotifySocket(f"@{name}", b"\0" + name.encode())
    try:
        assert _start_notified(daemon, listener, watchdog_usec=None)["READY"] == "1"
        daemon.process.send_signal(signal.SIGTERM)
        assert listener.wait_for("STOPPING", 10)["STOPPING"] == "1"
        assert daemon.process.wait(timeout=30) == 0
    finally:
        listener.close()


# --- shutdown ------------------------------------------------------------------------------

async def _slow_body(first: bytes, rest: bytes, go_on: asyncio.Event):
    yield first
    await go_on.wait()
    yield rest


async def _start_held_upload(session, daemon, content: bytes, run: int, framing: str = "chunked"):
    """An upload that sends its first kilobyte and then waits for `go_on`; returns once the
    daemon shows it in flight. `framing` "content-length" announces the length (the daemon
    reads such a body from the socket in a thread), "chunked" does not."""
    go_on = asyncio.Event()
    headers = dqm_headers(run=run, **{"Content-Type": "application/octet-stream"})
    if framing == "content-length":
        headers["Content-Length"] = str(len(content))
    upload = asyncio.create_task(session.post(
        f"{daemon.url}/rest/api/files", data=_slow_body(content[:1000], content[1000:], go_on),
        headers=headers))
    for _ in range(200):
        async with session.get(f"{daemon.url}/status.json") as response:
            if (await response.json())["uploads"]:
                return upload, go_on
        await asyncio.sleep(0.05)
    raise AssertionError("the upload never started")


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_sigterm_lets_upload_in_flight_finish(tmp_path, daemon, framing):
    """On SIGTERM new connections are refused, the upload in flight completes and is kept,
    and the daemon exits 0."""
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        upload, go_on = await _start_held_upload(session, daemon, content, run=5,
                                                 framing=framing)
        daemon.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", daemon.port), timeout=2).close()
        go_on.set()
        response = await upload
        body = await response.json()
        assert response.status == 200, body
        # A body of announced length was read by a thread: its answer closes the connection.
        assert (response.headers.get("Connection") == "close") == (framing == "content-length")
    assert await asyncio.to_thread(daemon.process.wait, 30) == 0
    assert (daemon.data_dir / body["filename"]).read_bytes() == content
    daemon.start()
    async with aiohttp.ClientSession(headers={"token": TOKEN}) as session:
        async with session.get(f"{daemon.url}/rest/api/files") as response:
            assert (await response.json())["files"] == [body["filename"]]


async def test_sigterm_answers_an_upload_waiting_for_its_check(tmp_path, daemon):
    """An upload received whole but still waiting for its check when the grace period after
    SIGTERM ends is answered 202 (kept, pending), not cut off; the next start checks it."""
    daemon.configure("inspection_budget_seconds = 60\ninspection_time_limit_seconds = 120\n"
                     "shutdown_grace_seconds = 2\n")
    daemon.command = [sys.executable, str(Path(__file__).with_name("faulty_daemon.py"))]
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        upload = asyncio.create_task(session.post(
            f"{daemon.url}/rest/api/files", data=content,
            headers={"token": TOKEN, "runNumber": "8", "timeStamp": "1", "amoreAgent": "HANG"}))
        for _ in range(200):  # received and cataloged: its check hangs
            if list(daemon.data_dir.glob("HANGhistos_8_*.root")):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        response = await upload
        body = await response.json()
        assert response.status == 202, body
        assert body["state"] == "pending"
        assert response.headers["Location"] == f"/rest/api/files/{body['filename']}/info"
    assert await asyncio.to_thread(daemon.process.wait, 30) == 0
    assert time.monotonic() - started < 10
    daemon.command = [sys.executable, "-m", "dqm_daemon"]  # real children from here on
    daemon.extra_args = []
    daemon.start()
    async with aiohttp.ClientSession(headers={"token": TOKEN}) as session:
        for _ in range(200):
            async with session.get(f"{daemon.url}{response.headers['Location']}") as answer:
                if (await answer.json())["state"] != "pending":
                    break
            await asyncio.sleep(0.05)
        assert (await answer.json())["state"] == "ok"


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_sigterm_grace_runs_out_and_nothing_partial_is_left(tmp_path, daemon, framing):
    """An upload that outlasts the grace period is dropped whole: no partial file anywhere,
    and the daemon exits in time (the upload's thread is stopped, not waited for)."""
    daemon.configure("shutdown_grace_seconds = 1\n")
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        upload, _ = await _start_held_upload(session, daemon, content, run=6, framing=framing)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.process.wait, 30) == 0
        assert time.monotonic() - started < 10
        with pytest.raises(aiohttp.ClientError):
            await upload
    assert list((daemon.data_dir / ".incoming").iterdir()) == []
    assert list(daemon.data_dir.glob("*.root")) == []
    # Logged as cut by the shutdown, not as a failure of the daemon's (a 5xx alert).
    (cut,) = [line for line in map(json.loads, daemon.log_path.read_text().splitlines())
              if line["event"] == "request" and line.get("method") == "POST"]
    assert (cut["status"], cut["cut_by_shutdown"]) == (503, True)


async def test_stopped_while_its_check_children_start_it_leaves_none_behind(daemon):
    """SIGTERM at once after start-up, while the check children still import: they are stopped
    with the daemon (an orphan would later die writing to a closed pipe, a traceback in the
    daemon's log), and every line logged is JSON."""
    daemon.start()
    daemon.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.process.wait, 30) == 0
    await asyncio.sleep(3)  # longer than a child takes to start
    lines = daemon.log_path.read_text().splitlines()
    assert [line for line in lines if not line.startswith("{")] == []
    assert json.loads(lines[-1])["event"] == "stopped"


async def test_second_signal_exits_at_once_without_partial_files(tmp_path, daemon):
    """A second SIGTERM ends the daemon at once; the half upload never shows under a name and
    its temporary is gone after the next start."""
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        upload, _ = await _start_held_upload(session, daemon, content, run=7)
        daemon.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(daemon.process.wait, 10)
        assert time.monotonic() - started < 3
        assert returncode == 128 + signal.SIGTERM
        with pytest.raises(aiohttp.ClientError):
            await upload
    assert list(daemon.data_dir.glob("*.root")) == []
    daemon.start()
    assert list((daemon.data_dir / ".incoming").iterdir()) == []


# --- logs ----------------------------------------------------------------------------------

async def test_logs_of_a_whole_session(tmp_path, daemon):
    """Every request and inspection gets one JSON line with its facts; no token, no content."""
    marker = "CONTENT-MARKER-7f3a"
    import uproot
    good = tmp_path / "good.root"
    with uproot.recreate(good) as root_file:
        root_file["h"] = th1f("h", marker, [1, 2, 3])
    daemon.start()
    async with aiohttp.ClientSession() as session:
        url = f"{daemon.url}/rest/api/files"
        async with session.post(url, data=multipart_file(good.read_bytes()),
                                headers=dqm_headers(run=11)) as response:
            assert response.status == 200
        async with session.post(url, data=b"not root " + marker.encode(),
                                headers=dqm_headers(run=12, agent="TPC")) as response:
            assert response.status == 400
        async with session.post(url, data=b"x", headers=dqm_headers(token="wrong-token")) as r:
            assert r.status == 401
        async with session.get(url, headers={"token": TOKEN}) as response:
            assert response.status == 200
    daemon.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.process.wait, 30) == 0
    text = daemon.log_path.read_text()
    assert TOKEN not in text and "wrong-token" not in text and marker not in text
    lines = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    requests = [line for line in lines if line["event"] == "request"]
    upload = next(line for line in requests if line.get("run") == 11)
    for field in ("request_id", "uploader", "agent", "run", "bytes", "duration_ms", "status",
                  "timestamp", "level"):
        assert field in upload, field
    assert (upload["uploader"], upload["agent"], upload["status"]) == ("env-token", "EMC", 200)
    assert upload["bytes"] == good.stat().st_size
    assert any(line["status"] == 401 for line in requests)
    inspections = [line for line in lines if line["event"] == "file_inspected"]
    assert {line["state"] for line in inspections} == {"ok", "invalid"}
    assert all(line["duration_ms"] >= 0 for line in inspections)
    assert {"listening", "stopped"} <= {line["event"] for line in lines}


async def test_requests_the_http_parser_refuses(daemon):
    """Requests aiohttp's parser refuses before any handler runs (a control character in the
    token's line, a line too long, not HTTP at all) are answered in the API's JSON shape and
    logged as one JSON warning each (but for the one that is not HTTP at all: aiohttp keeps
    what port scanners send out of the log); the token they carried is in neither."""
    daemon.start()
    refused = [
        (b"POST /rest/api/files HTTP/1.1\r\nHost: x\r\ntoken: " + TOKEN.encode()
         + b"\x7f\r\nContent-Length: 4\r\n\r\nroot", "Malformed HTTP request"),
        (b"GET /rest/api/files HTTP/1.1\r\nHost: x\r\ntoken: " + TOKEN.encode() + b"x" * 9000
         + b"\r\n\r\n", "A request line or header is too long"),
        (TOKEN.encode() + b"\r\n\r\n", "Not an HTTP request"),
    ]
    for request, message in refused:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400", answer[:300]
        assert b"application/json" in head
        assert json.loads(body) == {"status": 400, "message": message}
        assert TOKEN.encode() not in answer
    daemon.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.process.wait, 30) == 0
    text = daemon.log_path.read_text()
    assert TOKEN not in text
    lines = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    warnings = [line for line in lines if line["event"] == "http_request_refused"]
    # (aiohttp's C parser calls the first one BadHttpMessage, its Python one InvalidHeader)
    assert len(warnings) == 2 and warnings[1]["refused_request"]["error"] == "LineTooLong"
    assert all((line["level"], line["refused_request"]["status"], line["refused_request"]["remote"])
               == ("warning", 400, "127.0.0.1") for line in warnings)


async def test_a_failure_past_every_middleware_is_answered_in_json():
    """What escapes every middleware (here a handler's timeout, which aiohttp answers 504) gets
    the JSON shape with the status's phrase, no traceback: the connection handler's own answer
    path, on a real socket."""
    app = web.Application()

    async def times_out(request: web.Request) -> web.Response:
        raise TimeoutError

    app.router.add_get("/", times_out)
    runner = web.AppRunner(app)
    await runner.setup()
    refuse_malformed_requests_in_json(runner)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        await runner.cleanup()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"504", answer[:300]
    assert json.loads(body) == {"status": 504, "message": "Gateway Timeout"}


async def test_a_second_daemon_on_the_same_data_directory_stops_before_touching_it(
        tmp_path, daemon):
    """A second daemon started on a data directory in use (by hand, a second unit) exits 2
    (no restart by systemd) with one clear line, before it removes the first one's
    temporaries; the first goes on. Once the first is gone, even killed, it starts."""
    from .conftest import DaemonProcess

    daemon.start()
    in_flight = daemon.data_dir / ".incoming" / "an-upload-streaming.part"
    in_flight.write_bytes(b"half an upload")
    second = DaemonProcess(daemon.data_dir, tmp_path / "second.log")
    try:
        with pytest.raises(RuntimeError, match="daemon exited"):
            second.start()
        assert second.process.wait(timeout=30) == 2
        lines = [json.loads(line) for line in second.log_path.read_text().splitlines()]
        assert any(line["event"] == "startup_failed" and "in use by another dqm-daemon"
                   in line["error"] for line in lines), lines
        assert in_flight.read_bytes() == b"half an upload"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{daemon.url}/healthz") as answer:
                assert answer.status == 200
        daemon.kill(signal.SIGKILL)
        second.start()
        assert not in_flight.exists()
    finally:
        if second.process is not None and second.process.poll() is None:
            second.kill(signal.SIGKILL)


def test_console_logs_on_a_terminal(tmp_path):
    """On a terminal the logs are readable console lines, not JSON."""
    port = DaemonProcess(tmp_path / "d", tmp_path / "log").port
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "dqm_daemon", "serve", "--port", str(port), "--data-dir",
         str(tmp_path / "d")], stdout=terminal, stderr=terminal, stdin=subprocess.DEVNULL,
        env=dict(os.environ, DQM_DAEMON_TOKEN=TOKEN))
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + 30
    try:
        while b"listening" not in output and time.monotonic() < deadline:
            try:
                output += os.read(controller, 4096)
            except OSError:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        os.close(controller)
    listening = next(line for line in output.decode(errors="replace").splitlines()
                     if "listening" in line)
    assert not listening.lstrip().startswith("{")
    assert TOKEN not in output.decode(errors="replace")


# --- health and metrics --------------------------------------------------------------------

async def test_healthz_503_when_data_dir_not_writable(client, data_dir):
    """/healthz answers 503 naming the problem when uploads could not be written."""
    incoming = data_dir / ".incoming"
    incoming.rename(data_dir / "incoming-moved")
    incoming.write_text("not a directory any more")
    response = await client.get("/healthz")
    body = await response.json()
    assert response.status == 503
    assert body["problems"] == ["data directory not writable"]


async def test_a_vanished_data_directory_is_reported_not_a_500(client, data_dir):
    """The data directory removed under the daemon (an unmounted disk, say): /healthz says what
    is wrong with 503, the status page and the metrics still answer, uploads get 507."""
    shutil.rmtree(data_dir)
    response = await client.get("/healthz")
    assert response.status == 503
    assert "data directory not writable" in (await response.json())["problems"]
    assert (await client.get("/status.json")).status == 200
    assert (await client.get("/metrics")).status == 200
    response = await client.post("/rest/api/files", data=b"x" * 100, headers=dqm_headers())
    assert response.status == 507


async def test_a_broken_catalog_is_reported_and_the_pages_still_answer(client, data_dir,
                                                                      one_histogram_file):
    """The catalog's file damaged under the daemon: the status page and its JSON still answer
    with the live state and an ERROR banner saying what failed, /metrics answers, and
    /healthz gives 503 with the same reason."""
    response = await client.post("/rest/api/files", data=multipart_file(one_histogram_file),
                                 headers=dqm_headers())
    assert response.status == 200
    path = data_dir / "catalog.sqlite3"
    with sqlite3.connect(path) as other:  # everything into the main file, then overwrite it
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    other.close()
    with path.open("r+b") as catalog_file:
        catalog_file.seek(100)  # past SQLite's header: the tables' pages
        catalog_file.write(b"\xff" * (path.stat().st_size - 100))
    response = await client.get("/status.json")
    assert response.status == 200
    report = await response.json()
    assert report["catalog_readable"] is False
    assert report["level"] == "ERROR"
    assert "catalog failing: database disk image is malformed" in report["reasons"]
    assert report["inspection"]["workers"] == 2 and report["latest_files"] == []
    page = await client.get("/status")
    assert page.status == 200
    text = await page.text()
    assert "catalog failing: database disk image is malformed" in text
    assert "unknown: the catalog cannot be read" in text
    assert (await client.get("/metrics")).status == 200
    response = await client.get("/healthz")
    assert response.status == 503
    assert "catalog failing: database disk image is malformed" in (await response.json())["problems"]


async def test_healthz_503_when_disk_below_reserve(aiohttp_client, data_dir):
    """/healthz answers 503 when free disk is under the reserve."""
    client = await aiohttp_client(create_app(make_settings(data_dir, disk_reserve_bytes=1 << 60)))
    response = await client.get("/healthz")
    assert response.status == 503
    assert "free disk below the reserve" in (await response.json())["problems"][0]


@pytest.mark.parametrize("command", [("/bin/false",), ("/nonexistent/python",)])
async def test_healthz_503_when_inspection_cannot_run(aiohttp_client, data_dir,
                                                     one_histogram_file, command):
    """/healthz answers 503 when the inspection worker cannot start its child: one that exits
    at once, or one that cannot even be executed."""
    settings = make_settings(data_dir, inspection_workers=1, inspection_budget_seconds=0.3)
    client = await aiohttp_client(create_app(settings, inspection_command=command))
    await client.post("/rest/api/files", data=one_histogram_file, headers=dqm_headers())
    for _ in range(100):
        response = await client.get("/healthz")
        if response.status == 503:
            break
        await asyncio.sleep(0.05)
    assert response.status == 503
    assert "inspection child cannot start" in (await response.json())["problems"][0]


async def test_metrics(client, one_histogram_file):
    """/metrics counts uploads by result and agent, bytes, durations, files by state."""
    await client.post("/rest/api/files", data=multipart_file(one_histogram_file),
                      headers=dqm_headers(agent="EMC"))
    await client.post("/rest/api/files", data=multipart_file(one_histogram_file),
                      headers=dqm_headers(agent="EMC"))  # the same file again
    await client.post("/rest/api/files", data=b"garbage", headers=dqm_headers(agent="TPC"))
    await client.post("/rest/api/files", data=b"x", headers=dqm_headers(runNumber="x"))
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("dqm_uploads_total", (("agent", "EMC"), ("result", "ok")))] == 1
    assert samples[("dqm_uploads_total", (("agent", "EMC"), ("result", "duplicate")))] == 1
    assert samples[("dqm_uploads_total", (("agent", "TPC"), ("result", "invalid")))] == 1
    assert samples[("dqm_uploads_total", (("agent", "unknown"), ("result", "rejected")))] == 1
    assert samples[("dqm_received_bytes_total", ())] == 2 * len(one_histogram_file) + 7
    assert samples[("dqm_upload_duration_seconds_count", ())] == 4
    assert samples[("dqm_inspection_duration_seconds_count", (("result", "ok"),))] == 1
    assert samples[("dqm_files", (("state", "ok"),))] == 1
    assert samples[("dqm_files", (("state", "invalid"),))] == 1
    assert samples[("dqm_inspection_queue_depth", ())] == 0
    assert samples[("dqm_uploads_in_flight", ())] == 0
    assert samples[("dqm_free_disk_bytes", ())] > 0
    assert samples[("dqm_last_upload_timestamp_seconds", (("agent", "EMC"),))] > time.time() - 60


async def test_metrics_agent_labels_are_bounded(client, one_histogram_file, monkeypatch):
    """Agent names come from the clients: past MAX_AGENT_LABELS distinct ones, further agents
    share one label rather than each adding series for the daemon's whole life."""
    monkeypatch.setattr(metrics_module, "MAX_AGENT_LABELS", 3)  # "unknown" is not among them
    for agent in ("A1", "A2", "A3", "A4", "A5"):
        await client.post("/rest/api/files", data=b"", headers=dqm_headers(agent=agent))
    response = await client.get("/metrics")
    labels = {family_sample.labels["agent"]
              for family in text_string_to_metric_families(await response.text())
              if family.name == "dqm_uploads"
              for family_sample in family.samples if family_sample.name == "dqm_uploads_total"}
    assert labels == {"A1", "A2", "A3", metrics_module.OTHER_AGENTS}


async def test_agents_long_gone_neither_crowd_the_pages_nor_take_the_labels(
        aiohttp_client, data_dir, one_histogram_file):
    """Every agent name a client ever sent stays in the catalog: after a restart, 600 names
    last heard a month ago are on no page and take no metric label from the agent at work."""
    first = await aiohttp_client(create_app(make_settings(data_dir)))
    response = await first.post("/rest/api/files", data=one_histogram_file,
                                headers=dqm_headers(agent="EMC"))
    assert response.status == 200
    await first.close()
    with sqlite3.connect(data_dir / "catalog.sqlite3") as catalog:
        catalog.executemany(
            "INSERT INTO agents VALUES (?, 1, 'old.root', '2026-10-01T00:00:00.000000Z', 1, NULL)",
            [(f"A{number:03}",) for number in range(600)])
    restarted = await aiohttp_client(create_app(make_settings(data_dir)))
    status = await (await restarted.get("/status.json")).json()
    assert [agent["agent"] for agent in status["agents"]] == ["EMC"]
    response = await restarted.get("/metrics")
    labels = {family_sample.labels["agent"]
              for family in text_string_to_metric_families(await response.text())
              if family.name == "dqm_last_upload_timestamp_seconds"
              for family_sample in family.samples}
    assert labels == {"EMC"}


# --- configuration -------------------------------------------------------------------------

def _check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    config = tmp_path / "config.toml"
    config.write_text(text)
    environment = {key: value for key, value in os.environ.items() if key != "DQM_DAEMON_TOKEN"}
    return subprocess.run([sys.executable, "-m", "dqm_daemon", "check-config", "--config",
                           str(config)], capture_output=True, text=True, env=environment,
                          timeout=60)


def test_check_config_prints_effective_settings_without_tokens(tmp_path):
    """check-config prints every effective setting, naming uploaders but never their tokens."""
    finished = _check_config(tmp_path, 'port = 9999\n[tokens]\nemc = "very-secret-token"\n')
    assert finished.returncode == 0, finished.stderr
    effective = json.loads(finished.stdout)
    assert effective["port"] == 9999 and effective["host"] == "127.0.0.1"
    assert effective["tokens"] == ["emc"]
    assert "very-secret-token" not in finished.stdout


@pytest.mark.parametrize(("text", "message"), [
    ("colour = 1\n[tokens]\na = 'b'\n", "colour: unknown setting"),
    ("port = 'x'\n[tokens]\na = 'b'\n", "port: expected an integer"),
    ("read_timeout_seconds = -1\n[tokens]\na = 'b'\n", "read_timeout_seconds: -1"),
])
def test_check_config_refuses_bad_configs(tmp_path, text, message):
    """A bad value or an unknown key is an error naming the key."""
    finished = _check_config(tmp_path, text)
    assert finished.returncode == 2
    assert message in finished.stderr


async def test_tokens_from_systemd_credentials(tmp_path, daemon):
    """Tokens given by LoadCredential= ($CREDENTIALS_DIRECTORY/tokens) are accepted."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "tokens").write_text('tpc-agent = "credential-token-1"\n')
    daemon.extra_env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/rest/api/files", data=content,
                                headers=dqm_headers(token="credential-token-1")) as response:
            assert response.status == 200
    daemon.kill()
    log_text = daemon.log_path.read_text()
    assert '"uploader": "tpc-agent"' in log_text and "credential-token-1" not in log_text


async def test_ctrl_c_to_the_process_group_does_not_fail_inspections(tmp_path, daemon):
    """SIGINT to the whole process group (Ctrl-C in a terminal) while a file is analysed:
    the daemon shuts down cleanly and, after a restart, the analysis is done, not failed."""
    from .rootfiles import write_many_histograms_file

    daemon.start()
    content = write_many_histograms_file(tmp_path / "many.root", 1500).read_bytes()
    async with aiohttp.ClientSession(headers={"token": TOKEN}) as session:
        async with session.post(f"{daemon.url}/rest/api/files", data=content,
                                headers=dqm_headers(run=21)) as response:
            assert response.status == 200
            name = (await response.json())["filename"]
        await asyncio.sleep(0.3)  # the analysis child is now at work
        async with session.get(f"{daemon.url}/rest/api/files/{name}/info") as response:
            assert (await response.json())["analysis"] == "pending"
    os.killpg(daemon.process.pid, signal.SIGINT)
    assert await asyncio.to_thread(daemon.process.wait, 30) == 0
    daemon.start()
    details = await analysis_of(daemon.url, name)
    assert (details["state"], details["analysis"]) == ("ok", "done"), details


async def test_a_start_that_fails_gives_the_data_directory_back(tmp_path):
    """A start that fails after taking the data directory (its catalog cannot be opened)
    releases it: the next start in the same process is not refused as a second daemon."""
    from aiohttp import web

    from dqm_daemon.app import create_app
    from dqm_daemon.storage import Storage

    from .conftest import make_settings

    settings = make_settings(tmp_path / "data")
    settings.catalog_path.parent.mkdir(parents=True)
    settings.catalog_path.mkdir()  # not a file: SQLite cannot open it
    runner = web.AppRunner(create_app(settings))
    with pytest.raises(Exception):  # noqa: B017, PT011 (whatever SQLite says)
        await runner.setup()
    await runner.cleanup()
    storage = Storage(settings)
    storage.prepare()  # DataDirectoryInUse if the failed start still held it
    storage.release()
