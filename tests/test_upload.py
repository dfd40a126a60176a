"""POST /rest/api/files: the Overwatch receiver's contract, and what it lacked."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import os
import random
from pathlib import Path

import aiohttp
import pytest
import uproot

from dqm_daemon.appkeys import CATALOG
from dqm_daemon.resumable import ALIVE_FILE, FINISHED_SUFFIX
from dqm_daemon.storage import LOCK_FILE

from .conftest import TOKEN, UPLOADER_NAME, dqm_headers, multipart_file
from .rootfiles import write_dqm_file

EXPECTED_NAME = "EMChistos_123456_DQM_1970_01_02_16_07_24.root"
SUCCESS = "Successfully received file and extracted information"
INVALID = "Successfully received the file, but the file is not valid! Perhaps it was corrupted?"


def stored_files(data_dir: Path) -> list[str]:
    """Every file the daemon holds anywhere, temporaries and quarantine included (but its own
    bookkeeping: the catalog, the lock on the data directory, the resumable uploads' heartbeat
    and the names finished ones were stored as)."""
    return sorted(
        str(path.relative_to(data_dir))
        for path in data_dir.rglob("*")
        if path.is_file() and not path.name.startswith("catalog.sqlite3")
        and path.name not in (LOCK_FILE, ALIVE_FILE) and not path.name.endswith(FINISHED_SUFFIX)
    )


async def test_one_histogram_file_reports_its_object(client, one_histogram_file, data_dir):
    """An agent's upload is stored under the Overwatch name and reported as the old receiver did."""
    response = await client.post(
        "/rest/api/files", data=multipart_file(one_histogram_file), headers=dqm_headers()
    )
    body = await response.json()
    assert response.status == 200, body
    assert body["status"] == 200
    assert body["message"] == SUCCESS
    assert body["filename"] == EXPECTED_NAME
    assert body["received"] == {"test": "Obj name: test, Obj IsA() Name: TH1F"}
    assert body["size"] == len(one_histogram_file)
    assert body["sha256"] == hashlib.sha256(one_histogram_file).hexdigest()
    # Spelled as the Overwatch receiver (Flask) echoed them.
    assert body["receivedHeaders"]["Runnumber"] == "123456"
    assert body["receivedHeaders"]["Amoreagent"] == "EMC"
    assert body["receivedHeaders"]["Content-Type"].startswith("multipart/form-data; boundary=")
    assert "token" not in {key.lower() for key in body["receivedHeaders"]}
    assert TOKEN not in await response.text()
    assert (data_dir / EXPECTED_NAME).read_bytes() == one_histogram_file
    record = await client.server.app[CATALOG].get(EXPECTED_NAME)
    assert (record.uploader, record.agent, record.run, record.state) == (
        UPLOADER_NAME, "EMC", 123456, "ok")


async def test_raw_body_upload(client, one_histogram_file):
    """Agents that send the file as the raw body (as the old receiver allowed) still work."""
    response = await client.post("/rest/api/files", data=one_histogram_file, headers=dqm_headers())
    body = await response.json()
    assert response.status == 200, body
    assert body["received"] == {"test": "Obj name: test, Obj IsA() Name: TH1F"}


async def _chunks(content: bytes, size: int = 1000):
    for start in range(0, len(content), size):
        await asyncio.sleep(0)
        yield content[start:start + size]


@pytest.mark.parametrize("as_multipart", [True, False], ids=["multipart", "raw"])
async def test_chunked_transfer_encoding(client, tmp_path, as_multipart, data_dir):
    """An upload with no Content-Length (chunked) is stored whole."""
    content = write_dqm_file(tmp_path / "dqm.root").read_bytes()
    if as_multipart:
        writer = aiohttp.MultipartWriter("form-data")
        part = writer.append(_chunks(content))
        part.set_content_disposition("form-data", name="file", filename="dqm.root")
        payload = writer
    else:
        payload = _chunks(content)
    response = await client.post("/rest/api/files", data=payload, headers=dqm_headers())
    body = await response.json()
    assert response.status == 200, body
    assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert set(body["received"]) == {"hist0", "hist1", "hist2", "detector", "events"}
    assert body["received"]["events"] == "Obj name: events, Obj IsA() Name: TTree"
    assert (data_dir / EXPECTED_NAME).read_bytes() == content


