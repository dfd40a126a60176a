"""Committing an upload under its DQM name: what a crash or a shutdown half-way must not leave."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from datetime import UTC, datetime

import pytest

from dqm_daemon.appkeys import INSPECTION_QUEUE
from dqm_daemon.catalog import Catalog
from dqm_daemon.ingest import Ingest
from dqm_daemon.naming import DQMHeaders, dqm_filename
from dqm_daemon.storage import Storage

from .conftest import dqm_headers, make_settings, multipart_file
from .rootfiles import write_dqm_file, write_one_histogram_file


@pytest.fixture
async def committing(tmp_path):
    """The real storage, catalog and commit of a data directory, without the HTTP around."""
    settings = make_settings(tmp_path / "data")
    storage = Storage(settings)
    storage.prepare()
    catalog = Catalog(settings.catalog_path)
    await catalog.open()
    yield storage, catalog, Ingest(catalog, storage)
    await catalog.close()


async def _incoming(storage: Storage, content: bytes):
    incoming = storage.incoming_file()
    await asyncio.to_thread(lambda: (incoming.write_now(content), incoming.finish_now()))
    return incoming


async def test_a_commit_cancelled_at_any_point_leaves_file_and_row_together(tmp_path,
                                                                            committing):
    """A shutdown may cancel an upload inside its commit, at any await: afterwards the file is
    either in the data directory and cataloged, or neither (never a row without its file, which
    would make every retry a 'duplicate' of a missing file)."""
    storage, catalog, ingest = committing
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    committed = 0
    for turn in range(40):
        incoming = await _incoming(storage, content)
        dqm = DQMHeaders(run_number=turn, timestamp=1_700_000_000, agent="CUT", data_status=0)
        commit = asyncio.create_task(ingest.commit(incoming, dqm, "test"))
        for _ in range(turn):  # cancelled after a different number of loop turns each time
            await asyncio.sleep(0)
        commit.cancel()
        await asyncio.gather(commit, return_exceptions=True)
        await incoming.discard()  # as the cancelled upload's handler does
        await asyncio.sleep(0.05)  # anything still running in a thread is done by now
        on_disk = (storage.data_dir / dqm.filename).exists()
        assert on_disk == (await catalog.get(dqm.filename) is not None), turn
        committed += on_disk
    assert list(storage.incoming_dir.iterdir()) == []
    assert 0 < committed < 40  # cancelled before it began, and after


async def test_a_failed_catalog_write_removes_only_what_the_upload_placed(tmp_path,
                                                                          committing):
    """When cataloging fails the upload is not acknowledged: a file it placed is taken back out,
    but a file that was under the name before it (the same bytes, left by a crash or copied in
    by hand) stays for adoption or the next retry."""
    storage, _, ingest = committing
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    with sqlite3.connect(storage.data_dir / "catalog.sqlite3") as refusing:
        refusing.execute("CREATE TRIGGER refuse BEFORE INSERT ON files BEGIN"
                         " SELECT RAISE(ABORT, 'refused'); END")
    refusing.close()
    for run, there_before in ((1, True), (2, False)):
        dqm = DQMHeaders(run_number=run, timestamp=1_700_000_000, agent="FAIL", data_status=0)
        if there_before:
            (storage.data_dir / dqm.filename).write_bytes(content)
        incoming = await _incoming(storage, content)
        with pytest.raises(sqlite3.IntegrityError):
            await ingest.commit(incoming, dqm, "test")
        await incoming.discard()  # as the failed upload's handler does
        assert (storage.data_dir / dqm.filename).exists() == there_before
    assert list(storage.incoming_dir.iterdir()) == []


async def test_adoption_does_not_catalog_a_file_taken_back_while_it_hashed(tmp_path,
                                                                           committing):
    """Start-up adoption hashes a file without a row outside the naming lock; an upload that
    placed it may meanwhile fail to catalog it and take it back. Adoption then catalogs
    nothing: a row without its file would make the agent's retry a 'duplicate' of nothing."""
    storage, catalog, ingest = committing
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    kept, taken_back = (DQMHeaders(run_number=run, timestamp=1_700_000_000, agent="EMC",
                                   data_status=0) for run in (1, 2))
    for dqm in (kept, taken_back):
        (storage.data_dir / dqm.filename).write_bytes(content)
    async with ingest._naming_lock(taken_back.filename):  # its upload's commit holds it
        adopting = asyncio.create_task(ingest.adopt_unknown_files(1024 * 1024))
        for _ in range(500):  # until adoption, the file hashed, waits for the lock too
            if ingest._naming_lock_users[taken_back.filename] == 2:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("adoption never came to the lock")
        (storage.data_dir / taken_back.filename).unlink()  # the commit failed: taken back
    assert await adopting == 1
    assert (await catalog.get(kept.filename)).sha256 == hashlib.sha256(content).hexdigest()
    assert await catalog.get(taken_back.filename) is None


