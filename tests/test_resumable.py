"""Resumable uploads (tus 1.0.0) on the real daemon: the reference tus client, the project's own
client resuming through dropped connections, checksums, locking, termination and expiry."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
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
import numpy as np
import pytest
import uproot

from dqm_daemon.resumable import ALIVE_FILE, FINISHED_SUFFIX

from .conftest import TOKEN
from .rootfiles import th1f, write_dqm_file, write_one_histogram_file
from .test_client import DroppingProxy, run_client

TUS = {"Tus-Resumable": "1.0.0", "token": TOKEN}


def unfinished_uploads(data_dir: Path) -> list[str]:
    """What `.resumable/` holds of unfinished uploads (parts, states): not the daemon's
    heartbeat, nor the names finished ones were stored as."""
    return [path.name for path in (data_dir / ".resumable").iterdir()
            if path.name != ALIVE_FILE and not path.name.endswith(FINISHED_SUFFIX)]


def _metadata(**values: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                    for key, value in values.items())


async def _create(session, url: str, length: int, **extra_headers) -> str:
    async with session.post(f"{url}/rest/api/uploads/", headers={
            **TUS, "Upload-Length": str(length),
            "Upload-Metadata": _metadata(runNumber="31", timeStamp="1700000000",
                                         amoreAgent="TUS"), **extra_headers}) as answer:
        assert answer.status == 201, await answer.text()
        assert answer.headers["Tus-Resumable"] == "1.0.0"
        return url + answer.headers["Location"]


async def _patch(session, location: str, offset: int, body, **extra_headers):
    return await session.patch(location, data=body, headers={
        **TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
        **extra_headers})


async def test_tuspy_reference_client(tmp_path, daemon):
    """tuspy, the reference Python tus client, uploads in chunks; the file is committed,
    named and inspected exactly as a POSTed one."""
    from tusclient import client as tus_client

    daemon.start()
    path = write_dqm_file(tmp_path / "tus.root")

    def upload() -> None:
        # tuspy given an open stream (given a path it leaves the file open behind it).
        with open(path, "rb") as stream:
            uploader = tus_client.TusClient(f"{daemon.url}/rest/api/uploads/",
                                            headers={"token": TOKEN}).uploader(
                file_stream=stream, chunk_size=20_000,
                metadata={"runNumber": "77", "timeStamp": "1700000000", "amoreAgent": "TUS"})
            uploader.upload()

    await asyncio.to_thread(upload)
    name = "TUShistos_77_DQM_2023_11_14_23_13_20.root"
    assert (daemon.data_dir / name).read_bytes() == path.read_bytes()
    async with aiohttp.ClientSession(headers={"token": TOKEN}) as session:
        async with session.get(f"{daemon.url}/rest/api/files/{name}/info") as answer:
            details = await answer.json()
    assert details["state"] == "ok" and details["uploader"] == "env-token"
    assert unfinished_uploads(daemon.data_dir) == []


@pytest.mark.parametrize("cut_after", [3_000_000, 6_000_000])
async def test_own_client_resumes_instead_of_restarting(tmp_path, daemon, cut_after):
    """A resumable upload cut by a dropping proxy resumes where the daemon stands: less than
    a restart would send reaches the daemon, and the stored file's sha256 is the source's."""
    daemon.start()
    path = tmp_path / "large.root"
    path.write_bytes(write_one_histogram_file(tmp_path / "h.root").read_bytes()
                     + random.Random(cut_after).randbytes(8 * 1024 * 1024))
    proxy = DroppingProxy(daemon.port, cut_after)
    port = await proxy.start()
    try:
        code, out, err = await run_client(str(path), "--url", f"http://127.0.0.1:{port}",
                                          "--run", "13", "--resume-above", "1000000", "--json")
    finally:
        await proxy.stop()
    assert code == 0, err
    assert "resuming in" in err
    (answer,) = [json.loads(line) for line in out.splitlines()]
    assert answer["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (daemon.data_dir / answer["filename"]).read_bytes() == path.read_bytes()
    assert proxy.cut_done
    # Resumed, not restarted: a restart sends the file plus everything before the cut again;
    # a resume only what the daemon had not yet written (at most its socket buffer).
    assert proxy.forwarded < path.stat().st_size + cut_after - 512 * 1024
    assert unfinished_uploads(daemon.data_dir) == []


async def test_head_offset_checksum_lock_and_termination(tmp_path, daemon):
    """HEAD tells the offset; a bad chunk checksum is refused (460) and nothing appended; a
    second PATCH while one writes gets 423; DELETE removes everything."""
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        location = await _create(session, daemon.url, len(content))
        async with await _patch(session, location, 0, content[:1000]) as answer:
            assert answer.status == 204 and answer.headers["Upload-Offset"] == "1000"
        async with session.head(location, headers=TUS) as answer:
            assert (answer.headers["Upload-Offset"], answer.headers["Upload-Length"]) == (
                "1000", str(len(content)))
        wrong = base64.b64encode(hashlib.sha1(b"something else").digest()).decode()
        async with await _patch(session, location, 1000, content[1000:2000],
                                **{"Upload-Checksum": f"sha1 {wrong}"}) as answer:
            assert answer.status == 460
        async with await _patch(session, location, 2000, content[2000:3000]) as answer:
            assert answer.status == 409  # the offset is still 1000
        release = asyncio.Event()

        async def slow():
            yield content[1000:1500]
            await release.wait()
            yield content[1500:2000]

        first = asyncio.create_task(_patch(session, location, 1000, slow()))
        await asyncio.sleep(0.5)
        async with await _patch(session, location, 1000, content[1000:2000]) as answer:
            assert answer.status == 423
        release.set()
        async with await first as answer:
            assert answer.headers["Upload-Offset"] == "2000"
        async with session.delete(location, headers=TUS) as answer:
            assert answer.status == 204
        async with session.head(location, headers=TUS) as answer:
            assert answer.status == 404
    assert unfinished_uploads(daemon.data_dir) == []
    assert list(daemon.data_dir.glob("*.root")) == []


async def test_tus_version_and_digest_are_enforced(tmp_path, daemon):
    """Without Tus-Resumable the answer is 412; a whole-file Repr-Digest given at creation is
    checked at the end, and a mismatch keeps nothing."""
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/rest/api/uploads/", headers={
                "token": TOKEN, "Upload-Length": "10"}) as answer:
            assert answer.status == 412 and answer.headers["Tus-Version"] == "1.0.0"
        wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
        location = await _create(session, daemon.url, len(content),
                                 **{"Repr-Digest": f"sha-256=:{wrong}:"})
        async with await _patch(session, location, 0, content) as answer:
            assert answer.status == 400
            assert "Repr-Digest mismatch" in (await answer.json())["message"]
    assert list(daemon.data_dir.glob("*.root")) == []
    assert unfinished_uploads(daemon.data_dir) == []


async def test_unfinished_uploads_expire_and_count_against_the_reserve(tmp_path, daemon):
    """An unfinished upload holds its remaining bytes against the disk reserve, and is swept
    once it expires."""
    daemon.configure("resumable_expiry_seconds = 1\nresumable_sweep_seconds = 0.3\n"
                     "max_upload_bytes = 1152921504606846976\n")
    daemon.start()
    free = __import__("shutil").disk_usage(daemon.data_dir).free
    reserve = 1024**3
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        location = await _create(session, daemon.url, free - reserve - 50 * 1024 * 1024)
        async with session.post(f"{daemon.url}/rest/api/files",
                                data=io.BytesIO(b"x" * 100 * 1024 * 1024),
                                headers={"token": TOKEN, "runNumber": "1",
                                         "timeStamp": "1"}) as answer:
            assert answer.status == 507  # the promised bytes are not free any more
        async with session.get(f"{daemon.url}/status.json") as answer:
            report = await answer.json()  # and the crew sees why
        assert report["level"] == "WARNING" and report["disk"]["promised_bytes"] > 0
        assert any(reason.startswith("free disk low (under twice the reserve), ") and
                   "promised to unfinished resumable uploads" in reason
                   for reason in report["reasons"]), report["reasons"]
        await asyncio.sleep(2.0)
        async with session.head(location, headers=TUS) as answer:
            assert answer.status == 404
        async with session.post(f"{daemon.url}/rest/api/files", data=content,
                                headers={"token": TOKEN, "runNumber": "1",
                                         "timeStamp": "1"}) as answer:
            assert answer.status == 200
    assert unfinished_uploads(daemon.data_dir) == []


async def test_an_upload_that_never_started_expires_sooner(tmp_path, daemon):
    """A creation whose client never sends a byte (its answer lost, say) holds its whole length
    against the disk reserve: it goes after `resumable_unstarted_expiry_seconds`, while an
    upload under way keeps its day."""
    daemon.configure("resumable_expiry_seconds = 3600\nresumable_unstarted_expiry_seconds = 1\n"
                     "resumable_sweep_seconds = 0.3\n")
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        never_started = await _create(session, daemon.url, len(content))
        under_way = await _create(session, daemon.url, len(content))
        async with await _patch(session, under_way, 0, content[:100]) as answer:
            assert answer.status == 204
        await asyncio.sleep(2.0)
        async with session.head(never_started, headers=TUS) as answer:
            assert answer.status == 404
        async with session.head(under_way, headers=TUS) as answer:
            assert (answer.status, answer.headers["Upload-Offset"]) == (200, "100")
        async with await _patch(session, under_way, 100, content[100:]) as answer:
            assert answer.status == 204, await answer.text()
            assert answer.headers["DQM-State"] == "ok"


async def test_bad_requests_and_leftovers(tmp_path, daemon):
    """Errors under the tus endpoint carry Tus-Resumable; a bad Upload-Length or an empty
    upload is refused; unreadable leftovers of an earlier run do not stop the daemon."""
    resumable = daemon.data_dir / ".resumable"
    resumable.mkdir(parents=True)
    (resumable / "0123abcd.json").write_text("{not json")
    (resumable / "0123abcd.part").write_bytes(b"half")
    (resumable / "orphan.part").write_bytes(b"no state")
    (resumable / "feed.finished").write_text("{half written")
    marker = {"name": "x.root", "length": 1, "finished_at": time.time(), "sha256": "00",
              "agent": "TUS", "run": 1, "timestamp": 1, "metadata": None}
    (resumable / "cafe.finished").write_text(json.dumps({**marker, "finished_at": "yesterday"}))
    (resumable / "beef.finished").write_text(json.dumps(marker))
    (resumable / "beef.tmp").write_text("a state's temporary")
    (resumable / "beef.part.commit").write_bytes(b"a link left by a commit cut short")
    daemon.start()
    assert unfinished_uploads(daemon.data_dir) == []
    assert sorted(path.name for path in resumable.iterdir()) == [".alive", "beef.finished"]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/rest/api/uploads/",
                                headers={"Tus-Resumable": "1.0.0"}) as answer:
            assert answer.status == 401 and answer.headers["Tus-Resumable"] == "1.0.0"
        for length, fragment in (("²", "Upload-Length must be an integer"),
                                 ("-3", "Upload-Length must not be negative"),
                                 ("0", "No file uploaded")):
            async with session.post(f"{daemon.url}/rest/api/uploads/", headers={
                    **TUS, "Upload-Length": length, "runNumber": "1",
                    "timeStamp": "1"}) as answer:
                assert answer.status == 400, length
                assert fragment in (await answer.json())["message"]
        async with session.post(f"{daemon.url}/rest/api/uploads/", headers={
                **TUS, "Upload-Length": "10", "Upload-Metadata": "runNumber é"}) as answer:
            assert answer.status == 400  # not even ASCII
            assert "Upload-Metadata value of 'runNumber' is not base64" in (
                await answer.json())["message"]
        location = await _create(session, daemon.url, 10)
        async with await _patch(session, location, 0, b"0123456789",
                                **{"Upload-Checksum": "sha1 é"}) as answer:
            assert answer.status == 400
            assert (await answer.json())["message"] == "Upload-Checksum value is not base64"


async def test_a_reason_quoting_control_characters_still_reaches_the_client(tmp_path, daemon):
    """A failed check's reason quotes the file's own object names: names holding CR, LF, NUL
    or ESC do not stop the final PATCH, nor a later HEAD, from answering with the reason."""
    path = tmp_path / "hostile.root"
    with uproot.recreate(path) as root_file:
        root_file["t\r\nX-Injected: 1\x00\x1b"] = th1f("t", "t", [1, 2, 3, 4])
    content = bytearray(path.read_bytes())
    block = content.index(b"ZL")  # the histogram's compression block: an unknown algorithm
    content[block:block + 2] = b"XX"
    daemon.start()
    async with aiohttp.ClientSession() as session:
        location = await _create(session, daemon.url, len(content))
        async with await _patch(session, location, 0, bytes(content)) as answer:
            assert answer.status == 204
            assert answer.headers["DQM-State"] == "invalid"
            reason = answer.headers["DQM-Reason"]
        assert reason == "t??X-Injected: 1??: unknown compression b'XX'"
        assert "X-Injected" not in answer.headers
        async with session.head(location, headers=TUS) as answer:
            assert (answer.status, answer.headers["DQM-Reason"]) == (200, reason)
        async with session.post(f"{daemon.url}/rest/api/files", data=bytes(content), headers={
                "token": TOKEN, "runNumber": "32", "timeStamp": "1"}) as answer:
            assert answer.status == 400
            assert (await answer.json())["reason"] == reason



async def test_creations_at_once_reserve_no_more_than_the_disk_has(tmp_path, daemon):
    """Four creations at the same moment, each for 60% of what is free above the reserve: one
    is given the room, the others 507 (each sees the others' reservations)."""
    daemon.configure("max_upload_bytes = 1152921504606846976\n")
    daemon.start()
    free = __import__("shutil").disk_usage(daemon.data_dir).free
    length = int((free - 1024**3) * 0.6)
    async with aiohttp.ClientSession() as session:

        async def create() -> int:
            async with session.post(f"{daemon.url}/rest/api/uploads/", headers={
                    **TUS, "Upload-Length": str(length), "runNumber": "33",
                    "timeStamp": "1"}) as answer:
                return answer.status

        assert sorted(await asyncio.gather(*(create() for _ in range(4)))) == [201, 507, 507, 507]


async def test_unfinished_uploads_are_limited_and_shown_while_they_stream(tmp_path, daemon):
    """Past `max_unfinished_resumable_uploads` a creation gets 503 with Retry-After, until one
    is finished or terminated; a PATCH streaming shows its bytes on the status page."""
    daemon.configure("max_unfinished_resumable_uploads = 2\n")
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        first = await _create(session, daemon.url, len(content))
        await _create(session, daemon.url, len(content))
        async with session.post(f"{daemon.url}/rest/api/uploads/", headers={
                **TUS, "Upload-Length": "10", "runNumber": "31", "timeStamp": "1"}) as answer:
            assert answer.status == 503
            assert answer.headers["Retry-After"] == "5"
            assert answer.headers["Tus-Resumable"] == "1.0.0"
            assert "Too many unfinished resumable uploads (2)" in (await answer.json())["message"]
        release = asyncio.Event()

        async def half_then_rest():
            yield content[:1000]
            await release.wait()
            yield content[1000:]

        streaming = asyncio.create_task(_patch(session, first, 0, half_then_rest()))
        for _ in range(100):
            async with session.get(f"{daemon.url}/status.json") as answer:
                uploads = (await answer.json())["uploads"]
            if uploads and uploads[0]["received_bytes"]:
                break
            await asyncio.sleep(0.05)
        assert [upload["received_bytes"] for upload in uploads] == [1000]
        release.set()
        async with await streaming as answer:
            assert answer.status == 204 and answer.headers["DQM-State"] == "ok"
        await _create(session, daemon.url, len(content))  # the finished one made room


async def test_a_finished_upload_frees_its_slot_while_its_check_runs(tmp_path, daemon):
    """The final PATCH leaves its upload slot once the bytes are committed, as a POST does:
    while its file is checked (two seconds here), another agent's upload is taken, not refused
    for lack of a slot, and the status page shows no upload in progress."""
    daemon.configure("max_concurrent_uploads = 1\ninspection_budget_seconds = 20\n")
    daemon.command = [sys.executable, str(Path(__file__).with_name("faulty_daemon.py"))]
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/rest/api/uploads/", headers={
                **TUS, "Upload-Length": str(len(content)),
                "Upload-Metadata": _metadata(runNumber="31", timeStamp="1700000000",
                                             amoreAgent="SLOW")}) as answer:
            assert answer.status == 201
            location = daemon.url + answer.headers["Location"]
        finishing = asyncio.create_task(_patch(session, location, 0, content))
        for _ in range(100):  # until the file is committed (its part file gone, its slot
            # left: a few ms after its row) and waits for its check
            async with session.get(f"{daemon.url}/status.json") as answer:
                report = await answer.json()
            if report["inspection"]["pending_files"] and not report["uploads"]:
                break
            await asyncio.sleep(0.02)
        assert report["inspection"]["pending_files"] == 1 and report["uploads"] == []
        assert not finishing.done()
        async with session.post(f"{daemon.url}/rest/api/files", data=content, headers={
                "token": TOKEN, "runNumber": "32", "timeStamp": "1700000000",
                "amoreAgent": "EMC", "dataStatus": "0"}) as answer:
            assert answer.status == 200, await answer.text()
        async with await finishing as answer:
            assert answer.status == 204 and answer.headers["DQM-State"] == "ok"


