"""The inspection pipeline through the API: results kept and served, findings, budgets, and
children that crash, hang or run out of memory while the daemon keeps answering."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import uproot

from dqm_daemon.app import create_app
from dqm_daemon.appkeys import INSPECTION_QUEUE, INSPECTORS
from dqm_daemon.health_checks import STUCK_MARGIN_SECONDS

from .conftest import TOKEN, dqm_headers, make_settings, multipart_file
from .rootfiles import histogram, th1f, write_dqm_file, write_one_histogram_file

AUTH = {"token": TOKEN}
FAULTY_CHILD = (sys.executable, str(Path(__file__).with_name("faulty_child.py")))


async def upload(client, content: bytes, **header_values):
    response = await client.post("/rest/api/files", data=multipart_file(content),
                                 headers=dqm_headers(**header_values))
    return response, await response.json()


async def info(client, name: str) -> dict:
    response = await client.get(f"/rest/api/files/{name}/info", headers=AUTH)
    assert response.status == 200
    return await response.json()


async def analysed(client, name: str, timeout: float = 60.0) -> dict:
    """The file's info once its analysis (which follows the check) has finished."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (details := await info(client, name))["analysis"] == "pending":
        assert asyncio.get_running_loop().time() < deadline, details
        await asyncio.sleep(0.05)
    return details


@pytest.fixture
async def faulty_client(aiohttp_client, data_dir):
    settings = make_settings(data_dir, inspection_workers=1, inspection_time_limit_seconds=1.5,
                             inspection_budget_seconds=10)
    return await aiohttp_client(create_app(settings, inspection_command=FAULTY_CHILD))


async def test_info_of_a_sound_file(client, tmp_path):
    """The info resource holds the catalog row and every object the check listed; the
    analysis then adds each object's figures."""
    content = write_dqm_file(tmp_path / "dqm.root").read_bytes()
    _, body = await upload(client, content, dataStatus="1")
    details = await analysed(client, body["filename"])
    assert (details["state"], details["analysis"], details["analysis_reason"]) == (
        "ok", "done", None)
    assert details["analysed_at"] and details["analysis_ms"] > 0
    first = details["objects"][0]
    assert (first["path"], first["class"], first["interpreted"]) == ("hist0", "TH1F", True)
    assert first["entries"] > 0 and first["dimensions"] == 1 and first["empty"] is False
    assert (details["agent"], details["run"], details["data_status"]) == ("EMC", 123456, 1)
    assert details["uploader"] == "emc-agent"
    assert details["sha256"] == body["sha256"] and details["size"] == len(content)
    assert {entry["path"] for entry in details["objects"]} == {
        "hist0", "hist1", "hist2", "detector", "detector/occupancy", "events"}
    assert details["object_count"] == 6
    assert details["findings"] == []
    assert details["inspected_at"] and details["inspection_ms"] > 0
    assert "token" not in str(details).lower()


async def test_info_of_a_quarantined_file(client):
    """A quarantined file's info says invalid, why, and where it is kept."""
    _, body = await upload(client, b"root but not really a ROOT file" * 10)
    details = await info(client, body["filename"])
    assert (details["state"], details["location"]) == ("invalid", "quarantine")
    assert details["reason"]
    assert details["objects"] is None
    assert details["analysis"] is None  # nothing to analyse in a file that failed its check


async def test_info_unknown_is_404(client):
    """Info on an unknown name is a JSON 404."""
    response = await client.get("/rest/api/files/nothing.root/info", headers=AUTH)
    assert response.status == 404
    assert "No such file" in (await response.json())["message"]


async def test_listing_with_details(client, tmp_path):
    """details=1 lists the catalog rows, without the (large) object lists."""
    content = write_dqm_file(tmp_path / "dqm.root").read_bytes()
    _, body = await upload(client, content)
    response = await client.get("/rest/api/files", headers=AUTH, params={"details": "1"})
    (row,) = (await response.json())["files"]
    assert row["name"] == body["filename"]
    assert (row["state"], row["object_count"], row["size"]) == ("ok", 6, len(content))
    assert "objects" not in row