async def test_a_file_placed_but_not_cataloged_is_the_retried_uploads_own(client, data_dir,
                                                                          tmp_path):
    """A crash between placing a file and cataloging it leaves it uncataloged; the agent, never
    answered, retries: the same bytes are taken as that file (no second copy under a variant
    name), while other bytes under a taken name are never overwritten."""
    content = write_dqm_file(tmp_path / "a.root").read_bytes()
    other = write_one_histogram_file(tmp_path / "b.root").read_bytes()
    # Start-up adoption is over: what is placed from here on is left to the uploads.
    await asyncio.wait_for(client.server.app[INSPECTION_QUEUE].recovery_queued.wait(), 30)
    for run, placed in ((601, content), (602, other)):
        name = dqm_filename("EMC", run, 1_700_000_000)
        data_dir.joinpath(name).write_bytes(placed)  # what the interrupted commit left
        response = await client.post("/rest/api/files", data=multipart_file(content),
                                     headers=dqm_headers(run=run, timestamp=1_700_000_000))
        body = await response.json()
        assert response.status == 200, body
        if placed == content:
            assert body["filename"] == name  # cataloged as this upload, no variant
            assert sorted(path.name for path in data_dir.glob(f"EMChistos_{run}_*")) == [name]
        else:
            assert body["filename"] == name.replace(".root", ".v2.root")
            assert (data_dir / name).read_bytes() == other  # never overwritten
        assert (data_dir / body["filename"]).read_bytes() == content
        assert body["sha256"] == hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize("planted", ["symlink", "fifo", "directory"])
async def test_a_name_taken_by_something_not_a_file_is_skipped(client, data_dir, tmp_path,
                                                                planted):
    """A symlink (even to the very bytes), a FIFO or a directory under an upload's name is not
    a stored file: the upload goes to the next variant name, as a real file (a symlink's
    target could vanish; reading a FIFO would hang the name for good)."""
    import os

    content = write_dqm_file(tmp_path / "a.root").read_bytes()
    await asyncio.wait_for(client.server.app[INSPECTION_QUEUE].recovery_queued.wait(), 30)
    name = dqm_filename("EMC", 603, 1_700_000_000)
    target = tmp_path / "elsewhere.root"
    target.write_bytes(content)
    if planted == "symlink":
        (data_dir / name).symlink_to(target)
    elif planted == "fifo":
        os.mkfifo(data_dir / name)
    else:
        (data_dir / name).mkdir()
    response = await asyncio.wait_for(client.post(
        "/rest/api/files", data=multipart_file(content),
        headers=dqm_headers(run=603, timestamp=1_700_000_000)), 30)
    body = await response.json()
    assert response.status == 200, body
    assert body["filename"] == name.replace(".root", ".v2.root")
    stored = data_dir / body["filename"]
    assert stored.is_file() and not stored.is_symlink() and stored.read_bytes() == content


def test_receipt_times_sort_as_text_in_time_order():
    """The catalog orders files by `received_at` as text: every time has its microseconds, so a
    time on a whole second does not sort after the later times of that second."""
    from dqm_daemon.ingest import iso_utc, utc_now

    second = datetime(2026, 11, 29, 15, 0, 0, tzinfo=UTC)
    times = [iso_utc(second.replace(microsecond=micro)) for micro in (0, 1, 500_000, 999_999)]
    assert times[0] == "2026-11-29T15:00:00.000000Z"
    assert sorted(times) == times
    assert datetime.fromisoformat(utc_now()).tzinfo == UTC  # and each reads back as UTC


async def test_a_retry_is_recognised_past_a_gap_in_the_variants(tmp_path, committing):
    """A failed commit can leave the name itself free while `.v2` holds a file: a retry of
    that file is recognised there (by its headers and digest), not stored again under the
    free name."""
    from dqm_daemon.ingest import new_record
    from dqm_daemon.naming import variant_filename

    storage, catalog, ingest = committing
    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    dqm = DQMHeaders(run_number=5, timestamp=1_700_000_000, agent="GAP", data_status=0)
    held = variant_filename(dqm.filename, 2)
    (storage.data_dir / held).write_bytes(content)
    await catalog.add(new_record(held, len(content), hashlib.sha256(content).hexdigest(), dqm,
                                 "test"))
    commit = await ingest.commit(await _incoming(storage, content), dqm, "test")
    assert commit.duplicate and commit.record.name == held
    assert not (storage.data_dir / dqm.filename).exists()
    assert await catalog.get(dqm.filename) is None
