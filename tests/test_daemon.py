"""The real daemon as a subprocess: start-up checks, restarts, logs and a 2 GiB upload."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from .conftest import TOKEN, dqm_headers
from .rootfiles import (
    write_dqm_file,
    write_many_histograms_file,
    write_one_histogram_file,
)

GiB = 1024**3
MiB = 1024**2


def test_refuses_to_start_without_a_token(tmp_path):
    """Started with no token configured, the daemon says so and exits instead of running open."""
    environment = {key: value for key, value in os.environ.items() if key != "DQM_DAEMON_TOKEN"}
    finished = subprocess.run(
        [sys.executable, "-m", "dqm_daemon", "serve", "--data-dir", str(tmp_path / "d")],
        env=environment, capture_output=True, text=True, timeout=60,
    )
    assert finished.returncode == 2
    assert "no token configured" in finished.stderr
    assert "DQM_DAEMON_TOKEN" in finished.stderr


def test_bad_config_names_the_key(tmp_path):
    """A config with an unknown key or a bad value is refused, naming the key."""
    config = tmp_path / "config.toml"
    config.write_text('max_upload_bytes = "lots"\n')
    finished = subprocess.run(
        [sys.executable, "-m", "dqm_daemon", "serve", "--config", str(config)],
        env=dict(os.environ, DQM_DAEMON_TOKEN=TOKEN), capture_output=True, text=True, timeout=60,
    )
    assert finished.returncode == 2
    assert "max_upload_bytes: expected an integer" in finished.stderr


async def _upload(session: aiohttp.ClientSession, url: str, content, **header_values) -> dict:
    async with session.post(f"{url}/rest/api/files", data=content,
                            headers=dqm_headers(**header_values)) as response:
        body = await response.json()
        assert response.status == 200, body
        return body


def test_a_start_that_fails_says_why_in_one_log_line(tmp_path):
    """The port taken by another program, or a data directory that is a file: the daemon logs
    one `startup_failed` line saying why (what journald shows) and exits 1, no traceback."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    environment = dict(os.environ, DQM_DAEMON_TOKEN=TOKEN)
    try:
        for arguments, reason in (
                (["--port", str(taken.getsockname()[1]), "--data-dir", str(tmp_path / "d")],
                 "address already in use"),
                (["--port", "1", "--data-dir", str(not_a_directory)], "File exists")):
            finished = subprocess.run([sys.executable, "-m", "dqm_daemon", "serve", *arguments],
                                      env=environment, capture_output=True, text=True,
                                      timeout=60)
            assert finished.returncode == 1
            assert "Traceback" not in finished.stdout + finished.stderr
            (failure,) = [json.loads(line) for line in finished.stdout.splitlines()
                          if '"startup_failed"' in line]
            assert failure["level"] == "error" and reason in failure["error"]
    finally:
        taken.close()


async def test_config_tokens_name_uploaders_and_never_leak(tmp_path, daemon):
    """Tokens from the config file work; logs name the uploader, never the token."""
    daemon.configure('[tokens]\nemc-shifter = "config-secret-1"\ntpc-agent = "config-secret-2"\n')
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        for token in ("config-secret-1", "config-secret-2", TOKEN):
            await _upload(session, daemon.url, content, token=token, run=len(token))
        async with session.post(f"{daemon.url}/rest/api/files", data=content,
                                headers=dqm_headers(token="config-secret-3")) as response:
            assert response.status == 401
    daemon.kill()
    log_text = daemon.log_path.read_text()
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    uploaders = {line.get("uploader") for line in lines if line.get("event") == "request"}
    assert {"emc-shifter", "tpc-agent", "env-token"} <= uploaders
    for secret in ("config-secret-1", "config-secret-2", "config-secret-3", TOKEN):
        assert secret not in log_text