async def test_findings_against_previous_file_of_agent_and_run(client, tmp_path):
    """A file that lost objects, emptied a histogram or went back in entries says so."""
    first = tmp_path / "first.root"
    with uproot.recreate(first) as root_file:
        root_file["rate"] = th1f("rate", "rate", [5, 5, 5])
        root_file["occupancy"] = th1f("occupancy", "occupancy", [1, 2])
        root_file["clusters"] = th1f("clusters", "clusters", [3])
    second = tmp_path / "second.root"
    with uproot.recreate(second) as root_file:
        root_file["rate"] = th1f("rate", "rate", [1, 1, 1])
        root_file["occupancy"] = histogram("occupancy", "occupancy", [np.array([])])
        root_file["tracks"] = th1f("tracks", "tracks", [4])
    _, first_body = await upload(client, first.read_bytes(), timestamp=1000)
    # Another agent's and another run's files are not compared with.
    await upload(client, write_one_histogram_file(tmp_path / "o.root").read_bytes(),
                 timestamp=1100, agent="TPC")
    _, second_body = await upload(client, second.read_bytes(), timestamp=1200)
    findings = {finding["kind"]: finding
                for finding in (await analysed(client, second_body["filename"]))["findings"]}
    assert findings["objects_disappeared"]["objects"] == ["clusters"]
    assert findings["objects_appeared"]["objects"] == ["tracks"]
    assert findings["histograms_became_empty"]["objects"] == ["occupancy"]
    assert findings["entries_went_backwards"]["entries"]["rate"] == [15, 3]
    assert findings["objects_disappeared"]["previous_file"] == first_body["filename"]
    # Lists of files (a run's, the latest) carry the findings' count and kinds; the findings
    # themselves, with their lists of objects, are the file's own page's.
    run = (await info(client, second_body["filename"]))["run"]
    run_files = {row["name"]: row
                 for row in (await (await client.get(f"/runs/{run}.json")).json())["files"]}
    listed = run_files[second_body["filename"]]
    assert listed["findings_count"] == len(findings) and "findings" not in listed
    assert sorted(listed["finding_kinds"]) == sorted(findings)


async def test_a_file_analysed_late_becomes_its_successors_previous_file(client, tmp_path):
    """Files analysed out of their agent's order (one arrived late): once the late one is
    analysed, the file after it is compared with it, not with the one before both."""
    paths = {}
    for label, names in (("P", ["a"]), ("A", ["a", "b", "pad"]), ("B", ["a", "b"])):
        paths[label] = tmp_path / f"{label}.root"
        with uproot.recreate(paths[label]) as root_file:
            for name in names:
                root_file[name] = th1f(name, name, [1, 2])
    filenames = {}
    for label, timestamp in (("P", 5000), ("B", 5200), ("A", 5100)):  # A arrives last
        _, body = await upload(client, paths[label].read_bytes(), timestamp=timestamp, run=7)
        filenames[label] = body["filename"]
        await analysed(client, body["filename"])
    findings = {finding["kind"]: finding
                for finding in (await info(client, filenames["B"]))["findings"]}
    assert findings["objects_disappeared"]["objects"] == ["pad"]
    assert findings["objects_disappeared"]["previous_file"] == filenames["A"]
    assert "objects_appeared" not in findings
    late = {finding["kind"]: finding
            for finding in (await info(client, filenames["A"]))["findings"]}
    assert late["objects_appeared"]["objects"] == ["b", "pad"]
    assert late["objects_appeared"]["previous_file"] == filenames["P"]


async def test_crashing_child_marks_file_invalid_and_is_replaced(faulty_client, one_histogram_file):
    """A child that dies on a file makes that file invalid; the next file is inspected fine."""
    response, body = await upload(faulty_client, one_histogram_file, agent="CRASH")
    assert response.status == 400
    assert body["reason"] == "inspection crashed (killed by SIGSEGV)"
    first_pid = faulty_client.server.app[INSPECTORS][0].pid
    response, body = await upload(faulty_client, one_histogram_file, agent="EMC")
    assert response.status == 200, body
    assert body["received"] == {"test": "Obj name: test, Obj IsA() Name: TH1F"}
    assert faulty_client.server.app[INSPECTORS][0].pid != first_pid


