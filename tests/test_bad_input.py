"""Bad input gets a clear JSON answer and leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import uproot

from dqm_daemon import quarantine
from dqm_daemon.app import create_app
from dqm_daemon.appkeys import CATALOG, INGEST, STORAGE, UPLOADS

from .conftest import TOKEN, dqm_headers, make_settings, multipart_file
from .rootfiles import write_one_histogram_file
from .test_upload import INVALID, stored_files


async def assert_nothing_kept(client, data_dir: Path) -> None:
    assert [name for name in stored_files(data_dir) if not name.startswith("quarantine/")] == []
    assert await client.server.app[CATALOG].all_names() == set()


async def post(client, content: bytes, headers: dict) -> tuple[int, dict]:
    response = await client.post("/rest/api/files", data=multipart_file(content), headers=headers)
    return response.status, await response.json()


async def test_no_token(client, one_histogram_file, data_dir):
    """An agent without a token is told to pass one."""
    headers = dqm_headers()
    del headers["token"]
    status, body = await post(client, one_histogram_file, headers)
    assert (status, body["message"]) == (401, "Must pass a token!")
    await assert_nothing_kept(client, data_dir)


async def test_unknown_token(client, one_histogram_file, data_dir):
    """A wrong token is refused, and the answer never echoes a token."""
    status, body = await post(client, one_histogram_file, dqm_headers(token="not-the-token"))
    assert (status, body["message"]) == (401, "Received token, but it is invalid!")
    assert "not-the-token" not in str(body) and TOKEN not in str(body)
    await assert_nothing_kept(client, data_dir)


async def test_listing_and_download_need_a_token(client):
    """Reading files back needs a token too, as on the old receiver."""
    for path in ("/rest/api/files", "/rest/api/files/anything.root"):
        response = await client.get(path)
        assert response.status == 401
        assert (await response.json())["message"] == "Must pass a token!"


@pytest.mark.parametrize(
    ("header", "value", "fragment"),
    [
        ("runNumber", None, "Missing required header runNumber"),
        ("runNumber", "12a", "runNumber must be an integer, got '12a'"),
        ("runNumber", "9_9", "runNumber must be an integer, got '9_9'"),  # int() takes it
        ("runNumber", "-4", "runNumber must not be negative, got '-4'"),
        ("timeStamp", None, "Missing required header timeStamp"),
        ("timeStamp", "yesterday", "timeStamp must be an integer, got 'yesterday'"),
        ("dataStatus", "end", "dataStatus must be an integer, got 'end'"),
        ("runNumber", str(2**63), "runNumber must be at most 9223372036854775807"),
        ("timeStamp", "1000000000000", "timeStamp must be at most 253402297199"),
        # The last second of the year 9999 in UTC is already the year 10000 in Zurich.
        ("timeStamp", "253402297200", "timeStamp must be at most 253402297199"),
        ("timeStamp", "253402300799", "timeStamp must be at most 253402297199"),
        ("dataStatus", str(2**40), "dataStatus must be at most 2147483647"),
        # More digits than int() converts: still the client's mistake, not a 500.
        ("runNumber", "9" * 5000,
         "runNumber must be at most 9223372036854775807, got a value of 5000 characters"),
        ("timeStamp", "-" + "9" * 5000, "timeStamp must not be negative"),
        ("runNumber", "12a" * 2000, "got a value of 6000 characters"),  # not quoted
    ],
)
async def test_bad_integer_headers(client, one_histogram_file, data_dir, header, value, fragment):
    """A missing or malformed header is named in the answer, with its value."""
    headers = dqm_headers()
    if value is None:
        headers.pop(header)
    else:
        headers[header] = value
    status, body = await post(client, one_histogram_file, headers)
    assert status == 400
    assert fragment in body["message"]
    # Shaped as the Overwatch receiver's answer to a bad header: no objects, the headers echoed.
    assert body["received"] is None
    assert body["receivedHeaders"]["Amoreagent"] == "EMC"
    assert "Token" not in body["receivedHeaders"] and TOKEN not in str(body)
    await assert_nothing_kept(client, data_dir)


@pytest.mark.parametrize("data_status", ["-1", "-2147483648", "7"])
async def test_any_32_bit_data_status_is_taken(client, one_histogram_file, data_status):
    """The Overwatch receiver took any integer dataStatus (its own default was -1): so does
    this one, kept as sent; only 1 and 2 mean start and end of data."""
    status, body = await post(client, one_histogram_file, dqm_headers(dataStatus=data_status))
    assert status == 200, body
    record = await client.server.app[CATALOG].get(body["filename"])
    assert record.data_status == int(data_status)
    too_low = dqm_headers(dataStatus="-2147483649", runNumber="2")
    status, body = await post(client, one_histogram_file, too_low)
    assert status == 400 and "dataStatus must not be below -2147483648" in body["message"]


@pytest.mark.parametrize("agent", ["../EMC", "EMC/x", "..", "E..MC", "EMC x", "EMC\tx",
                                   ".hidden", "EMC\\x", "", "EMC;x", "x" * 65, "-rf"])
async def test_bad_agent_names(client, one_histogram_file, data_dir, agent):
    """An agent name that could escape the data directory is refused; nothing is written."""
    status, body = await post(client, one_histogram_file, dqm_headers(agent=agent))
    assert status == 400
    assert "amoreAgent" in body["message"]
    await assert_nothing_kept(client, data_dir)
    assert stored_files(data_dir) == []
    assert not list(data_dir.parent.glob("*histos*"))


async def test_control_character_in_agent_over_raw_socket(client, one_histogram_file, data_dir):
    """Control characters in the agent name (sent on a raw socket) are refused: HTTP itself
    forbids them, so aiohttp's parser answers 400 before any handler runs."""
    request = (
        b"POST /rest/api/files HTTP/1.1\r\nHost: x\r\ntoken: " + TOKEN.encode()
        + b"\r\nrunNumber: 1\r\ntimeStamp: 2\r\namoreAgent: EM\x7fC\r\n"
        + b"Content-Length: 4\r\nConnection: close\r\n\r\nroot"
    )
    answer = await _raw_exchange(client.port, request)
    assert answer.split(b" ")[1] == b"400", answer[:200]
    await assert_nothing_kept(client, data_dir)


