"""The reference uploader `dqm-daemon upload`, against the real daemon: output, refusals, token
handling, retries through 503s and dropped connections, and never a second copy."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from dqm_daemon import client as client_module
from dqm_daemon.client import EXIT_USAGE, UploadOptions, upload_all

from .conftest import TOKEN, dqm_headers, free_port
from .rootfiles import write_dqm_file, write_one_histogram_file


async def run_client(*arguments: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "DQM_DAEMON_TOKEN"}
    if token is not None:
        environment["DQM_DAEMON_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dqm_daemon", "upload", *arguments, env=environment,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 180)
    return process.returncode, stdout.decode(), stderr.decode()


def stored_dqm_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("*.root"))


async def test_uploads_files_and_prints_names_and_digests(tmp_path, daemon):
    """Each file is stored; the client prints its stored name and sha256 (or JSON lines)."""
    daemon.start()
    first = write_one_histogram_file(tmp_path / "first.root")
    second = write_dqm_file(tmp_path / "second.root")
    code, out, err = await run_client(str(first), "--url", daemon.url, "--run", "42",
                                      "--agent", "EMC", "--timestamp", "1700000000")
    assert code == 0, err
    assert "first.root -> EMChistos_42_DQM_2023_11_14_23_13_20.root sha256 " \
           f"{hashlib.sha256(first.read_bytes()).hexdigest()} (ok)" in out
    code, out, err = await run_client(str(second), "--url", daemon.url, "--run", "43",
                                      "--agent", "EMC", "--data-status", "2", "--json")
    assert code == 0, err
    (line,) = [json.loads(text) for text in out.splitlines()]
    assert line["status"] == 200 and line["state"] == "ok"
    assert line["sha256"] == hashlib.sha256(second.read_bytes()).hexdigest()
    assert (daemon.data_dir / line["filename"]).read_bytes() == second.read_bytes()
    assert "100.0%" in err  # plain progress lines when not on a terminal
    assert TOKEN not in out + err


async def test_refusal_exits_non_zero_with_the_servers_message(tmp_path, daemon):
    """A 4xx stops that file with the server's message and a non-zero exit."""
    daemon.start()
    path = write_one_histogram_file(tmp_path / "h.root")
    code, _, err = await run_client(str(path), "--url", daemon.url, "--run", "1",
                                    "--agent", "bad/agent")
    assert code == 1
    assert "refused (400): Header amoreAgent 'bad/agent' is not a valid agent name" in err
    code, _, err = await run_client(str(path), "--url", daemon.url, "--run", "1",
                                    token="wrong-token")
    assert code == 1 and "Received token, but it is invalid!" in err
    assert stored_dqm_files(daemon.data_dir) == []


async def test_token_from_a_file_never_from_the_command_line(tmp_path, daemon):
    """The token comes from $DQM_DAEMON_TOKEN or --token-file; without one the client stops."""
    daemon.start()
    path = write_one_histogram_file(tmp_path / "h.root")
    code, _, err = await run_client(str(path), "--url", daemon.url, "--run", "1", token=None)
    assert code == 2 and "no token" in err
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    code, out, err = await run_client(str(path), "--url", daemon.url, "--run", "1",
                                      "--token-file", str(token_file), token=None)
    assert code == 0, err
    assert TOKEN not in out + err


async def test_retries_through_503_honouring_retry_after(tmp_path, daemon):
    """While the daemon is full the client waits as told and then succeeds, once."""
    daemon.configure("max_concurrent_uploads = 1\nretry_after_seconds = 1\n")
    daemon.start()
    blocker = write_one_histogram_file(tmp_path / "blocker.root").read_bytes()
    release = asyncio.Event()

    async def held():
        yield blocker[:100]
        await release.wait()
        yield blocker[100:]

    async with aiohttp.ClientSession() as session:
        holding = asyncio.create_task(session.post(f"{daemon.url}/rest/api/files", data=held(),
                                                   headers=dqm_headers(run=900)))
        await asyncio.sleep(0.5)
        path = write_dqm_file(tmp_path / "mine.root")
        client = asyncio.create_task(run_client(str(path), "--url", daemon.url, "--run", "7"))
        await asyncio.sleep(2.5)
        release.set()
        await (await holding).read()
        code, out, err = await client
    assert code == 0, err
    assert "503: Too many uploads in progress (1); retry later; retrying in 1 s" in err
    mine = [p for p in stored_dqm_files(daemon.data_dir) if "_7_" in p.name]
    assert len(mine) == 1 and mine[0].read_bytes() == path.read_bytes()


