"""GET /rest/api/files and /rest/api/files/{filename}: listing and serving files back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os

import aiohttp
import pytest

from dqm_daemon.app import create_app
from dqm_daemon.appkeys import CATALOG, STORAGE

from .conftest import TOKEN, UPLOADER_NAME, dqm_headers, make_settings, multipart_file
from .rootfiles import write_dqm_file, write_one_histogram_file

AUTH = {"token": TOKEN}


async def upload(client, content: bytes, **header_values) -> dict:
    response = await client.post(
        "/rest/api/files", data=multipart_file(content), headers=dqm_headers(**header_values)
    )
    body = await response.json()
    assert response.status == 200, body
    return body


async def list_names(client, **query) -> list[str]:
    response = await client.get("/rest/api/files", headers=AUTH, params=query)
    assert response.status == 200
    return (await response.json())["files"]


async def test_listing_ignores_non_dqm_files(client, one_histogram_file, data_dir):
    """Only DQM files are listed: not other files lying in the data directory."""
    body = await upload(client, one_histogram_file)
    (data_dir / "notes.txt").write_text("shift notes")
    (data_dir / "other.root").write_bytes(one_histogram_file)
    assert await list_names(client) == [body["filename"]]


async def test_listing_is_sorted_and_filtered(client, one_histogram_file):
    """The listing is sorted and can be narrowed by run, agent and time."""
    uploads = [
        ("EMC", 300, 1_700_000_000),
        ("TPC", 300, 1_700_000_600),
        ("EMC", 301, 1_700_001_200),
        ("EMC", 300, 1_700_000_300),
    ]
    names = {}
    for agent, run, timestamp in uploads:
        body = await upload(client, one_histogram_file, agent=agent, run=run, timestamp=timestamp)
        names[(agent, run, timestamp)] = body["filename"]
    assert await list_names(client) == sorted(names.values())
    assert await list_names(client, run="300") == sorted(
        name for key, name in names.items() if key[1] == 300)
    assert await list_names(client, agent="TPC") == [names[("TPC", 300, 1_700_000_600)]]
    assert await list_names(client, since="1700000600") == sorted(
        name for key, name in names.items() if key[2] >= 1_700_000_600)
    assert await list_names(client, since="2023-11-14T22:20:00Z") == sorted(
        name for key, name in names.items() if key[2] >= 1_700_000_400)
    assert await list_names(client, run="300", agent="EMC") == sorted(
        [names[("EMC", 300, 1_700_000_000)], names[("EMC", 300, 1_700_000_300)]])


async def test_details_come_a_page_at_a_time(client, one_histogram_file):
    """`details=1` gives catalog rows `limit` at a time, in name order, with `next_after` for
    the next page (null on the last), filters applying; the plain listing gives every name."""
    for run in range(5):
        await upload(client, one_histogram_file, agent="EMC", run=900 + run)
    await upload(client, one_histogram_file, agent="TPC", run=900)
    names = await list_names(client)
    assert len(names) == 6
    pages, after = [], None
    while True:
        params = {"details": "1", "limit": "2", "agent": "EMC", **({"after": after} if after else {})}
        response = await client.get("/rest/api/files", headers=AUTH, params=params)
        page = await response.json()
        pages.append([row["name"] for row in page["files"]])
        assert all(row["state"] == "ok" and "objects" not in row for row in page["files"])
        after = page["next_after"]
        if after is None:
            break
    assert pages == [names[0:2], names[2:4], [names[4]]]  # EMC's, before TPC's
    for limit in ("0", "10001", "x"):
        response = await client.get("/rest/api/files", headers=AUTH,
                                    params={"details": "1", "limit": limit})
        assert response.status == 400 and "limit" in (await response.json())["message"]


@pytest.mark.parametrize(("query", "fragment"), [({"run": "x"}, "run must be an integer"),
                                                 ({"run": "\uff19\uff18"}, "run must be an integer"),
                                                 ({"since": "last week"}, "since must be"),
                                                 ({"since": "P1D"}, "since must be"),
                                                 ({"since": "2020-01-01/2020-02-01"},
                                                  "since must be")])
async def test_listing_bad_filters(client, query, fragment):
    """A malformed filter is answered 400 naming it."""
    response = await client.get("/rest/api/files", headers=AUTH, params=query)
    assert response.status == 400
    assert fragment in (await response.json())["message"]


async def test_download_is_identical_to_upload(client, tmp_path):
    """The bytes served back are exactly the bytes the agent sent."""
    content = write_dqm_file(tmp_path / "dqm.root").read_bytes()
    body = await upload(client, content)
    response = await client.get(f"/rest/api/files/{body['filename']}", headers=AUTH)
    assert response.status == 200
    downloaded = await response.read()
    assert downloaded == content
    assert hashlib.sha256(downloaded).hexdigest() == body["sha256"]


async def test_the_request_log_says_what_a_download_answered(client, one_histogram_file):
    """A download's status is decided as the file is sent (Range, ETag): the request log line
    says that status, with its request id and the uploader, once per download."""
    from structlog.contextvars import merge_contextvars
    from structlog.testing import capture_logs

    body = await upload(client, one_histogram_file)
    url = f"/rest/api/files/{body['filename']}"
    etag = (await client.get(url, headers=AUTH)).headers["ETag"]
    with capture_logs(processors=[merge_contextvars]) as logs:
        answers = [await client.get(url, headers={**AUTH, **headers}) for headers in (
            {"Range": "bytes=100-199"}, {"If-None-Match": etag}, {})]
        for answer in answers:
            await answer.read()
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert [(line["status"], line["request_id"], line["path"], line["uploader"])
            for line in lines] == [
        (answer.status, answer.headers["X-Request-Id"], url, "emc-agent") for answer in answers]
    assert [answer.status for answer in answers] == [206, 304, 200]


async def test_a_file_answer_that_fails_before_it_is_sent_is_logged(client, monkeypatch):
    """A file's log line waits for its status; if preparing the answer fails first, the
    request is still logged, once, as failed."""
    from aiohttp import web
    from structlog.contextvars import merge_contextvars
    from structlog.testing import capture_logs

    def fail(*_args, **_kwargs):
        raise RuntimeError("injected fault before the answer's headers")

    monkeypatch.setattr(web.FileResponse, "_make_response", fail)
    with capture_logs(processors=[merge_contextvars]) as logs:
        with contextlib.suppress(aiohttp.ClientError):
            await (await client.get("/static/style.css")).read()
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert [(line["status"], line["path"]) for line in lines] == [(500, "/static/style.css")]
    assert lines[0]["request_id"]


async def test_download_range_and_etag(client, one_histogram_file):
    """Downloads support Range (resume) and ETag (no re-download of an unchanged file)."""
    body = await upload(client, one_histogram_file)
    url = f"/rest/api/files/{body['filename']}"
    partial = await client.get(url, headers={**AUTH, "Range": "bytes=100-199"})
    assert partial.status == 206
    assert await partial.read() == one_histogram_file[100:200]
    full = await client.get(url, headers=AUTH)
    etag = full.headers["ETag"]
    cached = await client.get(url, headers={**AUTH, "If-None-Match": etag})
    assert cached.status == 304
    tail = await client.get(url, headers={**AUTH, "Range": "bytes=-10"})
    assert tail.status == 206
    assert await tail.read() == one_histogram_file[-10:]
    # Preconditions: met, the file; failed, a 412 in JSON.
    for headers in ({"If-Match": etag}, {"If-Match": "*"},
                    {"If-Unmodified-Since": "Fri, 31 Dec 9999 23:59:59 GMT"}):
        matched = await client.get(url, headers={**AUTH, **headers})
        assert (matched.status, await matched.read()) == (200, one_histogram_file), headers
    for headers in ({"If-Match": '"another-version"'}, {"If-Match": f"W/{etag}"},
                    {"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:01 GMT"}):
        failed = await client.get(url, headers={**AUTH, **headers})
        assert failed.status == 412, headers
        assert "If-Match or If-Unmodified-Since" in (await failed.json())["message"]
    # Preconditions are judged before the Range (RFC 9110, 13.2.2).
    failed = await client.get(url, headers={**AUTH, "If-Match": '"another-version"',
                                            "Range": "bytes=999999-"})
    assert failed.status == 412


async def test_downloads_hold_no_descriptor_once_answered(client, one_histogram_file):
    """Each download opens its file; whole, partial, cached, HEAD or client gone, the
    descriptor is closed once answered."""
    body = await upload(client, one_histogram_file)
    url = f"/rest/api/files/{body['filename']}"
    etag = (await client.get(url, headers=AUTH)).headers["ETag"]

    def open_on_the_file() -> int:
        count = 0
        for descriptor in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone
                count += os.readlink(f"/proc/self/fd/{descriptor}").endswith(body["filename"])
        return count

    for _ in range(10):
        for headers in ({}, {"Range": "bytes=10-20"}, {"If-None-Match": etag}):
            response = await client.get(url, headers={**AUTH, **headers})
            assert response.status in (200, 206, 304)
            await response.read()
        assert (await client.head(url, headers=AUTH)).status == 200
        unread = await client.get(url, headers=AUTH)
        unread.close()  # the client goes away without reading
    for _ in range(100):  # aiohttp closes its own file in a thread, unawaited
        if not open_on_the_file():
            break
        await asyncio.sleep(0.01)
    assert open_on_the_file() == 0


async def test_a_file_quarantined_while_its_download_starts_is_a_json_404(client, tmp_path):
    """The check may move a file to quarantine between a download's catalog lookup and its
    open: the answer is the API's JSON 404, not an empty one."""
    body = await upload(client, write_dqm_file(tmp_path / "dqm.root").read_bytes())
    for _ in range(500):  # the analysis looks the file up too: let it be done first
        info = await (await client.get(f"/rest/api/files/{body['filename']}/info",
                                       headers=AUTH)).json()
        if info["analysis"] != "pending":
            break
        await asyncio.sleep(0.02)
    storage = client.server.app[STORAGE]
    looked_up = storage.path_of

    def quarantined_meanwhile(name, location):
        path = looked_up(name, location)
        path.rename(storage.quarantine_dir / name)
        return path

    storage.path_of = quarantined_meanwhile
    response = await client.get(f"/rest/api/files/{body['filename']}", headers=AUTH)
    assert response.status == 404
    assert (await response.json())["message"] == f"No such file: {body['filename']}"