async def test_an_upload_whose_last_bytes_reached_the_disk_before_a_crash_is_committed(
        tmp_path, daemon):
    """The daemon dies after the last PATCH's bytes reach the disk, before it commits them.
    After the restart the upload is committed at start-up: a tus client that asks finds the
    offset at the length and takes it as done, so it must not be left to expire."""
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        location = await _create(session, daemon.url, len(content))
        async with await _patch(session, location, 0, content[:-100]) as answer:
            assert answer.status == 204
    daemon.kill()
    (part,) = (daemon.data_dir / ".resumable").glob("*.part")

    def write_the_last_bytes() -> None:  # as the last PATCH did before the crash
        with open(part, "ab") as written_before_the_crash:
            written_before_the_crash.write(content[-100:])

    await asyncio.to_thread(write_the_last_bytes)
    daemon.start()
    async with aiohttp.ClientSession() as session:
        for _ in range(200):  # committed in the background, just after start-up
            async with session.head(location, headers=TUS) as answer:
                if "DQM-Filename" in answer.headers:
                    break
            await asyncio.sleep(0.05)
        assert answer.status == 200, await answer.text()
        assert answer.headers["Upload-Offset"] == answer.headers["Upload-Length"] == str(
            len(content))
        name = answer.headers["DQM-Filename"]
        async with session.get(f"{daemon.url}/rest/api/files/{name}", headers=TUS) as stored:
            assert await stored.read() == content
        for _ in range(200):  # pending, then checked like any file
            async with session.get(f"{daemon.url}/rest/api/files", headers=TUS) as listing:
                if names := (await listing.json())["files"]:
                    break
            await asyncio.sleep(0.05)
        assert names == [name]
    assert unfinished_uploads(daemon.data_dir) == []