class LoopbackProxy:
    """A loopback TCP proxy to the daemon; `forward` decides what happens to each piece."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self.forwarded = 0  # bytes that reached the daemon
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, client_reader, client_writer) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1",
                                                                         self.target_port)

        async def pump(reader, writer, upstream: bool):
            try:
                while data := await reader.read(65536):
                    await self.forward(data, writer, upstream)
            finally:
                for end in (client_writer, upstream_writer):
                    end.close()

        await asyncio.gather(pump(client_reader, upstream_writer, True),
                             pump(upstream_reader, client_writer, False),
                             return_exceptions=True)

    async def forward(self, data: bytes, writer: asyncio.StreamWriter, upstream: bool) -> None:
        if upstream:
            self.forwarded += len(data)
        writer.write(data)
        await writer.drain()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class DroppingProxy(LoopbackProxy):
    """Cuts, once, the connection carrying the byte at `cut_after` of everything sent
    upstream."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        super().__init__(target_port)
        self.cut_after = cut_after
        self.cut_done = False

    async def forward(self, data: bytes, writer: asyncio.StreamWriter, upstream: bool) -> None:
        if upstream and not self.cut_done and self.forwarded + len(data) > self.cut_after:
            self.cut_done = True
            writer.write(data[:self.cut_after - self.forwarded])
            self.forwarded = self.cut_after
            raise ConnectionAbortedError("cut by the test")
        await super().forward(data, writer, upstream)