@pytest.mark.parametrize("agent", ["HALF", "CUT"])
async def test_a_child_gone_between_result_and_listing_is_a_crash(faulty_client,
                                                                  one_histogram_file, agent):
    """A sound file's listing follows its result on a line of its own: a child that exits in
    between, or half-way through the listing's line (that half was stored as the listing, and
    the file's page failed on it), has crashed on that file; the next file gets a new child."""
    response, body = await upload(faulty_client, one_histogram_file, agent=agent)
    assert response.status == 400
    assert body["reason"] == "inspection crashed (exit status 3)"
    info = await faulty_client.get(f"/rest/api/files/{body['filename']}/info",
                                   headers=AUTH)
    assert info.status == 200 and (await info.json())["state"] == "invalid"
    response, body = await upload(faulty_client, one_histogram_file, agent="EMC")
    assert response.status == 200, body
    assert body["received"] == {"test": "Obj name: test, Obj IsA() Name: TH1F"}


async def test_hanging_child_times_out_while_daemon_answers(faulty_client, one_histogram_file):
    """A file whose inspection overruns the limit ends invalid; meanwhile the daemon answers."""
    hanging = asyncio.create_task(upload(faulty_client, one_histogram_file, agent="HANG"))
    await asyncio.sleep(0.5)
    health = await faulty_client.get("/healthz")
    assert health.status == 200
    assert not hanging.done()
    response, body = await hanging
    assert response.status == 400
    assert body["reason"] == "inspection took longer than the limit of 1.5 s"
    response, body = await upload(faulty_client, one_histogram_file, agent="EMC")
    assert response.status == 200, body


async def test_a_stalled_inspection_queue_is_reported_until_it_moves(aiohttp_client, data_dir,
                                                                     one_histogram_file):
    """Files waiting while no inspection has started or finished for longer than the time
    limit and its margin: /healthz answers 503 naming the stuck queue and the status banner
    says ERROR; once inspections move again both clear."""
    settings = make_settings(data_dir, inspection_workers=1, inspection_time_limit_seconds=3,
                             inspection_budget_seconds=0.2)
    client = await aiohttp_client(create_app(settings, inspection_command=FAULTY_CHILD))
    response, _ = await upload(client, one_histogram_file, agent="HANG")  # holds the only worker
    assert response.status == 202
    response, waiting = await upload(client, one_histogram_file, agent="EMC")
    assert response.status == 202
    queue = client.server.app[INSPECTION_QUEUE]
    assert queue.depth == 1
    assert (await client.get("/healthz")).status == 200  # a hang is not yet a stuck queue
    # As if the worker had made no progress for the limit and the margin, and a second more.
    queue.last_progress_monotonic -= (settings.inspection_time_limit_seconds
                                      + STUCK_MARGIN_SECONDS + 1)
    health = await client.get("/healthz")
    problems = (await health.json())["problems"]
    assert health.status == 503
    assert any(problem.startswith("inspection queue stuck: 1 file waiting, no progress for ")
               for problem in problems), problems
    status = await (await client.get("/status.json")).json()
    assert status["level"] == "ERROR" and any("inspection queue stuck" in reason
                                              for reason in status["reasons"])
    # The hang is killed at the time limit; the waiting file is inspected and all is well.
    for _ in range(200):
        if (await info(client, waiting["filename"]))["state"] != "pending":
            break
        await asyncio.sleep(0.05)
    assert (await info(client, waiting["filename"]))["state"] == "ok"
    assert (await client.get("/healthz")).status == 200


async def test_budget_exceeded_answers_202_then_result(aiohttp_client, data_dir,
                                                      one_histogram_file):
    """When inspection outlasts the POST's budget the answer is 202 with where to look."""
    settings = make_settings(data_dir, inspection_workers=1, inspection_budget_seconds=0.2)
    client = await aiohttp_client(create_app(settings, inspection_command=FAULTY_CHILD))
    response, body = await upload(client, one_histogram_file, agent="SLOW")
    assert response.status == 202
    assert body["state"] == "pending"
    location = response.headers["Location"]
    assert location == f"/rest/api/files/{body['filename']}/info"
    for _ in range(100):
        details = await (await client.get(location, headers=AUTH)).json()
        if details["state"] != "pending":
            break
        await asyncio.sleep(0.1)
    assert details["state"] == "ok"
    # The agent's retry of the same file now gets the final answer.
    response, body = await upload(client, one_histogram_file, agent="SLOW")
    assert response.status == 200
    assert body["received"] == {"test": "Obj name: test, Obj IsA() Name: TH1F"}