async def test_defaults_for_agent_and_data_status(client, one_histogram_file):
    """Without amoreAgent the file is named for agent DQM and dataStatus defaults to 0."""
    headers = {"token": TOKEN, "runNumber": "7", "timeStamp": "140844"}
    response = await client.post("/rest/api/files", data=multipart_file(one_histogram_file),
                                 headers=headers)
    body = await response.json()
    assert body["filename"] == "DQMhistos_7_DQM_1970_01_02_16_07_24.root"
    record = await client.server.app[CATALOG].get(body["filename"])
    assert record.data_status == 0


async def test_summer_time_name(client, one_histogram_file):
    """Names use Europe/Zurich local time, summer time included (2023-07-01 12:00 UTC = 14:00)."""
    response = await client.post("/rest/api/files", data=multipart_file(one_histogram_file),
                                 headers=dqm_headers(timestamp=1688212800, dataStatus="1"))
    body = await response.json()
    assert body["filename"] == "EMChistos_123456_DQM_2023_07_01_14_00_00.root"
    record = await client.server.app[CATALOG].get(body["filename"])
    assert record.data_status == 1


async def test_same_file_twice_is_stored_once(client, one_histogram_file, data_dir):
    """An agent's retry answers 200 again and stores nothing new."""
    for _ in range(2):
        response = await client.post(
            "/rest/api/files", data=multipart_file(one_histogram_file), headers=dqm_headers()
        )
        body = await response.json()
        assert response.status == 200, body
        assert body["filename"] == EXPECTED_NAME
        assert body["received"] == {"test": "Obj name: test, Obj IsA() Name: TH1F"}
    assert stored_files(data_dir) == [EXPECTED_NAME]


async def test_different_file_with_taken_name_is_kept_beside(client, tmp_path, one_histogram_file,
                                                             data_dir):
    """A different file under a taken name is kept under a new name; nothing is overwritten."""
    other = write_dqm_file(tmp_path / "other.root").read_bytes()
    first = await (await client.post("/rest/api/files", data=multipart_file(one_histogram_file),
                                     headers=dqm_headers())).json()
    second = await (await client.post("/rest/api/files", data=multipart_file(other),
                                      headers=dqm_headers())).json()
    third = await (await client.post("/rest/api/files", data=multipart_file(other),
                                     headers=dqm_headers())).json()
    assert first["filename"] == EXPECTED_NAME
    assert second["filename"] == "EMChistos_123456_DQM_1970_01_02_16_07_24.v2.root"
    assert third["filename"] == second["filename"]  # its retry is recognised too
    assert (data_dir / first["filename"]).read_bytes() == one_histogram_file
    assert (data_dir / second["filename"]).read_bytes() == other
    listing = await (await client.get("/rest/api/files", headers={"token": TOKEN})).json()
    assert listing["files"] == [EXPECTED_NAME, second["filename"]]