@pytest.mark.parametrize("cut_after", [1_000, 700_000, 2_500_000])
async def test_dropped_connection_is_retried_without_a_second_copy(tmp_path, daemon, cut_after):
    """An upload cut at several offsets is sent again; the stored file is whole, its sha256
    the source's, and there is exactly one of it."""
    daemon.start()
    rng = random.Random(cut_after)
    path = tmp_path / "big.root"
    path.write_bytes(write_one_histogram_file(tmp_path / "h.root").read_bytes()
                     + rng.randbytes(3 * 1024 * 1024))
    proxy = DroppingProxy(daemon.port, cut_after)
    port = await proxy.start()
    try:
        code, out, err = await run_client(str(path), "--url", f"http://127.0.0.1:{port}",
                                          "--run", "11", "--json")
    finally:
        await proxy.stop()
    assert code == 0, err
    assert "retrying in" in err and proxy.connections >= 2
    (answer,) = [json.loads(line) for line in out.splitlines()]
    assert answer["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in stored_dqm_files(daemon.data_dir)] == [answer["filename"]]
    for _ in range(50):  # the cut upload's temporary is removed when the daemon notices
        if not list((daemon.data_dir / ".incoming").iterdir()):
            break
        await asyncio.sleep(0.1)
    assert list((daemon.data_dir / ".incoming").iterdir()) == []


async def test_running_the_client_again_stores_nothing_new(tmp_path, daemon):
    """An agent that re-sends a file (it never saw the answer) gets the same name, one copy."""
    daemon.start()
    path = write_dqm_file(tmp_path / "again.root")
    answers = []
    for _ in range(2):
        code, out, err = await run_client(str(path), "--url", daemon.url, "--run", "12",
                                          "--json")
        assert code == 0, err
        answers.append(json.loads(out))
    assert answers[0]["filename"] == answers[1]["filename"]
    assert len(stored_dqm_files(daemon.data_dir)) == 1


async def test_progress_bar_on_a_terminal(tmp_path, daemon):
    """On a terminal the progress line is redrawn in place, with bytes, rate and ETA."""
    import pty

    daemon.start()
    path = tmp_path / "big.root"
    path.write_bytes(write_one_histogram_file(tmp_path / "h.root").read_bytes()
                     + random.Random(1).randbytes(8 * 1024 * 1024))
    controller, terminal = pty.openpty()
    environment = dict(os.environ, DQM_DAEMON_TOKEN=TOKEN)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dqm_daemon", "upload", str(path), "--url", daemon.url,
        "--run", "3", env=environment, stdout=asyncio.subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    stdout, _ = await asyncio.wait_for(process.communicate(), 120)
    screen = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:
            break
        if not data:
            break
        screen += data
    os.close(controller)
    assert process.returncode == 0
    assert b"\r" in screen and b"/s ETA" in screen and b"100.0%" in screen
    assert b"big.root ->" in stdout


async def test_a_file_gone_before_its_turn_does_not_stop_the_others(tmp_path, daemon):
    """A file removed after the command started is reported (exit status 2, "no such file")
    and the files after it are still uploaded."""
    daemon.start()
    kept = write_one_histogram_file(tmp_path / "kept.root")
    options = UploadOptions(url=daemon.url, token=TOKEN, run=44, agent="EMC",
                            timestamp=1_700_000_000, data_status=0)
    out, err = io.StringIO(), io.StringIO()
    code = await upload_all([tmp_path / "gone.root", kept], options, True, out, err)
    assert code == EXIT_USAGE
    results = [json.loads(line) for line in out.getvalue().splitlines()]
    assert results[0]["status"] is None and "cannot be read" in results[0]["message"]
    assert results[1]["status"] == 200
    assert "gone.root: cannot be read" in err.getvalue()
    assert [path.name for path in stored_dqm_files(daemon.data_dir)] == [results[1]["filename"]]


def test_retry_after_is_honoured_up_to_the_longest_backoff():
    """A server's Retry-After is followed, but a day's wait is cut to the longest backoff."""
    options = UploadOptions(url="", token="", run=1, agent="EMC", timestamp=1, data_status=0,
                            max_backoff_seconds=60)
    assert client_module._retry_delay(0, options, "5") == 5
    assert client_module._retry_delay(0, options, "86400") == 60
    assert client_module._retry_delay(3, options, None) == 8



class StallingProxy(LoopbackProxy):
    """Once `stall_after` bytes went upstream, forwards nothing more upstream for
    `stall_seconds` (a link that stalls), then goes on."""

    def __init__(self, target_port: int, stall_after: int, stall_seconds: float) -> None:
        super().__init__(target_port)
        self.stall_after, self.stall_seconds = stall_after, stall_seconds
        self.stalled = False

    async def forward(self, data: bytes, writer: asyncio.StreamWriter, upstream: bool) -> None:
        if upstream and not self.stalled and self.forwarded + len(data) > self.stall_after:
            self.stalled = True
            await asyncio.sleep(self.stall_seconds)
        await super().forward(data, writer, upstream)


@pytest.mark.parametrize("resume_above", ["1", "1000000000"])
async def test_a_stalled_link_answered_408_is_retried(tmp_path, daemon, resume_above):
    """The daemon gives up on an upload whose bytes stop coming (408, its read timeout); the
    client sends again (resumes, on the resumable path) and the file is stored once."""
    daemon.configure("read_timeout_seconds = 1\n")
    daemon.start()
    path = tmp_path / "big.root"
    path.write_bytes(write_one_histogram_file(tmp_path / "h.root").read_bytes()
                     + random.Random(5).randbytes(3 * 1024 * 1024))
    proxy = StallingProxy(daemon.port, stall_after=1_000_000, stall_seconds=3.0)
    port = await proxy.start()
    try:
        code, out, err = await run_client(str(path), "--url", f"http://127.0.0.1:{port}",
                                          "--run", "13", "--json", "--resume-above",
                                          resume_above)
    finally:
        await proxy.stop()
    assert code == 0, err
    assert "408: No data received for 1.0 s" in err
    (answer,) = [json.loads(line) for line in out.splitlines()]
    assert answer["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in stored_dqm_files(daemon.data_dir)] == [answer["filename"]]


async def test_a_redirect_is_refused_and_never_followed(tmp_path, unused_tcp_port_factory):
    """A receiver address that redirects (a moved host, a proxy's login page) is not followed:
    following would turn the upload into a GET and carry the token to the other host. The
    client stops with the Location in its message, and the other host sees nothing."""
    from aiohttp import web

    seen = []

    async def elsewhere(request):
        seen.append((request.method, request.headers.get("token")))
        return web.json_response({"files": []})

    async def moved(request):
        raise web.HTTPMovedPermanently(location=f"http://localhost:{other_port}{request.path}")

    runners = []
    ports = []
    for handler in (elsewhere, moved):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = unused_tcp_port_factory()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        ports.append(port)
    other_port, moved_port = ports
    path = write_one_histogram_file(tmp_path / "h.root")
    try:
        for resume_above in ("1", "1000000000"):
            code, out, err = await run_client(str(path), "--url", f"http://127.0.0.1:{moved_port}",
                                              "--run", "14", "--resume-above", resume_above)
            assert code == 1, err
            assert f"refused (301): redirected to 'http://localhost:{other_port}/rest/api/" in err
    finally:
        for runner in runners:
            await runner.cleanup()
    assert seen == []


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "ftp://127.0.0.1/", "http://",
                                 "http://127.0.0.1:abc", "http://127.0.0.1:99999", "http://[::1"])