async def _raw_exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


async def test_empty_body(client, data_dir):
    """An empty raw body is refused with the old receiver's message."""
    response = await client.post("/rest/api/files", data=b"", headers=dqm_headers())
    body = await response.json()
    assert (response.status, body["message"]) == (400, "No file uploaded and the payload was empty")
    await assert_nothing_kept(client, data_dir)
    assert list((data_dir / ".incoming").iterdir()) == []


async def test_multipart_without_file_field(client, data_dir):
    """A form without a `file` field is refused the same way."""
    form = aiohttp.MultipartWriter("form-data")
    form.append("value").set_content_disposition("form-data", name="other")
    response = await client.post("/rest/api/files", data=form, headers=dqm_headers())
    body = await response.json()
    assert (response.status, body["message"]) == (400, "No file uploaded and the payload was empty")
    await assert_nothing_kept(client, data_dir)


@pytest.mark.parametrize(
    "kind", ["text", "garbled", "truncated", "header_only", "empty_file_field"]
)
async def test_invalid_root_is_quarantined(client, one_histogram_file, data_dir, kind):
    """A file that is not sound ROOT is answered 400, kept in quarantine, never listed."""
    content = {
        "text": b"this is a text file, not a ROOT file\n" * 10,
        "garbled": one_histogram_file[:100] + bytes(range(256)) * 4 + one_histogram_file[1124:],
        "truncated": one_histogram_file[: len(one_histogram_file) // 2],
        "header_only": one_histogram_file[:100],
        "empty_file_field": b"",
    }[kind]
    status, body = await post(client, content, dqm_headers())
    if kind == "empty_file_field":
        assert (status, body["message"]) == (400, "No file uploaded and the payload was empty")
        assert body["received"] is None
        await assert_nothing_kept(client, data_dir)
        return
    assert (status, body["message"]) == (400, INVALID), body
    assert body["reason"]
    assert body["received"] is None  # as the Overwatch receiver answered a file it could not open
    name = body["filename"]
    assert (data_dir / "quarantine" / name).read_bytes() == content
    assert not (data_dir / name).exists()
    listing = await (await client.get("/rest/api/files", headers={"token": TOKEN})).json()
    assert listing["files"] == []
    download = await client.get(f"/rest/api/files/{name}", headers={"token": TOKEN})
    assert download.status == 404


async def test_too_large_declared(aiohttp_client, data_dir, one_histogram_file):
    """An upload whose Content-Length exceeds the maximum is refused before it is read."""
    client = await aiohttp_client(create_app(make_settings(data_dir, max_upload_bytes=1000)))
    response = await client.post("/rest/api/files", data=one_histogram_file, headers=dqm_headers())
    assert response.status == 413
    assert "exceeds the maximum of 1000 bytes" in (await response.json())["message"]
    await assert_nothing_kept(client, data_dir)


async def test_too_large_chunked(aiohttp_client, data_dir, one_histogram_file):
    """A chunked upload (no length announced) is cut off at the maximum; nothing is kept."""
    client = await aiohttp_client(create_app(make_settings(data_dir, max_upload_bytes=1000)))

    async def body():
        for start in range(0, len(one_histogram_file), 300):
            yield one_histogram_file[start:start + 300]

    response = await client.post("/rest/api/files", data=body(), headers=dqm_headers())
    assert response.status == 413
    assert "exceeds the maximum of 1000 bytes" in (await response.json())["message"]
    await assert_nothing_kept(client, data_dir)
    assert list((data_dir / ".incoming").iterdir()) == []


async def test_disk_reserve(aiohttp_client, data_dir, one_histogram_file):
    """With free disk below the reserve, uploads are refused with 507 and nothing is kept."""
    client = await aiohttp_client(
        create_app(make_settings(data_dir, disk_reserve_bytes=1 << 60))
    )
    status, body = await post(client, one_histogram_file, dqm_headers())
    assert status == 507
    assert "disk" in body["message"]
    await assert_nothing_kept(client, data_dir)


async def test_too_many_concurrent_uploads(aiohttp_client, data_dir, one_histogram_file):
    """One upload more than allowed is answered 503 with Retry-After; the others go on."""
    client = await aiohttp_client(
        create_app(make_settings(data_dir, max_concurrent_uploads=1, retry_after_seconds=7))
    )
    release = asyncio.Event()

    async def slow_body():
        yield one_histogram_file[:100]
        await release.wait()
        yield one_histogram_file[100:]

    first = asyncio.create_task(
        client.post("/rest/api/files", data=slow_body(), headers=dqm_headers())
    )
    while len(client.server.app[UPLOADS]) == 0:
        await asyncio.sleep(0.01)
    status, body = await post(client, one_histogram_file, dqm_headers(run=2))
    assert status == 503
    response = await client.post("/rest/api/files", data=one_histogram_file,
                                 headers=dqm_headers(run=3))
    assert response.headers["Retry-After"] == "7"
    assert "Too many uploads" in body["message"]
    # With Expect: 100-continue the refusal comes before the body: no 100 Continue first
    # (the client would send its whole body only to be refused).
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(("POST /rest/api/files HTTP/1.1\r\nHost: x\r\ntoken: " + TOKEN +
                  "\r\nrunNumber: 5\r\ntimeStamp: 2\r\nExpect: 100-continue\r\n"
                  "Content-Length: 100000000\r\n\r\n").encode())
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 503"), status_line
    writer.close()
    await writer.wait_closed()
    release.set()
    first_response = await first
    assert first_response.status == 200
    # The slot is free again.
    status, _ = await post(client, one_histogram_file, dqm_headers(run=4))
    assert status == 200


async def test_stalled_client_is_dropped(aiohttp_client, data_dir, one_histogram_file):
    """A client that stops sending is cut off after the read timeout; its bytes are removed."""
    client = await aiohttp_client(
        create_app(make_settings(data_dir, read_timeout_seconds=0.3))
    )
    stalled = asyncio.Event()

    async def stalling_body():
        yield one_histogram_file[:100]
        stalled.set()
        await asyncio.sleep(30)
        yield one_histogram_file[100:]

    response = await client.post("/rest/api/files", data=stalling_body(), headers=dqm_headers())
    assert response.status == 408
    assert "No data received" in (await response.json())["message"]
    assert stalled.is_set()
    await assert_nothing_kept(client, data_dir)
    assert list((data_dir / ".incoming").iterdir()) == []


async def test_disconnect_mid_upload_keeps_nothing(client, data_dir, one_histogram_file):
    """A client that disconnects mid-upload leaves no file and no temporary behind."""
    head = (
        f"POST /rest/api/files HTTP/1.1\r\nHost: x\r\ntoken: {TOKEN}\r\nrunNumber: 1\r\n"
        f"timeStamp: 2\r\nContent-Length: {len(one_histogram_file)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", client.port)) as raw:
        raw.sendall(head + one_histogram_file[:2000])
        while len(client.server.app[UPLOADS]) == 0:
            await asyncio.sleep(0.01)
        while client.server.app[UPLOADS].snapshot()[0].received_bytes < 2000:
            await asyncio.sleep(0.01)
    for _ in range(200):
        if len(client.server.app[UPLOADS]) == 0:
            break
        await asyncio.sleep(0.01)
    assert len(client.server.app[UPLOADS]) == 0
    await assert_nothing_kept(client, data_dir)
    assert list((data_dir / ".incoming").iterdir()) == []