async def test_a_sound_file_after_a_broken_one_keeps_the_agents_name(client, data_dir,
                                                                     one_histogram_file):
    """An agent's file that was broken (quarantined) and then sent again whole: the sound copy
    gets the agent's name (it got `.v2`, beside nothing in the data directory), the broken one
    is kept in quarantine under the next variant, and a retry of either is recognised."""
    broken = one_histogram_file[:len(one_histogram_file) // 2]
    first = await client.post("/rest/api/files", data=multipart_file(broken),
                               headers=dqm_headers())
    assert first.status == 400 and (await first.json())["filename"] == EXPECTED_NAME
    second = await client.post("/rest/api/files", data=multipart_file(one_histogram_file),
                               headers=dqm_headers())
    assert second.status == 200 and (await second.json())["filename"] == EXPECTED_NAME
    aside = EXPECTED_NAME.replace(".root", ".v2.root")
    assert (data_dir / EXPECTED_NAME).read_bytes() == one_histogram_file
    assert (data_dir / "quarantine" / aside).read_bytes() == broken
    assert not (data_dir / "quarantine" / EXPECTED_NAME).exists()
    info = await (await client.get(f"/rest/api/files/{aside}/info",
                                   headers={"token": TOKEN})).json()
    assert (info["state"], info["location"]) == ("invalid", "quarantine")
    for content, status, name in ((broken, 400, aside), (one_histogram_file, 200, EXPECTED_NAME)):
        again = await client.post("/rest/api/files", data=multipart_file(content),
                                  headers=dqm_headers())
        assert again.status == status and (await again.json())["filename"] == name
    assert stored_files(data_dir) == [EXPECTED_NAME, f"quarantine/{aside}"]  # nothing more


async def test_a_retry_is_recognised_in_whichever_variant_holds_it(client, data_dir,
                                                                   one_histogram_file):
    """Broken A, then broken C under the same name (C takes the name, A is set aside), then A
    again: A's retry is recognised where A is, and nothing is stored twice."""
    broken_a = one_histogram_file[:len(one_histogram_file) // 2]
    broken_c = one_histogram_file[:len(one_histogram_file) // 3]
    names = []
    for content in (broken_a, broken_c, broken_a):
        answer = await client.post("/rest/api/files", data=multipart_file(content),
                                   headers=dqm_headers())
        assert answer.status == 400
        names.append((await answer.json())["filename"])
    aside = EXPECTED_NAME.replace(".root", ".v2.root")
    assert names == [EXPECTED_NAME, EXPECTED_NAME, aside]
    quarantine = data_dir / "quarantine"
    assert sorted(path.name for path in quarantine.iterdir()) == [EXPECTED_NAME, aside]
    assert (quarantine / aside).read_bytes() == broken_a
    assert (quarantine / EXPECTED_NAME).read_bytes() == broken_c


async def test_sixteen_concurrent_uploads(client, tmp_path, data_dir):
    """Sixteen agents uploading at once all get their own file stored intact."""
    contents = {}
    for run in range(16):
        contents[run] = write_dqm_file(tmp_path / f"run{run}.root", n_histograms=run + 1).read_bytes()

    async def upload(run: int) -> dict:
        response = await client.post("/rest/api/files", data=multipart_file(contents[run]),
                                     headers=dqm_headers(run=run))
        assert response.status == 200
        return await response.json()

    answers = await asyncio.gather(*(upload(run) for run in range(16)))
    for run, answer in enumerate(answers):
        assert len(answer["received"]) == run + 1 + 2
        assert (data_dir / answer["filename"]).read_bytes() == contents[run]
    listing = await (await client.get("/rest/api/files", headers={"token": TOKEN})).json()
    assert len(listing["files"]) == 16


async def test_real_root_files(client, shared_root_files):
    """Every real ROOT file written by ROOT itself is accepted and its top-level objects listed."""
    for number, path in enumerate(shared_root_files):
        content = path.read_bytes()
        response = await client.post("/rest/api/files", data=multipart_file(content),
                                     headers=dqm_headers(run=number))
        body = await response.json()
        assert response.status == 200, (path.name, body)
        with uproot.open(path) as root_file:
            expected = root_file.classnames(recursive=False, cycle=False)
        # uproot names a directory's class as its key stores it (TDirectory); ROOT, and so
        # the Overwatch receiver, as the object it reads (TDirectoryFile).
        assert body["received"] == {
            name: f"Obj name: {name}, Obj IsA() Name: "
                  f"{'TDirectoryFile' if class_name == 'TDirectory' else class_name}"
            for name, class_name in expected.items()
        }, path.name
        assert body["sha256"] == hashlib.sha256(content).hexdigest()


async def test_overwatch_file_from_shared_data(client, shared_root_files):
    """The Overwatch receiver's own test file gives exactly the answer it gave."""
    (overwatch,) = [path for path in shared_root_files if path.name.startswith("overwatch")]
    response = await client.post("/rest/api/files", data=multipart_file(overwatch.read_bytes()),
                                 headers=dqm_headers())
    body = await response.json()
    assert body["filename"] == overwatch.name.removeprefix("overwatch-")
    assert body["received"] == {"test": "Obj name: test, Obj IsA() Name: TH1F"}


def _repr_digest(content: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(content).digest()).decode()}:"


@pytest.mark.parametrize("as_multipart", [True, False], ids=["multipart", "raw"])
async def test_matching_digests_are_accepted(client, one_histogram_file, as_multipart):
    """An upload carrying the right Repr-Digest and Content-MD5 of its file is stored."""
    headers = dqm_headers(**{
        "Repr-Digest": _repr_digest(one_histogram_file),
        "Content-MD5": base64.b64encode(hashlib.md5(one_histogram_file).digest()).decode(),
    })
    data = multipart_file(one_histogram_file) if as_multipart else one_histogram_file
    response = await client.post("/rest/api/files", data=data, headers=headers)
    body = await response.json()
    assert response.status == 200, body
    assert body["sha256"] == hashlib.sha256(one_histogram_file).hexdigest()


@pytest.mark.parametrize("header", ["Repr-Digest", "Content-MD5"])
async def test_digest_mismatch_keeps_nothing(client, one_histogram_file, data_dir, header):
    """A file whose bytes differ from the digest the agent sent is refused, naming both
    digests, and nothing is kept anywhere."""
    other = b"root" + bytes(100)
    value = (_repr_digest(other) if header == "Repr-Digest"
             else base64.b64encode(hashlib.md5(other).digest()).decode())
    response = await client.post("/rest/api/files", data=multipart_file(one_histogram_file),
                                 headers=dqm_headers(**{header: value}))
    body = await response.json()
    assert response.status == 400
    assert f"{header} mismatch" in body["message"]
    sent = value.removeprefix("sha-256=:").removesuffix(":")
    received = (base64.b64encode(hashlib.sha256(one_histogram_file).digest()).decode()
                if header == "Repr-Digest"
                else base64.b64encode(hashlib.md5(one_histogram_file).digest()).decode())
    assert sent in body["message"] and received in body["message"]
    assert stored_files(data_dir) == []
    assert await client.server.app[CATALOG].all_names() == set()


@pytest.mark.parametrize("headers", [{"Repr-Digest": "sha-256=abc"},
                                     {"Repr-Digest": "sha-256=:!!!:"},
                                     {"Repr-Digest": "sha-256=:AAAA:"},
                                     {"Content-MD5": "not base64 !"},
                                     {"Content-MD5": "é"},  # not even ASCII
                                     {"Repr-Digest": "sha-256=:é:"}])
async def test_malformed_digest_headers(client, one_histogram_file, data_dir, headers):
    """A malformed digest header is refused before anything is written."""
    response = await client.post("/rest/api/files", data=one_histogram_file,
                                 headers=dqm_headers(**headers))
    assert response.status == 400
    assert next(iter(headers)) in (await response.json())["message"]
    assert stored_files(data_dir) == []


async def test_body_read_from_the_socket_in_awkward_pieces(client, tmp_path, data_dir):
    """A 24 MiB multipart body sent in uneven pieces, with pauses, a preamble and a second
    field after the file, is stored byte for byte; the answer closes the connection (its
    body was read straight from the socket, past aiohttp's parser)."""
    rng = random.Random(11)
    root_part = write_dqm_file(tmp_path / "dqm.root").read_bytes()
    # The padding repeats near-delimiters: the parser must not cut the file there.
    padding = (b"\r\n--dqm-test-boundar" + bytes(rng.randrange(256) for _ in range(4000))) * 6000
    content = root_part + padding
    boundary = b"dqm-test-boundary"
    body = (b"preamble to ignore\r\n--" + boundary + b"\r\nContent-Disposition: form-data; "
            b"name=\"file\"; filename=\"big.root\"\r\n\r\n" + content + b"\r\n--" + boundary
            + b"\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--"
            + boundary + b"--\r\n")
    head = (f"POST /rest/api/files HTTP/1.1\r\nHost: x\r\ntoken: {TOKEN}\r\nrunNumber: 7\r\n"
            f"timeStamp: 1700000000\r\namoreAgent: EMC\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary.decode()}\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head + body[:1000])
    position = 1000
    while position < len(body):
        step = rng.choice([1, 7, 4096, 65_537, 1_000_003])
        writer.write(body[position:position + step])
        position += step
        await writer.drain()
        if rng.random() < 0.05:
            await asyncio.sleep(0.01)
    status_line = await reader.readline()
    headers = {}
    while (line := await reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    answer = json.loads(await reader.readexactly(int(headers["content-length"])))
    assert b" 200 " in status_line, answer
    assert headers["connection"] == "close"
    assert await reader.read() == b""  # the daemon closed the connection after its answer
    writer.close()
    assert answer["sha256"] == hashlib.sha256(content).hexdigest()
    assert (data_dir / answer["filename"]).read_bytes() == content


@pytest.mark.parametrize("held_back", [1, 2, 5000])
async def test_a_client_pausing_before_its_last_bytes(client, one_histogram_file, data_dir,
                                                     held_back):
    """A client sends all but the last bytes of its body, pauses (the daemon has taken over
    the socket by then, with that little left to read), then sends them: the upload is stored
    and answered, not left spinning."""
    head = (f"POST /rest/api/files HTTP/1.1\r\nHost: x\r\ntoken: {TOKEN}\r\nrunNumber: 9\r\n"
            f"timeStamp: 1700000000\r\namoreAgent: EMC\r\n"
            f"Content-Length: {len(one_histogram_file)}\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head + one_histogram_file[:-held_back])
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.write(one_histogram_file[-held_back:])
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert (data_dir / body["filename"]).read_bytes() == one_histogram_file


async def test_keep_alive_client_uploads_twice(client, one_histogram_file, tmp_path):
    """A client that keeps its connection open is told to close it after an upload, and its
    next upload (on a new connection) works."""
    other = write_dqm_file(tmp_path / "other.root").read_bytes()
    for run, content in ((1, one_histogram_file), (2, other)):
        response = await client.post("/rest/api/files", data=multipart_file(content),
                                     headers=dqm_headers(run=run))
        assert response.status == 200, await response.text()
        assert (await response.json())["sha256"] == hashlib.sha256(content).hexdigest()


async def test_gzip_encoded_body(client, one_histogram_file, data_dir):
    """A body sent with Content-Encoding: gzip is decoded before it is stored."""
    boundary = "gzip-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n").encode() \
        + one_histogram_file + f"\r\n--{boundary}--\r\n".encode()
    response = await client.post(
        "/rest/api/files", data=gzip.compress(body),
        headers=dqm_headers(**{"Content-Encoding": "gzip",
                               "Content-Type": f"multipart/form-data; boundary={boundary}"}))
    assert response.status == 200, await response.text()
    assert (data_dir / (await response.json())["filename"]).read_bytes() == one_histogram_file


async def test_a_body_refused_part_way_is_answered_not_reset(client, data_dir):
    """A multipart body that goes wrong at its start while 16 MiB more are on their way: the
    daemon reads and drops the rest, so the client gets its 400 instead of a reset."""
    body = b"--b\r\nnot a header line\r\n\r\n" + os.urandom(16 * 1024 * 1024)
    head = (f"POST /rest/api/files HTTP/1.1\r\nHost: x\r\ntoken: {TOKEN}\r\nrunNumber: 8\r\n"
            f"timeStamp: 1700000000\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head)
    for start in range(0, len(body), 1024 * 1024):
        writer.write(body[start:start + 1024 * 1024])
        await writer.drain()
    answer = await reader.read()  # the whole answer, then the daemon's close
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"Malformed multipart body" in answer
    assert [path for path in data_dir.rglob("*.part")] == []


async def test_same_name_at_the_same_moment(client, one_histogram_file, tmp_path, data_dir):
    """Agents racing for one DQM name: identical files are stored once, a different one beside
    it as `.v2`; nothing is overwritten, every answer names what was kept."""
    other = write_dqm_file(tmp_path / "other.root").read_bytes()

    async def send(content: bytes) -> dict:
        response = await client.post("/rest/api/files", data=multipart_file(content),
                                     headers=dqm_headers(run=42))
        assert response.status == 200
        return await response.json()

    answers = await asyncio.gather(send(one_histogram_file), send(one_histogram_file),
                                   send(other), send(one_histogram_file))
    by_digest = {}
    for answer in answers:
        by_digest.setdefault(answer["sha256"], set()).add(answer["filename"])
    assert sorted(len(names) for names in by_digest.values()) == [1, 1]
    names = sorted(name for names in by_digest.values() for name in names)
    assert names == ["EMChistos_42_DQM_1970_01_02_16_07_24.root",
                     "EMChistos_42_DQM_1970_01_02_16_07_24.v2.root"]
    for name in names:
        assert hashlib.sha256((data_dir / name).read_bytes()).hexdigest() in by_digest
    assert stored_files(data_dir) == names