@pytest.mark.parametrize("requested", ["bytes=999999-", "bytes=5-2", "bytes=abc"])
async def test_a_range_the_file_cannot_satisfy_is_a_json_416(client, one_histogram_file,
                                                            requested):
    """A Range past the end, reversed or malformed: 416 with the file's size, in JSON."""
    body = await upload(client, one_histogram_file)
    response = await client.get(f"/rest/api/files/{body['filename']}",
                                headers={**AUTH, "Range": requested})
    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{len(one_histogram_file)}"
    assert "does not fit a file of" in (await response.json())["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/rest/api/files/..%2Fcatalog.sqlite3",
        "/rest/api/files/%2e%2e%2fcatalog.sqlite3",
        "/rest/api/files/..%252Fcatalog.sqlite3",
        "/rest/api/files/%2Fetc%2Fpasswd",
        "/rest/api/files/catalog.sqlite3",
        "/rest/api/files/.incoming",
        "/rest/api/files/unknownhistos_1_DQM_1970_01_01_01_00_00.root",
    ],
)
async def test_download_outside_or_unknown_is_404(client, one_histogram_file, data_dir, path):
    """No name, encoded or not, reaches a byte outside the stored DQM files."""
    await upload(client, one_histogram_file)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\ntoken: {TOKEN}\r\nConnection: close\r\n\r\n"
                 .encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 404"), answer[:100]
    assert b'"message"' in answer
    assert b"SQLite" not in answer and b"root:" not in answer