async def test_expect_continue_refuses_before_the_body(client, one_histogram_file):
    """With Expect: 100-continue a bad token is answered before the client sends its body."""
    request = (
        "POST /rest/api/files HTTP/1.1\r\nHost: x\r\ntoken: wrong\r\nrunNumber: 1\r\n"
        "timeStamp: 2\r\nExpect: 100-continue\r\nContent-Length: 1000000000\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(request)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 401"), status_line
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    answer = await asyncio.wait_for(reader.readexactly(length), 5)
    assert b"Received token, but it is invalid!" in answer
    assert b"connection: close" in head.lower()
    assert b"x-request-id:" in head.lower()
    writer.close()
    await writer.wait_closed()


async def test_expect_continue_refusals_are_logged_and_counted(client):
    """A refusal at `Expect: 100-continue` comes before any middleware; it still gets its log
    line and request id, and (past the token check) counts as a rejected upload."""
    from prometheus_client.parser import text_string_to_metric_families
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        response = await client.post("/rest/api/files", data=b"x" * 1000, expect100=True,
                                     headers=dqm_headers(runNumber="x", amoreAgent="EMC"))
    assert response.status == 400
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert (line["status"], line["path"], line["request_id"]) == (
        400, "/rest/api/files", response.headers["X-Request-Id"])
    metrics = await (await client.get("/metrics")).text()
    rejected = [sample.value for family in text_string_to_metric_families(metrics)
                for sample in family.samples if sample.name == "dqm_uploads_total"
                and sample.labels == {"agent": "unknown", "result": "rejected"}]
    assert rejected == [1.0]