async def test_a_chunk_cut_by_a_crash_before_its_checksum_was_checked_is_not_kept(
        tmp_path, daemon):
    """A PATCH with an Upload-Checksum: the daemon dies while the chunk streams in, before it
    can check the checksum. The bytes of that chunk on disk are not vouched for: after the
    restart the upload stands where the chunk began."""
    daemon.start()
    with uproot.recreate(tmp_path / "noise.root") as root_file:  # random contents: 480 kB
        root_file["noise"] = (np.random.default_rng(5).random(60_000), np.linspace(0, 1, 60_001))
    content = (tmp_path / "noise.root").read_bytes()
    assert len(content) > 400_000
    checksum = base64.b64encode(hashlib.sha1(content[1000:]).digest()).decode()
    arrived = asyncio.Event()

    async def chunk_then_stall():
        yield content[1000:300_000]
        await arrived.wait()
        await asyncio.sleep(3600)  # the daemon dies meanwhile

    async with aiohttp.ClientSession() as session:
        location = await _create(session, daemon.url, len(content))
        async with await _patch(session, location, 0, content[:1000]) as answer:
            assert answer.status == 204
        stalled = asyncio.create_task(_patch(session, location, 1000, chunk_then_stall(),
                                             **{"Upload-Checksum": f"sha1 {checksum}"}))
        (part,) = (daemon.data_dir / ".resumable").glob("*.part")
        for _ in range(400):
            if part.stat().st_size >= 300_000:
                break
            await asyncio.sleep(0.025)
        assert part.stat().st_size >= 300_000
        daemon.kill()
        arrived.set()
        stalled.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await stalled
    daemon.start()
    async with aiohttp.ClientSession() as session:
        async with session.head(location, headers=TUS) as answer:
            assert answer.headers["Upload-Offset"] == "1000"
        async with await _patch(session, location, 1000, content[1000:],
                                **{"Upload-Checksum": f"sha1 {checksum}"}) as answer:
            assert answer.status == 204, await answer.text()
            name = answer.headers["DQM-Filename"]
        async with session.get(f"{daemon.url}/rest/api/files/{name}", headers=TUS) as stored:
            assert await stored.read() == content