@pytest.mark.slow
async def test_memory_cap_stops_a_decompression_bomb(aiohttp_client, data_dir, tmp_path):
    """A small file that expands to hundreds of MiB is a sound ROOT file: it passes its check
    (which decompresses block by block), and its analysis is stopped by the child's memory cap
    while the daemon goes on."""
    bomb = tmp_path / "bomb.root"
    bins = 40_000_000  # 320 MB of zeros, a few hundred KiB compressed
    with uproot.recreate(bomb) as root_file:
        root_file["huge"] = uproot.writing.identify.to_TH1x(
            "huge", "huge", np.zeros(bins + 2), 0.0, 0.0, 0.0, 0.0, 0.0, np.zeros(0),
            uproot.writing.identify.to_TAxis("x", "x", bins, 0.0, 1.0))
    assert bomb.stat().st_size < 8 * 1024 * 1024
    settings = make_settings(data_dir, inspection_workers=1,
                             inspection_memory_cap_bytes=384 * 1024 * 1024)
    client = await aiohttp_client(create_app(settings))
    response, body = await upload(client, bomb.read_bytes())
    assert response.status == 200, body
    details = await analysed(client, body["filename"])
    assert (details["state"], details["analysis"]) == ("ok", "failed")
    reason = details["analysis_reason"]
    assert "memory" in reason.lower() or "crashed" in reason, reason
    health = await client.get("/healthz")
    assert health.status == 200


async def test_infinite_bin_contents_do_not_break_inspection(client, tmp_path):
    """A histogram holding inf or NaN is still a sound file (JSON shows null there)."""
    path = tmp_path / "inf.root"
    with uproot.recreate(path) as root_file:
        root_file["h"] = th1f("h", "h", [1.0, float("inf"), float("nan")])
    response, body = await upload(client, path.read_bytes())
    assert response.status == 200, body
    (entry,) = (await analysed(client, body["filename"]))["objects"]
    assert entry["integral"] is None


async def test_full_queue_answers_202_and_the_sweeper_catches_up(aiohttp_client, data_dir,
                                                                one_histogram_file):
    """With the inspection queue full an upload is still acknowledged (202), never stuck, and
    inspected later."""
    settings = make_settings(data_dir, inspection_workers=1, inspection_queue_length=1,
                             inspection_budget_seconds=0.3, inspection_sweep_seconds=0.5)
    client = await aiohttp_client(create_app(settings, inspection_command=FAULTY_CHILD))
    answers = [await upload(client, one_histogram_file, agent="SLOW", run=run)
               for run in range(4)]
    assert all(response.status == 202 for response, _ in answers)
    for _, body in answers:
        for _ in range(300):
            details = await info(client, body["filename"])
            if details["state"] != "pending":
                break
            await asyncio.sleep(0.1)
        assert details["state"] == "ok", details


async def test_child_never_sees_the_token(aiohttp_client, data_dir, one_histogram_file,
                                          monkeypatch):
    """The inspection child, which parses untrusted files, is started without the token."""
    monkeypatch.setenv("DQM_DAEMON_TOKEN", "secret-from-environment")
    client = await aiohttp_client(create_app(make_settings(data_dir),
                                             inspection_command=FAULTY_CHILD))
    _, body = await upload(client, one_histogram_file, agent="ENVCHECK")
    assert body["reason"] == "token in environment: False"