async def test_expect_continue_accepts_good_upload(client, one_histogram_file):
    """A good upload with Expect: 100-continue goes through as usual."""
    response = await client.post("/rest/api/files", data=one_histogram_file, headers=dqm_headers(),
                                 expect100=True)
    assert response.status == 200


async def test_unknown_route_and_method_are_json(client):
    """Unknown paths and methods answer JSON with a message, like every error."""
    response = await client.get("/nothing-here")
    assert response.status == 404
    assert "message" in await response.json()
    response = await client.delete("/rest/api/files", headers={"token": TOKEN})
    assert response.status == 405
    assert "message" in await response.json()


async def test_multipart_stalled_before_the_file_part(aiohttp_client, data_dir):
    """A client that stalls inside the multipart preamble is dropped after the read timeout."""
    client = await aiohttp_client(create_app(make_settings(data_dir, read_timeout_seconds=0.3)))
    head = (
        f"POST /rest/api/files HTTP/1.1\r\nHost: x\r\ntoken: {TOKEN}\r\nrunNumber: 1\r\n"
        "timeStamp: 2\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    preamble = b"--XyZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nabc"
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(head + f"{len(preamble):x}\r\n".encode() + preamble + b"\r\n")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    writer.close()
    await writer.wait_closed()
    assert len(client.server.app[UPLOADS]) == 0
    assert list((data_dir / ".incoming").iterdir()) == []


def test_a_client_that_does_not_read_its_answers_cannot_stall_the_daemon(tmp_path, daemon):
    """A keep-alive client sends a second upload while the answer to its first (large: it echoes
    the headers) still waits to be sent, and reads slowly: the daemon goes on answering others
    (the second body's thread once made the shared socket blocking, and the loop then blocked
    in send() for everyone)."""
    import urllib.request

    daemon.command = [sys.executable, str(Path(__file__).with_name("small_send_buffer_daemon.py"))]
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()

    def upload_head(run: int, length: int, padding: int) -> bytes:
        lines = ["POST /rest/api/files HTTP/1.1", f"Host: 127.0.0.1:{daemon.port}",
                 f"token: {TOKEN}", f"runNumber: {run}", "timeStamp: 1700000000",
                 "amoreAgent: SLOWREADER", f"Content-Length: {length}"]
        lines += [f"X-Pad-{index}: {'p' * 8000}" for index in range(padding)]  # echoed back
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def healthz_seconds() -> float:
        started = time.monotonic()
        urllib.request.urlopen(f"{daemon.url}/healthz", timeout=5).read()
        return time.monotonic() - started

    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        slow.connect(("127.0.0.1", daemon.port))
        slow.sendall(upload_head(1, len(content), 10) + content
                     + upload_head(2, len(content), 0) + content[:100])
        time.sleep(1.5)
        slow.settimeout(5)
        received = 0
        while received < 6000:
            received += len(slow.recv(6000 - received))
        time.sleep(0.5)
        assert healthz_seconds() < 2


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_is_not_its_content_encoding_is_a_400(client, data_dir, encoding,
                                                                caplog):
    """A body that does not decode as its Content-Encoding says is the client's mistake: 400
    with a message (it was a 500), nothing kept, the connection closed with the answer, and no
    error logged (aiohttp went on reading the broken body, and logged its failure)."""
    response = await client.post("/rest/api/files", data=b"plain bytes, not compressed" * 100,
                                  headers=dqm_headers(**{"Content-Encoding": encoding}))
    assert response.status == 400, await response.text()
    assert "Malformed request body" in (await response.json())["message"]
    assert response.headers["Connection"] == "close"
    await assert_nothing_kept(client, data_dir)
    await asyncio.sleep(0.1)
    assert [record.getMessage() for record in caplog.records if record.levelname == "ERROR"] == []


@pytest.mark.parametrize("after_the_body", [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"xx"])
def test_bytes_after_the_body_do_not_cost_the_client_its_answer(tmp_path, daemon,
                                                                 after_the_body):
    """A pipelined request, or a Content-Length too short, leaves bytes after the body: the
    client still gets its whole answer (closing with them unread made the kernel reset the
    connection and drop the answer on its way)."""
    import json

    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    lines = ["POST /rest/api/files HTTP/1.1", "Host: x", f"token: {TOKEN}", "runNumber: 7",
             "timeStamp: 1700000000", "amoreAgent: EMC", f"Content-Length: {len(content)}"]
    lines += [f"X-Pad-{index}: {'p' * 8000}" for index in range(60)]  # a long answer
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        client.connect(("127.0.0.1", daemon.port))
        client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + content[:100])
        time.sleep(0.3)  # the rest comes later: the body is read from the socket itself
        client.sendall(content[100:] + after_the_body)
        time.sleep(2)  # the client reads its answer a while later
        client.settimeout(10)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["state"] == "ok"