async def test_dot_dot_path_is_404(client, one_histogram_file):
    """A literal ../ in the path never escapes either."""
    await upload(client, one_histogram_file)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(f"GET /rest/api/files/../../etc/passwd HTTP/1.1\r\nHost: x\r\ntoken: {TOKEN}\r\n"
                 "Connection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.split(b" ")[1] in (b"404", b"400")
    assert b"root:" not in answer


async def test_restart_adopts_files_and_removes_temporaries(aiohttp_client, tmp_path, data_dir):
    """Files dropped into the data directory are adopted at start-up; temporaries are removed."""
    data_dir.mkdir(parents=True)
    (data_dir / ".incoming").mkdir()
    leftover = data_dir / ".incoming" / "dead-upload.part"
    leftover.write_bytes(b"half an upload")
    adopted = write_one_histogram_file(data_dir / "TPChistos_42_DQM_2024_05_01_10_00_00.root")
    not_root = data_dir / "TPChistos_43_DQM_2024_05_01_10_00_00.root"
    not_root.write_text("garbage")
    client = await aiohttp_client(create_app(make_settings(data_dir)))
    catalog = client.server.app[CATALOG]
    for _ in range(500):
        records = [await catalog.get(name) for name in (adopted.name, not_root.name)]
        if all(record and record.state != "pending" for record in records):
            break
        await asyncio.sleep(0.01)
    assert not leftover.exists()
    assert await list_names(client) == [adopted.name]
    record = await catalog.get(adopted.name)
    assert (record.agent, record.run, record.uploader) == ("TPC", 42, "adopted")
    assert record.received == {"test": "Obj name: test, Obj IsA() Name: TH1F"}
    assert (data_dir / "quarantine" / not_root.name).exists()
    assert (await catalog.get(not_root.name)).state == "invalid"


async def test_an_unreadable_file_does_not_stop_adoption(aiohttp_client, data_dir):
    """A file in the data directory whose read fails (here with EIO, as a bad disk block would)
    is left alone at start-up: the daemon starts and the files after it are adopted."""
    data_dir.mkdir(parents=True)
    unreadable = data_dir / "AAAhistos_41_DQM_2024_05_01_10_00_00.root"  # sorted first
    unreadable.symlink_to("/proc/self/mem")  # a regular file whose read at 0 fails
    with pytest.raises(OSError):
        unreadable.read_bytes()
    adopted = write_one_histogram_file(data_dir / "TPChistos_42_DQM_2024_05_01_10_00_00.root")
    client = await aiohttp_client(create_app(make_settings(data_dir)))
    catalog = client.server.app[CATALOG]
    for _ in range(500):  # adoption goes on in the background
        if await catalog.get(adopted.name):
            break
        await asyncio.sleep(0.01)
    assert (await catalog.get(adopted.name)).uploader == "adopted"
    assert await catalog.get(unreadable.name) is None
    assert (await client.get("/healthz")).status == 200


async def test_a_retry_of_a_file_adopted_after_a_crash_takes_its_headers(aiohttp_client,
                                                                         data_dir, tmp_path):
    """A crash between placing an upload and cataloging it leaves the file to adoption (with
    the headers its name tells, dataStatus 0). The agent's retry is recognised, and the row
    takes what the retry says: its uploader and its end of data, so the run shows as ended
    rather than the agent as silent."""
    content = write_one_histogram_file(tmp_path / "upload.root").read_bytes()
    data_dir.mkdir(parents=True)
    name = "EMChistos_123456_DQM_1970_01_02_16_07_24.root"  # dqm_headers()' name
    (data_dir / name).write_bytes(content)
    client = await aiohttp_client(create_app(make_settings(data_dir)))
    catalog = client.server.app[CATALOG]
    for _ in range(500):  # adoption goes on in the background
        if await catalog.get(name):
            break
        await asyncio.sleep(0.01)
    assert (await catalog.get(name)).uploader == "adopted"
    first = await upload(client, content, dataStatus="2")  # the retry of an end of data
    second = await upload(client, content, dataStatus="2")  # and once more: counted once
    assert first["filename"] == second["filename"] == name
    assert await list_names(client) == [name]
    record = await catalog.get(name)
    assert (record.uploader, record.data_status) == (UPLOADER_NAME, 2)
    run = await (await client.get("/runs/123456.json")).json()
    (agent,) = run["agents"]
    assert (agent["agent"], agent["files"]) == ("EMC", 1)
    assert agent["ended_at"] is not None


async def test_symlinks_and_unsafe_names_in_the_data_directory_are_not_adopted(
        aiohttp_client, data_dir, tmp_path):
    """A symlink in the data directory would serve a file from elsewhere, and a name with a
    quote or a line break cannot go into a download's header: neither is adopted. A cataloged
    file replaced by a symlink afterwards is not served through it either."""
    outside = write_one_histogram_file(tmp_path / "outside.root")
    data_dir.mkdir(parents=True)
    linked = data_dir / "SYMhistos_1_DQM_2023_01_01_00_00_00.root"
    linked.symlink_to(outside)
    quoted = data_dir / 'Q"; x="histos_3_DQM_2023_01_01_00_00_00.root'
    quoted.write_bytes(outside.read_bytes())
    adopted = write_one_histogram_file(data_dir / "TPChistos_42_DQM_2024_05_01_10_00_00.root")
    client = await aiohttp_client(create_app(make_settings(data_dir)))
    catalog = client.server.app[CATALOG]
    for _ in range(500):  # adoption goes on in the background
        if (record := await catalog.get(adopted.name)) and record.state != "pending":
            break
        await asyncio.sleep(0.01)
    assert await catalog.all_names() == {adopted.name}
    assert await list_names(client) == [adopted.name]
    assert linked.is_symlink() and quoted.exists()  # left alone
    adopted.unlink()
    adopted.symlink_to(outside)
    response = await client.get(f"/rest/api/files/{adopted.name}", headers=AUTH)
    assert response.status == 404
    assert (await response.json())["message"] == f"No such file: {adopted.name}"
    adopted.unlink()
    os.mkfifo(adopted)  # opening it to read would wait for a writer, holding a thread
    for _ in range(8):  # more than the default thread pool has threads
        response = await asyncio.wait_for(
            client.get(f"/rest/api/files/{adopted.name}", headers=AUTH), 5)
        assert response.status == 404
    assert (await asyncio.wait_for(client.get("/healthz"), 5)).status == 200