async def test_restart_after_kill_keeps_everything(tmp_path, daemon):
    """After a kill -9 and a restart every acknowledged file is listed, intact, and a retry
    of one of them is still recognised."""
    daemon.start()
    contents = [write_dqm_file(tmp_path / f"f{n}.root", n_histograms=n + 1).read_bytes()
                for n in range(5)]
    async with aiohttp.ClientSession() as session:
        answers = [await _upload(session, daemon.url, content, run=1000 + n)
                   for n, content in enumerate(contents)]
    daemon.kill()
    daemon.start()
    async with aiohttp.ClientSession(headers={"token": TOKEN}) as session:
        async with session.get(f"{daemon.url}/rest/api/files") as response:
            listed = (await response.json())["files"]
        assert listed == sorted(answer["filename"] for answer in answers)
        for answer, content in zip(answers, contents, strict=True):
            async with session.get(f"{daemon.url}/rest/api/files/{answer['filename']}") as response:
                assert await response.read() == content
        again = await _upload(session, daemon.url, contents[0], run=1000)
        assert again["filename"] == answers[0]["filename"]
    assert sorted(path.name for path in daemon.data_dir.glob("*.root")) == listed


async def _large_body(root_file: bytes, total_bytes: int, chunk: bytes):
    """A valid ROOT file followed by padding up to `total_bytes` (ROOT ignores the tail)."""
    yield root_file
    remaining = total_bytes - len(root_file)
    while remaining > 0:
        piece = chunk if remaining >= len(chunk) else chunk[:remaining]
        remaining -= len(piece)
        yield piece


@pytest.mark.slow
async def test_two_gib_upload_in_bounded_memory(tmp_path, daemon):
    """A 2 GiB chunked upload is stored intact while the daemon's memory stays flat."""
    daemon.start()
    root_file = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    padding_chunk = os.urandom(4 * MiB)
    total = 2 * GiB
    expected = hashlib.sha256()
    async for piece in _large_body(root_file, total, padding_chunk):
        expected.update(piece)
    async with aiohttp.ClientSession() as session:
        await _upload(session, daemon.url, root_file, run=1)  # warm up every code path
        idle_kib = daemon.rss_kib("VmRSS")
        peak_samples = []

        async def sample() -> None:
            while True:
                peak_samples.append(daemon.rss_kib("VmRSS"))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        timeout = aiohttp.ClientTimeout(total=600)
        async with session.post(f"{daemon.url}/rest/api/files", timeout=timeout,
                                data=_large_body(root_file, total, padding_chunk),
                                headers=dqm_headers(run=2)) as response:
            body = await response.json()
        sampler.cancel()
        peak_kib = daemon.rss_kib("VmHWM")
    assert response.status == 200, body
    assert body["size"] == total
    assert body["sha256"] == expected.hexdigest()
    assert body["received"] == {"test": "Obj name: test, Obj IsA() Name: TH1F"}
    stored = daemon.data_dir / body["filename"]
    assert stored.stat().st_size == total
    growth_mib = (peak_kib - idle_kib) / 1024
    print(f"idle RSS {idle_kib / 1024:.1f} MiB, peak {peak_kib / 1024:.1f} MiB, "
          f"growth {growth_mib:.1f} MiB, samples max {max(peak_samples) / 1024:.1f} MiB")
    assert growth_mib < 64
    stored.unlink()


async def test_kill_with_inspections_pending_then_restart_finishes_them(tmp_path, daemon):
    """Files acknowledged while checks and analyses queue up are all checked and analysed
    after a kill -9 and a restart."""
    daemon.configure("inspection_workers = 1\ninspection_budget_seconds = 0.01\n")
    daemon.start()
    content = write_many_histograms_file(tmp_path / "many.root", 300).read_bytes()
    async with aiohttp.ClientSession() as session:
        names = []
        for run in range(8):
            async with session.post(f"{daemon.url}/rest/api/files", data=content,
                                    headers=dqm_headers(run=run)) as response:
                assert response.status in (200, 202)
                names.append((await response.json())["filename"])
    daemon.kill(signal.SIGKILL)
    with sqlite3.connect(daemon.data_dir / "catalog.sqlite3") as catalog:
        pending = catalog.execute("SELECT count(*) FROM files WHERE state = 'pending'"
                                  " OR analysis = 'pending'").fetchone()[0]
    assert pending > 0, "the test needs work still pending when the daemon dies"
    daemon.start()
    async with aiohttp.ClientSession(headers={"token": TOKEN}) as session:
        states = {}
        for _ in range(600):
            for name in names:
                async with session.get(f"{daemon.url}/rest/api/files/{name}/info") as response:
                    details = await response.json()
                    states[name] = (details["state"], details["analysis"])
            if all("pending" not in state for state in states.values()):
                break
            await asyncio.sleep(0.1)
    assert set(states.values()) == {("ok", "done")}, states