@pytest.mark.parametrize("path", ["/runs/{n}", "/runs/{n}.json", "/rest/api/files?run={n}",
                                  "/files/x.root?previews={n}"])
async def test_integers_of_thousands_of_digits_are_refused(client, path):
    """Numbers in paths and queries past what int() converts are a 400, never a 500."""
    response = await client.get(path.format(n="9" * 5000), headers={"token": TOKEN})
    assert response.status in (400, 404)
    body = await response.json()
    assert response.status == 400 or "No such file" in body["message"], body


async def test_malformed_part_headers_leave_no_trace_in_the_log_or_memory(tmp_path, daemon):
    """aiohttp warns about a malformed Content-Disposition: by default Python prints each
    distinct warning raw (client bytes in the daemon's log) and remembers it for ever (memory
    any client can grow). Each such upload is answered 400, and neither happens."""
    daemon.start()
    marker = "part-header-bytes-"
    async with aiohttp.ClientSession() as session:
        for number in range(350):
            if number == 50:  # warmed up
                rss_before = daemon.rss_kib()
            disposition = f'form-data; name="{marker}{number}{"x" * 8000}'  # unterminated
            body = (f"--b\r\nContent-Disposition: {disposition}\r\n\r\nroot\r\n--b--\r\n")
            async with session.post(f"{daemon.url}/rest/api/files", data=body.encode(),
                                    headers={**dqm_headers(run=number),
                                             "Content-Type": "multipart/form-data; boundary=b"},
                                    ) as answer:
                assert answer.status == 400
                assert (await answer.json())["message"] == (
                    "No file uploaded and the payload was empty")
    log = daemon.log_path.read_text()
    assert marker not in log and "BadContentDisposition" not in log
    assert daemon.rss_kib() - rss_before < 1024  # 300 remembered warnings: over 2.4 MB


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/healthz", 200), ("GET", "/rest/api/files", 401), ("GET", "/static/nowhere.css", 404),
    ("GET", "/status", 200), ("GET", "/static/style.css", 200),
    # no route at all, or none for the method
    ("GET", "/nothing-here", 404), ("GET", "/nothing%0Ahere", 404), ("DELETE", "/healthz", 405),
    ("PUT", "/status", 405)])