async def test_an_address_that_is_not_http_is_a_usage_error(tmp_path, url):
    """A --url without http(s):// and a host, or with a port that is none, is refused at once
    (exit 2), not retried."""
    path = write_one_histogram_file(tmp_path / "h.root")
    code, out, err = await run_client(str(path), "--url", url, "--run", "1")
    assert code == EXIT_USAGE, err
    assert "--url must be http://host:port or https://host:port" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("token", "agent", "complaint"), [
    ("a-good-token-1234\r\nX-Injected: 1", "EMC", "the token holds a control character"),
    (TOKEN, "EMC\nTPC", "--agent holds a control character")])
async def test_a_header_that_cannot_be_sent_is_a_usage_error(tmp_path, token, agent, complaint):
    """A token or agent no HTTP header can carry is refused at once (exit 2), not retried as if
    the network had failed; the token is not printed."""
    path = write_one_histogram_file(tmp_path / "h.root")
    code, _out, err = await run_client(str(path), "--url", "http://127.0.0.1:9", "--run", "1",
                                      "--agent", agent, token=token)
    assert code == EXIT_USAGE, err
    assert complaint in err and "retrying" not in err
    assert "a-good-token" not in err


@pytest.mark.parametrize("resume_above", ["1", "1000000000"])
async def test_an_invalid_file_is_reported_with_its_reason_and_stored_name(tmp_path, daemon,
                                                                           resume_above):
    """A file that is not sound ROOT: refused (exit 1) with the daemon's reason, and with
    --json the name it was kept under (in quarantine), through either endpoint."""
    daemon.start()
    path = tmp_path / "broken.root"
    path.write_bytes(random.Random(5).randbytes(5000))
    code, out, err = await run_client(str(path), "--url", daemon.url, "--run", "21", "--json",
                                      "--resume-above", resume_above)
    assert code == 1, err
    assert "not a ROOT file" in err
    (line,) = [json.loads(text) for text in out.splitlines()]
    assert line["status"] == 400 and "not a ROOT file" in line["message"]
    assert (daemon.data_dir / "quarantine" / line["filename"]).read_bytes() == path.read_bytes()