async def test_restart_after_quarantine_move_keeps_the_real_reason(aiohttp_client, data_dir):
    """A crash between moving a file to quarantine and recording it: the restart finds the
    file in quarantine and records why it is invalid."""
    client = await aiohttp_client(create_app(make_settings(data_dir)))
    _, body = await upload(client, b"this is not ROOT at all" * 10)
    name = body["filename"]
    await client.close()
    with sqlite3.connect(data_dir / "catalog.sqlite3") as catalog:
        catalog.execute("UPDATE files SET state = 'pending', location = 'data', reason = NULL "
                        "WHERE name = ?", (name,))
    client = await aiohttp_client(create_app(make_settings(data_dir)))
    for _ in range(200):
        details = await info(client, name)
        if details["state"] != "pending":
            break
        await asyncio.sleep(0.05)
    assert (details["state"], details["location"]) == ("invalid", "quarantine")
    assert details["reason"] == "not a ROOT file: it does not start with 'root'"


async def test_group_signals_do_not_fail_an_inspection(aiohttp_client, data_dir,
                                                      one_histogram_file):
    """SIGINT/SIGTERM meant for the daemon's group (Ctrl-C, systemd stop) do not kill an
    inspection in progress: the file is not mistaken for one that crashes its inspector."""
    settings = make_settings(data_dir, inspection_workers=1, inspection_budget_seconds=10)
    client = await aiohttp_client(create_app(settings, inspection_command=FAULTY_CHILD))
    uploading = asyncio.create_task(upload(client, one_histogram_file, agent="SLOW"))
    queue = client.server.app[INSPECTION_QUEUE]
    for _ in range(500):
        if queue.busy_workers:
            break
        await asyncio.sleep(0.01)
    inspector = client.server.app[INSPECTORS][0]
    for _ in range(500):
        if inspector.pid is not None and inspector.alive:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.0)  # started, and inside its two-second inspection
    os.kill(inspector.pid, signal.SIGINT)
    os.kill(inspector.pid, signal.SIGTERM)
    response, body = await uploading
    assert response.status == 200, body
    assert body["received"] == {"test": "Obj name: test, Obj IsA() Name: TH1F"}


async def test_a_catalog_of_an_earlier_version_is_upgraded(tmp_path):
    """A catalog written before the analysis existed gains its columns; its sound files, which
    were summarised when inspected then, count as analysed (findings compare with them)."""
    from dqm_daemon.catalog import Catalog

    path = tmp_path / "catalog.sqlite3"
    with sqlite3.connect(path) as old:
        old.executescript(
            "CREATE TABLE files (name TEXT PRIMARY KEY, location TEXT NOT NULL, size INTEGER"
            " NOT NULL, sha256 TEXT NOT NULL, agent TEXT NOT NULL, run INTEGER NOT NULL,"
            " timestamp INTEGER NOT NULL, data_status INTEGER NOT NULL, received_at TEXT NOT"
            " NULL, uploader TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, received_json"
            " TEXT, objects_json TEXT, object_count INTEGER, findings_json TEXT, inspected_at"
            " TEXT, inspection_ms REAL);"
            "INSERT INTO files VALUES ('a.root', 'data', 1, 'x', 'EMC', 1, 1, 0, 't', 'u', 'ok',"
            " NULL, NULL, '[]', 0, NULL, NULL, NULL);"
            "INSERT INTO files VALUES ('b.root', 'quarantine', 1, 'y', 'EMC', 1, 2, 0, 't', 'u',"
            " 'invalid', 'bad', NULL, NULL, NULL, NULL, NULL, NULL);")
    old.close()
    # An upgrade that fails half-way (here a trigger refuses its UPDATE; a crash would do the
    # same) leaves the catalog as it was, so the next start upgrades it whole.
    with sqlite3.connect(path) as old:
        old.execute("CREATE TRIGGER refuse BEFORE UPDATE ON files BEGIN"
                    " SELECT RAISE(ABORT, 'refused'); END")
    old.close()
    with pytest.raises(sqlite3.IntegrityError):
        await Catalog(path).open()
    with sqlite3.connect(path) as old:
        assert "analysis" not in {row[1] for row in old.execute("PRAGMA table_info(files)")}
        old.execute("DROP TRIGGER refuse")
    old.close()
    catalog = Catalog(path)
    await catalog.open()
    try:
        assert (await catalog.get("a.root")).analysis == "done"
        assert (await catalog.get("b.root")).analysis is None
        assert await catalog.awaiting_analysis(10) == []
    finally:
        await catalog.close()