async def test_an_unknown_expectation_is_ignored(client, method, path, status):
    """An `Expect` other than 100-continue is ignored (RFC 9110 allows it): the request gets
    its usual answer, errors in JSON with a request id; aiohttp would answer 417 in plain text
    quoting it."""
    response = await client.request(method, path, headers={"Expect": "quote-me-" + TOKEN})
    assert response.status == status
    assert "quote-me" not in await response.text()
    if status >= 400:
        assert (await response.json())["status"] == status
        assert response.headers["X-Request-Id"]
    if status == 405:
        assert "GET" in response.headers["Allow"]


async def test_a_token_sent_elsewhere_is_never_quoted_back_or_logged(tmp_path, daemon):
    """A client that puts its token in another header, the path or a value the daemon quotes
    in its answer never finds it in an answer, nor the daemon's log."""
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    answers = []
    async with aiohttp.ClientSession() as session:
        echoing = {"X-Token": TOKEN, "X_Auth_Token": TOKEN, "Proxy-Authorization": TOKEN,
                   "X-Note": f"sent with {TOKEN} inside"}
        async with session.post(f"{daemon.url}/rest/api/files", data=multipart_file(content),
                                headers={**dqm_headers(), **echoing}) as answer:
            assert answer.status == 200
            echoed = (await answer.json())["receivedHeaders"]
            assert echoed["X-Note"] == "sent with [redacted] inside"
            answers.append(await answer.text())
        for extra in ({"runNumber": TOKEN}, {"Expect": "100-continue", "runNumber": TOKEN}):
            async with session.post(f"{daemon.url}/rest/api/files", data=content,
                                    headers={**dqm_headers(), **extra}) as answer:
                assert answer.status == 400
                answers.append(await answer.text())
        for path in (f"/rest/api/files/{TOKEN}", f"/runs/{TOKEN}"):
            async with session.get(f"{daemon.url}{path}", headers={"token": TOKEN}) as answer:
                assert answer.status == 404, path
                answers.append(await answer.text())
    assert all(TOKEN not in text for text in answers), answers
    assert TOKEN not in daemon.log_path.read_text()


