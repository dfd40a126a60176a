"""Fault tests on the real daemon: kill -9 mid-upload, a disk that fills up, hostile ROOT files,
slow and stuck clients, floods and malformed requests. Nothing acknowledged is lost, nothing
partial is ever visible, and the daemon keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import random
import sqlite3
import subprocess
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import uproot

from .conftest import TOKEN, DaemonProcess, analysis_of, dqm_headers
from .hostile import layout_of, mutate
from .rootfiles import write_dqm_file, write_one_histogram_file, write_shift_file

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


def _padded(root_file: bytes, size: int, rng: random.Random) -> bytes:
    """A valid ROOT file followed by `size` bytes of noise (ROOT ignores what follows)."""
    return root_file + rng.randbytes(size)


async def _chunked(content: bytes, chunk: int = 256 * 1024, pause: float = 0.005):
    for start in range(0, len(content), chunk):
        yield content[start:start + chunk]
        await asyncio.sleep(pause)


def _catalog_rows(data_dir: Path) -> dict[str, tuple[str, str, str]]:
    with sqlite3.connect(data_dir / "catalog.sqlite3") as catalog:
        return {name: (sha256, state, location) for name, sha256, state, location in
                catalog.execute("SELECT name, sha256, state, location FROM files")}


async def _wait_until_inspected(url: str, names: list[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(headers={"token": TOKEN}) as session:
        while True:
            states = {}
            for name in names:
                async with session.get(f"{url}/rest/api/files/{name}/info") as response:
                    states[name] = (await response.json())["state"]
            if all(state != "pending" for state in states.values()) or \
                    time.monotonic() > deadline:
                return states
            await asyncio.sleep(0.2)


async def test_kill_9_with_32_uploads_in_flight(tmp_path, daemon):
    """kill -9 at random moments while 32 uploads stream: after each restart every upload that
    was acknowledged is listed with its exact bytes, nothing partial shows, temporaries are gone
    and pending inspections finish."""
    rng = random.Random(20261129)
    base = write_one_histogram_file(tmp_path / "base.root").read_bytes()
    acknowledged: dict[str, str] = {}  # stored name → sha256 of what was sent
    sent_sha256s: set[str] = set()
    for round_number in range(3):
        daemon.start()
        contents = [_padded(base, rng.randint(1, 6) * MiB, rng) for _ in range(32)]
        sent_sha256s.update(hashlib.sha256(content).hexdigest() for content in contents)

        async def upload(run: int, content: bytes) -> tuple[int, dict]:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{daemon.url}/rest/api/files", data=_chunked(content),
                                        headers=dqm_headers(run=run)) as r:
                    return r.status, await r.json()

        tasks = [asyncio.create_task(upload(round_number * 100 + index, content))
                 for index, content in enumerate(contents)]
        await asyncio.sleep(rng.uniform(0.3, 2.0))
        daemon.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, tuple) and result[0] in (200, 202):
                acknowledged[result[1]["filename"]] = result[1]["sha256"]
        daemon.start()
        assert list((daemon.data_dir / ".incoming").iterdir()) == []
        rows = _catalog_rows(daemon.data_dir)
        on_disk = {path.name for path in daemon.data_dir.glob("*.root")}
        for name in on_disk:  # every visible file is whole: cataloged, and a complete upload
            assert name in rows, name
            digest = hashlib.sha256((daemon.data_dir / name).read_bytes()).hexdigest()
            assert digest == rows[name][0] and digest in sent_sha256s, name
        states = await _wait_until_inspected(daemon.url, sorted(rows))
        assert set(states.values()) <= {"ok"}, states
        async with aiohttp.ClientSession(headers={"token": TOKEN}) as session:
            async with session.get(f"{daemon.url}/rest/api/files") as response:
                listed = set((await response.json())["files"])
            assert set(acknowledged) <= listed
            for name, sha256 in acknowledged.items():
                async with session.get(f"{daemon.url}/rest/api/files/{name}") as response:
                    assert hashlib.sha256(await response.read()).hexdigest() == sha256
        daemon.kill()
    assert len(acknowledged) > 0, "the kills all came before any upload was acknowledged"


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB filesystem of the test's own (tmpfs); skipped where mounting is impossible."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs",
                              str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("reserve_mib", [4, 0], ids=["reserve", "no-reserve"])
async def test_disk_fills_up_mid_upload(tmp_path, small_disk, reserve_mib):
    """An upload larger than the free space fails cleanly (507), keeps nothing, the daemon keeps
    serving, and uploads succeed again once space returns."""
    config = tmp_path / "config.toml"
    config.write_text(f"disk_reserve_bytes = {reserve_mib * MiB}\n")
    daemon = DaemonProcess(small_disk / "data", tmp_path / "daemon.log", ["--config", str(config)])
    daemon.start()
    try:
        rng = random.Random(7)
        base = write_one_histogram_file(tmp_path / "base.root").read_bytes()
        async with aiohttp.ClientSession() as session:
            url = f"{daemon.url}/rest/api/files"
            async with session.post(url, data=_chunked(_padded(base, 80 * MiB, rng)),
                                    headers=dqm_headers(run=1)) as response:
                assert response.status == 507, await response.text()
                assert "nothing was kept" in (await response.json())["message"]
            assert list((daemon.data_dir / ".incoming").iterdir()) == []
            assert list(daemon.data_dir.glob("*.root")) == []
            # Fill the disk with something else: uploads are refused, the daemon answers.
            filler = small_disk / "filler"
            with open(filler, "wb") as filling:  # up to the last byte the filesystem gives
                try:
                    while True:
                        filling.write(bytes(MiB))
                        filling.flush()
                except OSError:
                    pass
            async with session.post(url, data=base, headers=dqm_headers(run=2)) as response:
                assert response.status == 507
            async with session.get(f"{daemon.url}/healthz") as response:
                assert response.status in (200, 503)
            filler.unlink()
            async with session.post(url, data=base, headers=dqm_headers(run=3)) as response:
                body = await response.json()
                assert response.status == 200, body
            async with session.get(f"{daemon.url}/healthz") as response:
                assert response.status == 200
        assert (daemon.data_dir / body["filename"]).read_bytes() == base
    finally:
        daemon.kill()


def _decompression_bomb(path: Path) -> bytes:
    bins = 40_000_000  # 320 MB of zeros, a few hundred KiB compressed
    with uproot.recreate(path) as root_file:
        root_file["huge"] = uproot.writing.identify.to_TH1x(
            "huge", "huge", np.zeros(bins + 2), 0.0, 0.0, 0.0, 0.0, 0.0, np.zeros(0),
            uproot.writing.identify.to_TAxis("x", "x", bins, 0.0, 1.0))
    return path.read_bytes()


async def test_500_hostile_files(tmp_path, daemon):
    """500 mutated ROOT files and a decompression bomb: the daemon never dies, answers each with
    200 or 400 within the time limit, and its memory stays bounded."""
    time_limit = 10
    daemon.configure(f"inspection_time_limit_seconds = {time_limit}\n"
                     f"inspection_memory_cap_bytes = {512 * MiB}\n")
    daemon.start()
    layouts = [layout_of(write_one_histogram_file(tmp_path / "one.root")),
               layout_of(write_dqm_file(tmp_path / "dqm.root", n_histograms=4)),
               layout_of(write_shift_file(tmp_path / "shift.root", events=2000))]
    rng = random.Random(500)
    files = [mutate(rng.choice(layouts), rng) for _ in range(500)]
    files.append(("decompression_bomb", _decompression_bomb(tmp_path / "bomb.root")))
    answers: list[tuple[str, int, float]] = []
    bomb_names: list[str] = []
    async with aiohttp.ClientSession() as session:
        await asyncio.sleep(0)
        idle_kib = daemon.rss_kib()
        semaphore = asyncio.Semaphore(8)

        async def send(index: int, kind: str, content: bytes) -> None:
            async with semaphore:
                started = time.monotonic()
                async with session.post(f"{daemon.url}/rest/api/files", data=io.BytesIO(content),
                                        headers=dqm_headers(run=index, agent="HOSTILE")) as r:
                    body = await r.json()
                    answers.append((kind, r.status, time.monotonic() - started))
                    if kind == "decompression_bomb":
                        bomb_names.append(body["filename"])

        await asyncio.gather(*(send(index, kind, content)
                               for index, (kind, content) in enumerate(files)))
        async with session.get(f"{daemon.url}/healthz") as response:
            assert response.status == 200
        peak_kib = daemon.rss_kib("VmHWM")
    assert daemon.process.poll() is None, "the daemon died"
    statuses = {status for _, status, _ in answers}
    assert statuses <= {200, 400}, statuses
    assert len(answers) == len(files)
    # Each answer within the time limit plus the queue wait of 8 concurrent clients.
    assert max(seconds for _, _, seconds in answers) < 8 * time_limit
    assert (peak_kib - idle_kib) / 1024 < 64
    # The bomb is sound ROOT (one histogram of 40 million bins, its blocks framed as declared):
    # it passes its check; its analysis, which would hold it whole, hits the memory cap.
    bomb = [status for kind, status, _ in answers if kind == "decompression_bomb"]
    assert bomb == [200]
    details = await analysis_of(daemon.url, bomb_names[0])
    assert details["analysis"] == "failed", details
    assert "memory" in details["analysis_reason"] or "crashed" in details["analysis_reason"]
    assert daemon.process.poll() is None, "the daemon died"


async def test_slow_stuck_and_flooding_clients_leave_agents_unaffected(tmp_path, daemon):
    """A client sending a byte at a time, one open and silent, a flood of 1,000 bad-token
    requests and malformed multipart bodies: clean errors, nothing leaked, and a well-behaved
    agent keeps uploading meanwhile."""
    daemon.configure("read_timeout_seconds = 1\n")
    daemon.start()
    good = write_one_histogram_file(tmp_path / "good.root").read_bytes()
    idle_kib = daemon.rss_kib()

    async def raw(request: bytes, then_wait: float = 0.0, trickle: bytes = b"") -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(request)
        await writer.drain()
        for byte in trickle:
            await asyncio.sleep(then_wait)
            writer.write(bytes([byte]))
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return answer

    head = (f"POST /rest/api/files HTTP/1.1\r\nHost: x\r\ntoken: {TOKEN}\r\nrunNumber: 9\r\n"
            "timeStamp: 9\r\nConnection: close\r\n").encode()
    silent = asyncio.create_task(raw(head + b"Content-Length: 1000\r\n\r\n"))
    trickling = asyncio.create_task(raw(head + b"Content-Length: 12\r\n\r\n", 0.5,
                                        b"root-trickle"))
    malformed = [
        asyncio.create_task(raw(head + b"Content-Type: multipart/form-data\r\n"
                                b"Content-Length: 10\r\n\r\n0123456789")),  # no boundary
        asyncio.create_task(raw(head + b"Content-Type: multipart/form-data; boundary=B\r\n"
                                b"Content-Length: 40\r\n\r\n--B\r\nContent-Disposition: form")),
        asyncio.create_task(raw(head + b"Content-Type: multipart/form-data; boundary=B\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n"
                                + b"%x\r\n" % (200_020) + b"--B\r\nX-Huge: " + b"h" * 200_000
                                + b"\r\n\r\n0\r\n\r\n")),
    ]
    async with aiohttp.ClientSession() as session:
        async def bad_token(index: int) -> int:
            async with session.get(f"{daemon.url}/rest/api/files",
                                   headers={"token": f"bad-{index}"}) as response:
                return response.status

        flood = asyncio.gather(*(bad_token(index) for index in range(1000)))
        agent_latencies = []
        for run in range(5):
            started = time.monotonic()
            async with session.post(f"{daemon.url}/rest/api/files", data=good,
                                    headers=dqm_headers(run=100 + run)) as response:
                assert response.status == 200
            agent_latencies.append(time.monotonic() - started)
        assert set(await flood) == {401}
    assert max(agent_latencies) < 5
    assert (await silent).split(b" ")[1] == b"408"
    assert (await trickling).split(b" ")[1] in (b"200", b"400")  # complete, if slow
    for answer in await asyncio.gather(*malformed):
        assert answer.split(b" ")[1] in (b"400", b"408"), answer[:200]
    assert list((daemon.data_dir / ".incoming").iterdir()) == []
    assert (daemon.rss_kib() - idle_kib) / 1024 < 64
    async with aiohttp.ClientSession(headers={"token": TOKEN}) as session:
        async with session.get(f"{daemon.url}/status.json") as response:
            assert (await response.json())["uploads"] == []


async def test_a_full_disk_while_saving_a_resumable_uploads_state(tmp_path, small_disk):
    """The disk fills up just as a checksummed PATCH marks its chunk: 507, not a 500; once
    space returns the upload goes on, and a restart keeps every byte answered 204."""
    import base64
    import os
    import signal

    config = tmp_path / "config.toml"
    config.write_text("disk_reserve_bytes = 0\n")
    daemon = DaemonProcess(small_disk / "data", tmp_path / "daemon.log", ["--config", str(config)])
    daemon.start()
    tus = {"Tus-Resumable": "1.0.0", "token": TOKEN}
    content = random.Random(3).randbytes(3_000_000)

    def patch_headers(offset: int, **extra: str) -> dict[str, str]:
        return {**tus, "Upload-Offset": str(offset),
                "Content-Type": "application/offset+octet-stream", **extra}

    filler = small_disk / "filler"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{daemon.url}/rest/api/uploads/", headers={
                    **tus, "Upload-Length": str(len(content)),
                    "Upload-Metadata": "runNumber MzE=,timeStamp MTcwMDAwMDAwMA=="}) as answer:
                assert answer.status == 201, await answer.text()
                location = daemon.url + answer.headers["Location"]
            async with session.patch(location, data=content[:1_000_000],
                                     headers=patch_headers(0)) as answer:
                assert answer.status == 204
            descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
            try:
                for size in (MiB, 4096):  # up to the last page the filesystem gives
                    with contextlib.suppress(OSError):
                        while True:
                            os.write(descriptor, bytes(size))
            finally:
                os.close(descriptor)
            checksum = base64.b64encode(hashlib.sha1(content[1_000_000:2_000_000]).digest())
            async with session.patch(location, data=content[1_000_000:2_000_000],
                                     headers=patch_headers(1_000_000, **{
                                         "Upload-Checksum": f"sha1 {checksum.decode()}"})) as answer:
                assert answer.status == 507, await answer.text()
                assert answer.headers["Tus-Resumable"] == "1.0.0"
            filler.unlink()
            async with session.head(location, headers=tus) as answer:
                offset = int(answer.headers["Upload-Offset"])
            async with session.patch(location, data=content[offset:2_000_000],
                                     headers=patch_headers(offset)) as answer:
                assert answer.status == 204, await answer.text()
                assert answer.headers["Upload-Offset"] == "2000000"
        daemon.kill(signal.SIGTERM)
        daemon.start()
        async with aiohttp.ClientSession() as session:
            async with session.head(location, headers=tus) as answer:
                assert answer.headers["Upload-Offset"] == "2000000"
        assert list((daemon.data_dir / ".resumable").glob("*.tmp")) == []
    finally:
        filler.unlink(missing_ok=True)
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()