async def test_writes_sharing_a_commit_fail_alone(tmp_path):
    """Writes queued together share one commit; one that fails (a name taken twice) is rolled
    back alone, with its own error, and the others are durable: a second connection sees
    them."""
    from dqm_daemon.catalog import Catalog
    from dqm_daemon.ingest import new_record
    from dqm_daemon.naming import DQMHeaders

    path = tmp_path / "catalog.sqlite3"
    catalog = Catalog(path)
    await catalog.open()
    try:
        records = [new_record(f"f{number}.root", 1, "x", DQMHeaders(number, 1, "EMC", 0), "u")
                   for number in range(20)]
        outcomes = await asyncio.gather(
            *(catalog.add(record) for record in records), catalog.add(records[3]),
            return_exceptions=True)
        assert outcomes[:20] == [None] * 20
        assert isinstance(outcomes[20], sqlite3.IntegrityError)
    finally:
        await catalog.close()
    with sqlite3.connect(path) as other:
        assert other.execute("SELECT count(*) FROM files").fetchone()[0] == 20
        assert other.execute("SELECT count(*) FROM agent_runs").fetchone()[0] == 20
    other.close()


async def test_the_catalog_still_reads_after_its_directory_vanished(tmp_path):
    """The data directory removed under an open catalog (an unmounted disk) before anything
    was read: reads still answer from the open files, and writes too (SQLite keeps them)."""
    from dqm_daemon.catalog import Catalog
    from dqm_daemon.ingest import new_record
    from dqm_daemon.naming import DQMHeaders

    directory = tmp_path / "data"
    directory.mkdir()
    catalog = Catalog(directory / "catalog.sqlite3")
    await catalog.open()
    try:
        await catalog.add(new_record("a.root", 1, "x", DQMHeaders(1, 1, "EMC", 0), "u"))
        shutil.rmtree(directory)
        await catalog.add(new_record("b.root", 1, "y", DQMHeaders(2, 1, "EMC", 0), "u"))
        assert (await catalog.get("a.root")).run == 1
        assert (await catalog.get("b.root")).run == 2
    finally:
        await catalog.close()


async def test_shutdown_answers_an_upload_waiting_for_room_in_the_queue(tmp_path):
    """An upload waiting for room in a full inspection queue when the daemon stops waiting for
    verdicts is answered at once (pending), and is not queued: the sweeper queues it later."""
    from dqm_daemon.catalog import Catalog
    from dqm_daemon.ingest import new_record
    from dqm_daemon.inspection_queue import InspectionQueue
    from dqm_daemon.metrics import Metrics
    from dqm_daemon.naming import DQMHeaders
    from dqm_daemon.storage import Storage

    settings = make_settings(tmp_path / "data")
    storage = Storage(settings)
    storage.prepare()
    catalog = Catalog(settings.catalog_path)
    await catalog.open()
    try:
        queue = InspectionQueue(catalog, storage, Metrics(), max_jobs=1)  # and no worker
        first, second = (new_record(f"f{run}.root", 1, "x", DQMHeaders(run, 1, "EMC", 0), "u")
                         for run in (1, 2))
        await queue.put(first)
        waiting = asyncio.create_task(queue.queue_and_wait(second, timeout=60))
        await asyncio.sleep(0.05)  # it waits for room
        assert not await queue.wait_verdicts_delivered(0.2)
        assert not waiting.done()
        queue.stop_waiting()
        assert await asyncio.wait_for(waiting, 2) is None
        assert queue.depth == 1  # the first file only: the second stays pending
    finally:
        await catalog.close()



async def test_a_child_killed_while_idle_does_not_fail_the_next_file(tmp_path):
    """A child killed between jobs (the OOM killer, an operator) before the daemon noticed:
    the next file, sound, is checked in a fresh child rather than blamed for the crash."""
    from dqm_daemon.inspection_pool import InspectorProcess

    path = write_one_histogram_file(tmp_path / "sound.root")
    inspector = InspectorProcess(2 << 30, 60.0)
    try:
        for _ in range(3):
            await inspector.warm_up()
            os.kill(inspector.pid, signal.SIGKILL)  # and at once the next job
            result = await inspector.inspect(path)
            assert result["state"] == "ok", result
    finally:
        await inspector.close()