async def _lose_an_acknowledged_file(daemon, content: bytes, headers: dict) -> str:
    """Upload a file, then kill the daemon and leave its row pending without its file (as a
    power cut after the row, or a hand deletion, would); returns its name."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/rest/api/files", data=content,
                                headers=headers) as response:
            name = (await response.json())["filename"]
    daemon.kill(signal.SIGKILL)
    with sqlite3.connect(daemon.data_dir / "catalog.sqlite3") as catalog:
        catalog.execute("UPDATE files SET state = 'pending' WHERE name = ?", (name,))
    catalog.close()
    (daemon.data_dir / name).unlink()
    return name


async def test_a_row_whose_file_is_gone_stays_pending_and_the_retry_restores_it(tmp_path,
                                                                                 daemon):
    """A file acknowledged as pending is lost (a power cut after its row, a hand deletion):
    its check, unable to read it, gives no verdict (never 'invalid': the daemon's disk is at
    fault, not the file), and the agent's retry of the same bytes puts them back under its
    name, where they are checked and served."""
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    name = await _lose_an_acknowledged_file(daemon, content, dqm_headers(run=5))
    daemon.start()  # its start-up sweep checks the pending row
    for _ in range(300):
        if "file_unreadable" in daemon.log_path.read_text():
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the pending row was never checked")
    async with aiohttp.ClientSession(headers={"token": TOKEN}) as session:
        async with session.get(f"{daemon.url}/rest/api/files/{name}/info") as response:
            assert (await response.json())["state"] == "pending"
        assert list((daemon.data_dir / "quarantine").glob("*")) == []
        async with session.get(f"{daemon.url}/status.json") as response:
            reasons = (await response.json())["reasons"]
        assert any("1 cataloged file(s) cannot be read from the disk" in reason
                   for reason in reasons), reasons
        async with session.post(f"{daemon.url}/rest/api/files", data=content,
                                headers=dqm_headers(run=5)) as response:
            answer = await response.json()
            assert response.status == 200, answer
        assert (answer["filename"], answer["state"]) == (name, "ok")
        async with session.get(f"{daemon.url}/rest/api/files/{name}") as response:
            assert await response.read() == content
        async with session.get(f"{daemon.url}/status.json") as response:
            reasons = (await response.json())["reasons"]
        assert not any("cannot be read" in reason for reason in reasons), reasons


async def test_a_file_restored_while_its_check_found_it_missing_is_checked_again(tmp_path,
                                                                                 daemon):
    """The check of a lost file reads nothing, and while its answer is on the way the agent's
    retry puts the bytes back: the file is checked again, and the retry gets the verdict (200),
    not the stale 'unreadable' (which would leave it a 202)."""
    daemon.command = [sys.executable, str(Path(__file__).with_name("faulty_daemon.py"))]
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    headers = dqm_headers(run=6, agent="LATE")
    name = await _lose_an_acknowledged_file(daemon, content, headers)
    logged_before = len(daemon.log_path.read_text())
    daemon.start()
    for _ in range(500):  # a check child up: the pending row's check reads nothing at once
        log = daemon.log_path.read_text()[logged_before:]
        if "startup_recovery_queued" in log and "inspection_child_started" in log:
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the pending row was never queued")
    await asyncio.sleep(0.5)  # read (nothing) by now; its answer comes 2 s after the read
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/rest/api/files", data=content,
                                headers=headers) as response:
            answer = await response.json()
    assert (response.status, answer["filename"], answer["state"]) == (200, name, "ok"), answer
    log = daemon.log_path.read_text()
    assert "file_restored" in log and "file_unreadable" not in log  # no false alarm