async def test_a_token_holding_a_backslash_or_sent_as_a_header_name_is_not_echoed(tmp_path,
                                                                                  daemon):
    """A token an answer would quote escaped (a backslash doubled) or a header named with it
    is not echoed back either."""
    escaped = "Ab\\cdefgh123"  # Ab\cdefgh123
    daemon.configure(f"[tokens]\nquoted = '{escaped}'\n")
    daemon.start()
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/rest/api/files", data=content,
                                headers={**dqm_headers(token=escaped), "runNumber": escaped}
                                ) as answer:
            assert answer.status == 400
            refused = await answer.text()
        async with session.post(f"{daemon.url}/rest/api/files", data=multipart_file(content),
                                headers={**dqm_headers(token=escaped), "Xy7Secret12Q": "1"}
                                ) as answer:
            assert answer.status == 200
            echoed = await answer.text()
    daemon.configure(f"[tokens]\nnamed = 'Xy7Secret12Q'\n")
    assert "Xy7Secret12Q" in echoed  # not a token of that daemon: echoed as any header
    daemon.kill(signal.SIGKILL)
    daemon.start()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/rest/api/files", data=multipart_file(content),
                                headers={**dqm_headers(token="Xy7Secret12Q", run=2),
                                         "Xy7Secret12Q": "1"}) as answer:
            assert answer.status == 200
            named = await answer.text()
    for text in (refused, named):
        assert "cdefgh123" not in text and "Xy7Secret12Q" not in text, text


@pytest.mark.parametrize("token", ["\\abcdefgh12", "'abc\"defgh12", "plainTokenValue1"])
def test_a_token_is_redacted_whole_as_sent_and_as_quoted(token):
    """A token is replaced whole, as sent and as a message quotes it (escaped), never leaving
    an escape character or a part of it behind."""
    from dqm_daemon.middlewares import redact_tokens

    for form in (token, repr(token)[1:-1]):
        assert redact_tokens(f"got {form} here", [token]) == "got [redacted] here"