class SlowProxy(LoopbackProxy):
    """Forwards the client's bytes at about 1 MB/s. `sever_bulk()` cuts the connections that
    carried more than a megabyte, as a client's end closing would, rather than going on to
    forward what the client had sent before it died."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.bytes_by_connection: dict[asyncio.StreamWriter, int] = {}
        self.severed: set[asyncio.StreamWriter] = set()

    def sever_bulk(self) -> None:
        self.severed = {writer for writer, count in self.bytes_by_connection.items()
                        if count > 1024 * 1024}

    async def forward(self, data: bytes, writer: asyncio.StreamWriter, upstream: bool) -> None:
        if upstream:
            if writer in self.severed:
                raise ConnectionAbortedError("severed by the test")
            self.bytes_by_connection[writer] = self.bytes_by_connection.get(writer, 0) + len(data)
            await asyncio.sleep(len(data) / 1e6)
        await super().forward(data, writer, upstream)


async def test_an_interrupted_resumable_upload_is_dropped_on_the_daemon(tmp_path, daemon):
    """Ctrl-C in the middle of a resumable upload: the client exits 130 and asks the daemon to
    drop the unfinished upload, so its bytes and the disk reserved for the rest are freed now,
    not when it would expire a day later."""
    daemon.start()
    path = tmp_path / "big.root"
    path.write_bytes(write_one_histogram_file(tmp_path / "h.root").read_bytes()
                     + random.Random(7).randbytes(16 * 1024 * 1024))
    proxy = SlowProxy(daemon.port)
    port = await proxy.start()
    environment = dict(os.environ, DQM_DAEMON_TOKEN=TOKEN)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dqm_daemon", "upload", str(path), "--url",
        f"http://127.0.0.1:{port}", "--run", "31", "--resume-above", "1", env=environment,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    status_url = f"{daemon.url}/status.json"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):  # until the daemon holds some of the upload's bytes
                parts = list((daemon.data_dir / ".resumable").glob("*.part"))
                if parts and parts[0].stat().st_size > 1024 * 1024:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the upload never started")
            async with session.get(status_url) as answer:
                assert (await answer.json())["disk"]["promised_bytes"] > 0
            process.send_signal(signal.SIGINT)
            proxy.sever_bulk()
            _, err = await asyncio.wait_for(process.communicate(), 30)
            assert process.returncode == 130, err
            for _ in range(100):
                async with session.get(status_url) as answer:
                    promised = (await answer.json())["disk"]["promised_bytes"]
                if not promised:
                    break
                await asyncio.sleep(0.1)
            assert promised == 0, (err, daemon.log_path.read_text()[-3000:])
            assert list((daemon.data_dir / ".resumable").glob("*.part")) == []
    finally:
        if process.returncode is None:
            process.kill()
        await proxy.stop()
    assert stored_dqm_files(daemon.data_dir) == []


async def test_a_ctrl_c_while_hashing_a_large_file_stops_at_once(tmp_path):
    """The client hashes a file before sending it; a Ctrl-C meanwhile exits (130) at once,
    not once gigabytes are hashed (a 64 GiB sparse file: about half a minute of hashing)."""
    path = tmp_path / "huge.root"
    with open(path, "wb") as huge:
        huge.truncate(64 * 1024**3)  # sparse: no disk used
    environment = dict(os.environ, DQM_DAEMON_TOKEN=TOKEN)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dqm_daemon", "upload", str(path), "--url",
        f"http://127.0.0.1:{free_port()}", "--run", "31", env=environment,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(2.0)  # started, and hashing
        assert process.returncode is None
        process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 130, err
        assert time.monotonic() - interrupted < 5, "the hashing went on after the Ctrl-C"
    finally:
        if process.returncode is None:
            process.kill()


def test_the_rate_after_a_resume_counts_only_the_bytes_sent_since():
    """Resumed half-way, the progress line's rate and ETA come from this attempt's bytes, not
    from what the daemon already had."""
    stream = io.StringIO()
    progress = client_module.Progress("f.root", 100 * 1024 * 1024, stream)
    progress.restart(50 * 1024 * 1024)
    progress.advance(2 * 1024 * 1024)
    line = progress._line(progress.started + 2.0)
    assert "52.0%" in line and "1.0 MiB/s" in line and "ETA 48 s" in line, line


async def test_a_success_that_is_not_the_daemons_is_refused(tmp_path, unused_tcp_port_factory):
    """A 200 without the daemon's stored name and digest (another server, a proxy's page) is
    not taken for a stored file: refused with what it said, no traceback."""
    from aiohttp import web

    async def answer(_request):
        return web.json_response({"status": 200, "filename": "x.root"})

    app = web.Application()
    app.router.add_post("/rest/api/files", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = unused_tcp_port_factory()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        path = write_one_histogram_file(tmp_path / "h.root")
        code, _out, err = await run_client(str(path), "--url", f"http://127.0.0.1:{port}",
                                          "--run", "1")
    finally:
        await runner.cleanup()
    assert code == 1, err
    assert "not an answer of dqm-daemon" in err and "Traceback" not in err