async def test_a_shutdown_does_not_wait_for_the_hash_of_a_complete_upload(tmp_path, daemon):
    """A complete upload committed at start-up is hashed first (its running hash died with the
    daemon): a SIGTERM meanwhile stops the hashing, the daemon exits at once, and the upload
    stays, whole, for the next start."""
    length = 8 << 30  # sparse: seconds to hash
    daemon.start()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/rest/api/uploads/", headers={
                **TUS, "Upload-Length": str(length),
                "Upload-Metadata": _metadata(runNumber="32", timeStamp="1700000000",
                                             amoreAgent="TUS")}) as answer:
            if answer.status == 507:
                pytest.skip("not 8 GiB of free disk here")
            assert answer.status == 201
    daemon.kill()
    (part,) = (daemon.data_dir / ".resumable").glob("*.part")
    os.truncate(part, length)  # all its bytes reached the disk before the crash
    daemon.start()
    await asyncio.sleep(0.5)  # hashing it
    signalled = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.process.wait, 60) == 0
    assert time.monotonic() - signalled < 3, "the exit waited for the upload's hash"
    assert part.stat().st_size == length
    assert part.with_suffix(".json").exists()
    assert list(daemon.data_dir.glob("*.root")) == []


async def test_a_checksummed_patch_refused_for_room_leaves_nothing_to_drop(tmp_path, daemon):
    """A PATCH with an Upload-Checksum refused (503: every upload slot taken) marks nothing:
    the bytes a later PATCH appends are still there after a restart."""
    daemon.configure("max_concurrent_uploads = 1\n")
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    checksum = base64.b64encode(hashlib.sha1(content[:2000]).digest()).decode()
    release = asyncio.Event()

    async def slow():
        yield content[:1000]
        await release.wait()
        yield content[1000:2000]

    async with aiohttp.ClientSession() as session:
        location = await _create(session, daemon.url, len(content))
        other = await _create(session, daemon.url, len(content))
        holder = asyncio.create_task(_patch(session, other, 0, slow()))
        for _ in range(200):  # the holder takes the one slot
            async with session.get(f"{daemon.url}/status.json") as status:
                if (await status.json())["uploads"]:
                    break
            await asyncio.sleep(0.05)
        async with await _patch(session, location, 0, content[:2000],
                                **{"Upload-Checksum": f"sha1 {checksum}"}) as answer:
            assert answer.status == 503
        release.set()
        async with await holder as answer:
            assert answer.status == 204
        async with await _patch(session, location, 0, content[:2000]) as answer:
            assert answer.status == 204
    daemon.kill()
    daemon.start()
    async with aiohttp.ClientSession() as session, session.head(location, headers=TUS) as answer:
        assert answer.headers["Upload-Offset"] == "2000"