async def test_silent_and_stalled_clients_are_let_go(tmp_path, daemon):
    """A connection that never sends a request, and a client that stops taking its download,
    are closed after the read timeout: neither holds a descriptor (socket, open file) or the
    answer's memory for ever. The kernel's abort of the stalled one is no error in the log."""
    daemon.configure("read_timeout_seconds = 2\n")
    daemon.start()
    path = tmp_path / "noise.root"
    with uproot.recreate(path) as root_file:  # random contents: 24 MB
        root_file["noise"] = (np.random.default_rng(7).random(3_000_000),
                              np.linspace(0, 1, 3_000_001))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/rest/api/files",
                                data=multipart_file(path.read_bytes()),
                                headers=dqm_headers()) as answer:
            assert answer.status == 200
            name = (await answer.json())["filename"]

    def open_on(suffix: str) -> int:
        count = 0
        for descriptor in Path(f"/proc/{daemon.process.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                count += os.readlink(descriptor).endswith(suffix)
        return count

    silent = socket.create_connection(("127.0.0.1", daemon.port))
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", daemon.port))
    stalled.sendall(f"GET /rest/api/files/{name} HTTP/1.1\r\nHost: x\r\n"
                    f"token: {TOKEN}\r\n\r\n".encode())
    try:
        for _ in range(100):
            if open_on(name):
                break
            await asyncio.sleep(0.05)
        assert open_on(name) >= 1  # the download is under way, its file open
        await asyncio.sleep(1)
        assert open_on(name) >= 1  # and held: the client takes nothing
        silent.settimeout(15)
        started = time.monotonic()
        assert silent.recv(100) == b""  # closed by the daemon
        assert time.monotonic() - started < 10
        for _ in range(300):
            if not open_on(name):
                break
            await asyncio.sleep(0.05)
        assert open_on(name) == 0
    finally:
        silent.close()
        stalled.close()
    log = daemon.log_path.read_text()
    assert "Unhandled exception" not in log and "Traceback" not in log


async def test_quarantined_files_are_removed_after_their_retention(client, data_dir,
                                                                    one_histogram_file):
    """Broken uploads are kept in quarantine for `quarantine_retention_days` (30), then removed
    with their rows, so a stream of them cannot fill the disk over months; sound files stay."""
    app = client.server.app
    status, broken = await post(client, b"not a ROOT file" * 100, dqm_headers(run=1))
    assert status == 400
    status, sound = await post(client, one_histogram_file, dqm_headers(run=2))
    assert status == 200
    now = datetime.datetime.now(datetime.UTC)
    for days, retention, removed in ((29, 30.0, 0), (31, 0.0, 0), (31, 30.0, 1)):
        assert await quarantine.remove_expired(app[CATALOG], app[INGEST], retention,
                                               now + datetime.timedelta(days=days)) == removed
    assert not (data_dir / "quarantine" / broken["filename"]).exists()
    assert await app[CATALOG].get(broken["filename"]) is None
    assert (data_dir / sound["filename"]).read_bytes() == one_histogram_file
    assert (await app[CATALOG].get(sound["filename"])).state == "ok"


async def test_the_quarantine_sweep_never_removes_a_fresh_file_under_a_reused_name(
        client, data_dir):
    """An expired broken file is being removed when its agent sends other broken bytes under
    the same name: the upload waits for the removal (or sets the old one aside first), and
    its fresh file and row, just answered 400, stay."""
    app = client.server.app
    status, first = await post(client, b"not ROOT, the first" * 50, dqm_headers(run=7))
    assert status == 400
    name = first["filename"]
    with sqlite3.connect(data_dir / "catalog.sqlite3") as catalog:  # a month and more ago
        catalog.execute("UPDATE files SET received_at = '2000-01-01T00:00:00.000000Z'"
                        " WHERE name = ?", (name,))
    storage, removing, release = app[STORAGE], asyncio.Event(), asyncio.Event()
    remove = storage.remove_quarantined

    async def slow_remove(removed_name: str) -> None:  # the sweep caught between its steps
        removing.set()
        await release.wait()
        await remove(removed_name)

    storage.remove_quarantined = slow_remove
    sweep = asyncio.create_task(quarantine.remove_expired(
        app[CATALOG], app[INGEST], 30, datetime.datetime.now(datetime.UTC)))
    await removing.wait()
    second = asyncio.create_task(post(client, b"not ROOT, the second" * 50, dqm_headers(run=7)))
    await asyncio.sleep(0.5)
    release.set()
    status, fresh = await second
    await sweep
    assert status == 400
    row = await app[CATALOG].get(fresh["filename"])
    assert row is not None and row.received_at > "2001"
    assert (data_dir / "quarantine" / fresh["filename"]).read_bytes() == (
        b"not ROOT, the second" * 50)


async def test_files_in_quarantine_without_a_row_go_too_and_one_failure_stops_nothing(
        client, data_dir):
    """The retention sweep also removes files of the quarantine that have no catalog row
    (left by a crash while one was set aside, or kept beside as `.stray-…`) once they are as
    old, never a younger one; and an entry it cannot remove does not stop it."""
    import os

    app = client.server.app
    quarantined = data_dir / "quarantine"
    old, young = quarantined / "EMChistos_1_DQM_2000_01_01_00_00_00.root", quarantined / "x.stray-1"
    for path in (old, young):
        path.write_bytes(b"broken bytes")
    month_ago = time.time() - 40 * 86400
    os.utime(old, (month_ago, month_ago))
    status, blocked = await post(client, b"not ROOT, the first" * 50, dqm_headers(run=8))
    assert status == 400
    status, second = await post(client, b"not ROOT, the second" * 50, dqm_headers(run=9))
    assert status == 400
    with sqlite3.connect(data_dir / "catalog.sqlite3") as catalog:  # both a month and more ago
        catalog.execute("UPDATE files SET received_at = '2000-01-01T00:00:00.000000Z'")
    # The oldest row's file cannot be removed (a directory there, put by hand).
    (quarantined / blocked["filename"]).unlink()
    (quarantined / blocked["filename"]).mkdir()
    assert await quarantine.remove_expired(app[CATALOG], app[INGEST], 30,
                                           datetime.datetime.now(datetime.UTC)) == 1
    assert not old.exists() and young.exists()
    assert not (quarantined / second["filename"]).exists()
    assert await app[CATALOG].get(second["filename"]) is None