async def test_an_upload_whose_last_patch_failed_after_its_last_byte_is_committed(
        tmp_path, daemon):
    """The last PATCH's bytes all reach the disk, then its request fails (the client gone
    before the end of its chunked body). A tus client asking finds the offset at the length
    and takes the upload as done: the daemon commits it (at its next sweep), never expires it."""
    daemon.configure("resumable_expiry_seconds = 1\nresumable_sweep_seconds = 0.3\n")
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        location = await _create(session, daemon.url, len(content))
        _reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(
            f"PATCH {location.removeprefix(daemon.url)} HTTP/1.1\r\nHost: x\r\n"
            f"Tus-Resumable: 1.0.0\r\ntoken: {TOKEN}\r\nUpload-Offset: 0\r\n"
            "Content-Type: application/offset+octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"{len(content):x}\r\n".encode() + content + b"\r\n")  # and never the last chunk
        await writer.drain()
        (part,) = (daemon.data_dir / ".resumable").glob("*.part")
        for _ in range(200):
            if part.stat().st_size == len(content):
                break
            await asyncio.sleep(0.025)
        writer.close()
        for _ in range(200):  # well past the expiry
            async with session.head(location, headers=TUS) as answer:
                if answer.status != 200 or "DQM-Filename" in answer.headers:
                    break
                assert answer.headers["Upload-Offset"] == str(len(content))
            await asyncio.sleep(0.05)
        assert answer.status == 200 and "DQM-Filename" in answer.headers, answer.status
        async with session.get(f"{daemon.url}/rest/api/files/{answer.headers['DQM-Filename']}",
                               headers=TUS) as stored:
            assert await stored.read() == content
    assert unfinished_uploads(daemon.data_dir) == []


async def test_the_daemons_downtime_is_not_the_clients_inactivity(tmp_path, daemon):
    """An unfinished upload expires a day after its client's last PATCH, but time the daemon
    was down does not count: after two days off, the upload is still there to resume."""
    daemon.configure("resumable_sweep_seconds = 0.3\n")
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        location = await _create(session, daemon.url, len(content))
        async with await _patch(session, location, 0, content[:1000]) as answer:
            assert answer.status == 204
        idle = await _create(session, daemon.url, len(content))
        async with await _patch(session, idle, 0, content[:1000]) as answer:
            assert answer.status == 204
    daemon.kill(signal.SIGTERM)
    # As if the daemon had been off for two days, right after the first upload's last PATCH,
    # while the second had been idle for a day and a half already when the daemon stopped.
    stopped = time.time() - 2 * 86400
    for path, idle_before in ((location, 0), (idle, 1.5 * 86400)):
        state_path = daemon.data_dir / ".resumable" / f"{path.rsplit('/', 1)[1]}.json"
        state = json.loads(state_path.read_text())
        state["last_activity"] = stopped - idle_before
        state_path.write_text(json.dumps(state))
    os.utime(daemon.data_dir / ".resumable" / ".alive", (stopped, stopped))
    daemon.start()
    await asyncio.sleep(1.0)  # three sweeps
    async with aiohttp.ClientSession() as session:
        async with session.head(location, headers=TUS) as answer:
            assert (answer.status, answer.headers.get("Upload-Offset")) == (200, "1000")
        async with session.head(idle, headers=TUS) as answer:
            assert answer.status == 404  # a day and a half idle, and a restart changes nothing
        async with await _patch(session, location, 1000, content[1000:]) as answer:
            assert answer.status == 204 and "DQM-Filename" in answer.headers


async def test_malformed_patches_are_400_and_head_repeats_the_metadata(tmp_path, daemon):
    """What the tus protocol asks of the details: a PATCH without an integer Upload-Offset or
    with a checksum that is no digest of its algorithm is a bad request (400, not 409 or 460),
    one longer than what remains is refused before a byte is written (413), and HEAD repeats
    the creation's Upload-Metadata, also after a restart."""
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    metadata = _metadata(runNumber="31", timeStamp="1700000000", amoreAgent="TUS")
    async with aiohttp.ClientSession() as session:
        location = await _create(session, daemon.url, len(content))
        (part,) = (daemon.data_dir / ".resumable").glob("*.part")
        headers = {**TUS, "Content-Type": "application/offset+octet-stream"}
        async with session.patch(location, data=content, headers=headers) as answer:
            assert answer.status == 400 and "Upload-Offset" in (await answer.json())["message"]
        for offset in ("abc", "-1", "1e3"):
            async with await _patch(session, location, offset, content) as answer:
                assert answer.status == 400, offset
        for checksum in ("sha1", "sha1 " + base64.b64encode(b"short").decode(),
                         "sha256 " + base64.b64encode(hashlib.sha1(content).digest()).decode()):
            async with await _patch(session, location, 0, content,
                                    **{"Upload-Checksum": checksum}) as answer:
                assert answer.status == 400, checksum
        async with await _patch(session, location, 0, content + b"more") as answer:
            assert answer.status == 413
        assert part.stat().st_size == 0
        async with session.head(location, headers=TUS) as answer:
            assert answer.headers["Upload-Metadata"] == metadata
            assert answer.headers["Upload-Offset"] == "0"
    daemon.kill(signal.SIGTERM)
    daemon.start()
    async with aiohttp.ClientSession() as session:
        async with session.head(location, headers=TUS) as answer:
            assert answer.headers["Upload-Metadata"] == metadata
        async with await _patch(session, location, 0, content) as answer:
            assert answer.status == 204 and "DQM-Filename" in answer.headers


@pytest.mark.parametrize("failing_step", ["commit", "state saved before it"])
async def test_a_complete_upload_whose_commit_fails_for_the_disk_stays_and_is_committed(
        aiohttp_client, data_dir, tmp_path, failing_step):
    """The last PATCH's bytes are all in, but storing the file (or saving the upload's state
    right before) fails for a full disk: 507, and the upload stays whole (HEAD: offset at the
    length); once the disk has room, the next sweep stores it. Its bytes are never thrown away
    for a failure that is not theirs."""
    import errno

    from dqm_daemon.app import create_app
    from dqm_daemon.appkeys import INGEST, RESUMABLE

    from .conftest import make_settings

    app = create_app(make_settings(data_dir, resumable_sweep_seconds=0.2))
    client = await aiohttp_client(app)
    ingest, uploads = app[INGEST], app[RESUMABLE]
    real_commit, real_save, failing = ingest.commit, uploads._save, [True]

    async def commit_on_a_full_disk(*args, **kwargs):
        if failing[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_commit(*args, **kwargs)

    saves = []

    def save_on_a_full_disk(upload):  # the third save: the one before the commit
        saves.append(upload.offset)
        if failing[0] and len(saves) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(upload)

    if failing_step == "commit":
        ingest.commit = commit_on_a_full_disk
    else:
        uploads._save = save_on_a_full_disk
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    headers = {**TUS, "Upload-Length": str(len(content)),
               "Upload-Metadata": "runNumber MzE=,timeStamp MTcwMDAwMDAwMA=="}
    async with client.post("/rest/api/uploads/", headers=headers) as answer:
        location = answer.headers["Location"]
    async with client.patch(location, data=content, headers={
            **TUS, "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream"}) as answer:
        assert answer.status == 507, await answer.text()
    async with client.head(location, headers=TUS) as answer:
        assert answer.status == 200
        assert answer.headers["Upload-Offset"] == str(len(content))
        assert "Upload-Expires" not in answer.headers  # complete: committed, never expired
    failing[0] = False
    for _ in range(100):
        async with client.head(location, headers=TUS) as answer:
            if "DQM-Filename" in answer.headers:
                break
        await asyncio.sleep(0.05)
    name = answer.headers["DQM-Filename"]
    assert (data_dir / name).read_bytes() == content


def _expires(answer) -> float:
    """An answer's Upload-Expires as unix seconds (an HTTP date: whole seconds)."""
    return email.utils.parsedate_to_datetime(answer.headers["Upload-Expires"]).timestamp()


async def test_upload_expires_says_when_an_idle_upload_goes(tmp_path, daemon):
    """tus expiration: the creation, every PATCH that leaves the upload unfinished and HEAD say
    when the upload goes if its client sends nothing more (the shorter expiry before its first
    byte, then its expiry after its last PATCH); the finished upload's answer says none. The
    time said is the sweep's: before it the upload is there, shortly after it is gone."""
    daemon.configure("resumable_expiry_seconds = 5\nresumable_unstarted_expiry_seconds = 2\n"
                     "resumable_sweep_seconds = 0.2\n")
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        async with session.options(f"{daemon.url}/rest/api/uploads/", headers=TUS) as answer:
            assert "expiration" in answer.headers["Tus-Extension"].split(",")
        before = time.time()
        async with session.post(f"{daemon.url}/rest/api/uploads/", headers={
                **TUS, "Upload-Length": str(len(content)), "runNumber": "31",
                "timeStamp": "1700000000"}) as answer:
            assert answer.status == 201
            location = daemon.url + answer.headers["Location"]
            assert before + 2 - 1 <= _expires(answer) <= time.time() + 2
        async with session.head(location, headers=TUS) as answer:
            assert before + 2 - 1 <= _expires(answer) <= time.time() + 2
        async with await _patch(session, location, 0, content[:100]) as answer:
            assert answer.status == 204
            patched_expiry = _expires(answer)
            assert time.time() + 5 - 2 <= patched_expiry <= time.time() + 5
        async with session.head(location, headers=TUS) as answer:
            assert _expires(answer) == patched_expiry
        await asyncio.sleep(max(patched_expiry - 1 - time.time(), 0))
        async with session.head(location, headers=TUS) as answer:
            assert answer.status == 200  # not yet
        await asyncio.sleep(max(patched_expiry + 3.5 - time.time(), 0))
        async with session.head(location, headers=TUS) as answer:
            assert answer.status == 404  # gone when it said
        location = await _create(session, daemon.url, len(content))
        async with await _patch(session, location, 0, content) as answer:
            assert answer.status == 204 and answer.headers["DQM-State"] == "ok"
            assert "Upload-Expires" not in answer.headers


async def test_x_http_method_override_turns_a_post_into_the_method_it_names(tmp_path, daemon):
    """tus core: a client behind a proxy that passes only GET and POST sends PATCH, HEAD and
    DELETE as POSTs naming them in X-HTTP-Method-Override; a POST on an upload naming nothing
    or another method is refused (405, JSON) and changes nothing."""
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()

    def override(method: str, **extra: str) -> dict[str, str]:
        return {**TUS, "X-HTTP-Method-Override": method, **extra}

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/rest/api/uploads/",
                                headers=override("OPTIONS")) as answer:
            assert answer.status == 204 and answer.headers["Tus-Version"] == "1.0.0"
        location = await _create(session, daemon.url, len(content))
        async with session.post(location, data=content[:1000], headers=override(
                "PATCH", **{"Upload-Offset": "0",
                            "Content-Type": "application/offset+octet-stream"})) as answer:
            assert answer.status == 204 and answer.headers["Upload-Offset"] == "1000"
        async with session.post(location, headers=override("head")) as answer:
            assert answer.status == 200 and answer.headers["Upload-Offset"] == "1000"
        for refused in ({**TUS}, override("GET")):
            async with session.post(location, data=b"x" * 10, headers=refused) as answer:
                assert answer.status == 405
                assert "X-HTTP-Method-Override" in (await answer.json())["message"]
                assert set(answer.headers["Allow"].split(",")) == {"HEAD", "PATCH", "DELETE"}
        async with session.head(location, headers=TUS) as answer:
            assert answer.headers["Upload-Offset"] == "1000"  # nothing appended
        async with session.post(location, headers=override("DELETE")) as answer:
            assert answer.status == 204
        async with session.head(location, headers=TUS) as answer:
            assert answer.status == 404
        location = await _create(session, daemon.url, len(content))
        async with session.post(location, data=content, headers=override(
                "PATCH", **{"Upload-Offset": "0",
                            "Content-Type": "application/offset+octet-stream"})) as answer:
            assert answer.status == 204 and answer.headers["DQM-State"] == "ok"
            name = answer.headers["DQM-Filename"]
    assert (daemon.data_dir / name).read_bytes() == content
    assert unfinished_uploads(daemon.data_dir) == []


async def test_a_finished_uploads_answer_outlives_a_restart_until_its_expiry(tmp_path, daemon):
    """A client that lost the last PATCH's answer asks HEAD: it names the stored file as the
    file stands now (pending, then checked), also after a restart, instead of a 404 that would
    make the client send the whole file again; after the upload's expiry it is forgotten."""
    daemon.configure("resumable_expiry_seconds = 4\nresumable_sweep_seconds = 0.2\n")
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        location = await _create(session, daemon.url, len(content))
        async with await _patch(session, location, 0, content) as answer:
            assert answer.status == 204
            name = answer.headers["DQM-Filename"]
    daemon.kill(signal.SIGKILL)
    daemon.start()
    async with aiohttp.ClientSession() as session:
        async with session.head(location, headers=TUS) as answer:
            assert answer.status == 200
            assert answer.headers["Upload-Offset"] == str(len(content))
            assert answer.headers["DQM-Filename"] == name
            assert answer.headers["DQM-State"] == "ok"
            assert answer.headers["DQM-Sha256"] == hashlib.sha256(content).hexdigest()
            assert answer.headers["Upload-Metadata"] == _metadata(
                runNumber="31", timeStamp="1700000000", amoreAgent="TUS")
        async with await _patch(session, location, len(content), b"") as answer:
            assert answer.status == 404  # nothing more to append
        await asyncio.sleep(5.0)
        async with session.head(location, headers=TUS) as answer:
            assert answer.status == 404
    assert list((daemon.data_dir / ".resumable").glob(f"*{FINISHED_SUFFIX}")) == []
    assert (daemon.data_dir / name).read_bytes() == content


async def test_a_crash_between_storing_a_finished_upload_and_its_marker_loses_no_answer(
        tmp_path, daemon):
    """The daemon dies once a finished upload's file is stored and cataloged, before the marker
    naming it is written (its last PATCH never answered): the upload is still whole after the
    restart, which stores it again as the same file, and HEAD names it."""
    daemon.command = [sys.executable, str(Path(__file__).with_name("faulty_daemon.py"))]
    daemon.extra_env = {"DQM_TEST_KILL_BEFORE_FINISHED_MARKER": "1"}
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        location = await _create(session, daemon.url, len(content))
        with pytest.raises(aiohttp.ClientError):
            async with await _patch(session, location, 0, content):
                pass
    assert daemon.process.wait(timeout=30) == -signal.SIGKILL
    stored = list(daemon.data_dir.glob("*.root"))
    assert [path.read_bytes() for path in stored] == [content]  # stored before the kill
    daemon.extra_env = {}
    daemon.start()
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.head(location, headers=TUS) as answer:
                if answer.status == 200 and answer.headers.get("DQM-State") == "ok":
                    break
            await asyncio.sleep(0.1)
        assert answer.status == 200, answer.status
        assert answer.headers["DQM-Filename"] == stored[0].name
        assert answer.headers["DQM-Sha256"] == hashlib.sha256(content).hexdigest()
    assert list(daemon.data_dir.glob("*.root")) == stored  # stored once
    assert unfinished_uploads(daemon.data_dir) == []


async def test_head_names_a_finished_uploads_own_file_after_its_name_went_to_another(
        tmp_path, daemon):
    """A broken file's name goes to the next sound file of the same headers (the broken one is
    set aside under a variant name): HEAD on the broken upload still names its own file, with
    its own digest and verdict, not the file that took the name."""
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    broken = content[:len(content) // 2]
    async with aiohttp.ClientSession() as session:
        first = await _create(session, daemon.url, len(broken))
        async with await _patch(session, first, 0, broken) as answer:
            assert answer.headers["DQM-State"] == "invalid"
            name = answer.headers["DQM-Filename"]
        second = await _create(session, daemon.url, len(content))
        async with await _patch(session, second, 0, content) as answer:
            assert answer.headers["DQM-State"] == "ok"
            assert answer.headers["DQM-Filename"] == name  # the broken one was set aside
        async with session.head(first, headers=TUS) as answer:
            assert answer.status == 200
            assert answer.headers["DQM-Sha256"] == hashlib.sha256(broken).hexdigest()
            assert answer.headers["DQM-State"] == "invalid"
            assert answer.headers["DQM-Filename"] != name
        async with session.head(second, headers=TUS) as answer:
            assert answer.headers["DQM-Filename"] == name


async def test_a_stored_file_sharing_its_bytes_with_an_upload_cut_short_is_never_truncated(
        tmp_path):
    """A checksummed last chunk verified, but its state's save failed (507): the state on disk
    still marks the chunk unverified. Then the sweeper commits the upload, and the daemon dies
    before the upload's part file goes, while the part and the stored file are one inode. The
    next start must not cut the part as an unverified chunk: that would cut the stored file."""
    from dqm_daemon.handlers.resumable_uploads import _append_sync
    from dqm_daemon.naming import DQMHeaders
    from dqm_daemon.resumable import ResumableUploads

    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    uploads = ResumableUploads(tmp_path / ".resumable", expiry_seconds=3600)
    uploads.load()
    upload = await uploads.create(len(content), DQMHeaders(31, 1700000000, "TUS", 0),
                                  "tester", None)
    await uploads.begin_checksummed_chunk(upload)  # saved: unverified from 0
    _append_sync(upload, content, None)
    upload.unverified_from = None  # verified; the save that follows failed (the disk full)
    state_path = tmp_path / ".resumable" / f"{upload.upload_id}.json"
    stale_state = state_path.read_text()
    finished = await uploads.finish(upload, 1024 * 1024)
    assert json.loads(state_path.read_text())["unverified_from"] is None  # saved before
    stored = tmp_path / "TUShistos_31.root"
    os.link(finished.path, stored)  # the commit places it (Storage._link_sync) ...
    finished.path.unlink()  # ... and the daemon dies before record_finished
    for state in (state_path.read_text(), stale_state):  # and were that save lost, too
        state_path.write_text(state)
        ResumableUploads(tmp_path / ".resumable", expiry_seconds=3600).load()
        assert stored.read_bytes() == content
