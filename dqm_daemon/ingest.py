"""Committing a finished upload under its DQM name, and recovering what a previous run left.

A commit never overwrites: the same name with the same SHA-256 is the same file (the agent
retried), and a different file with a taken name is kept under the next free variant name.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import itertools
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from .cancellation import run_to_the_end
from .catalog import IN_DATA_DIR, IN_QUARANTINE, Catalog, FileRecord, iso_utc
from .naming import DEFAULT_AGENT, DQMHeaders, headers_from_filename, variant_filename
from .storage import (
    HashingStopped,
    IncomingFile,
    Storage,
    fsync_file_and_directory,
    sha256_of_file,
    sha256_of_regular_file,
)

log = structlog.get_logger(__name__)

ADOPTED_UPLOADER = "adopted"
# Read at a time when hashing a file already on disk.
HASH_CHUNK_BYTES = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Commit:
    record: FileRecord
    duplicate: bool  # True: the same file was already stored; nothing new was kept


def utc_now() -> str:
    return iso_utc(datetime.datetime.now(datetime.UTC))


def new_record(name: str, size: int, sha256: str, dqm: DQMHeaders, uploader: str) -> FileRecord:
    """The catalog row of a file just placed in the data directory, pending inspection."""
    return FileRecord(
        name=name,
        location=IN_DATA_DIR,
        size=size,
        sha256=sha256,
        agent=dqm.agent,
        run=dqm.run_number,
        timestamp=dqm.timestamp,
        data_status=dqm.data_status,
        received_at=utc_now(),
        uploader=uploader,
    )


class Ingest:
    def __init__(self, catalog: Catalog, storage: Storage):
        self._catalog = catalog
        self._storage = storage
        # One lock per DQM name: two uploads of the same name never both think a variant is
        # free (or miss that the other is the same file); different names go on in parallel.
        self._naming_locks: dict[str, asyncio.Lock] = {}
        # Set at shutdown: hashing a file found on disk (adoption, a commit finding its name
        # taken by an uncataloged file) stops part way, rather than holding up the exit.
        self._stop_hashing = threading.Event()
        self._naming_lock_users: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def _naming_lock(self, name: str) -> AsyncIterator[None]:
        lock = self._naming_locks.setdefault(name, asyncio.Lock())
        self._naming_lock_users[name] += 1
        try:
            async with lock:
                yield
        finally:
            self._naming_lock_users[name] -= 1
            if not self._naming_lock_users[name]:
                del self._naming_lock_users[name], self._naming_locks[name]

    async def commit(self, incoming: IncomingFile, dqm: DQMHeaders, uploader: str) -> Commit:
        """Store a finished, fsynced upload under its DQM name and catalog it as pending. Once
        begun it runs to its end even if the upload is cancelled (a shutdown): a file placed but
        not cataloged, or a row whose file was taken back, is never left behind."""
        return await run_to_the_end(self._commit(incoming, dqm, uploader))

    async def _commit(self, incoming: IncomingFile, dqm: DQMHeaders, uploader: str) -> Commit:
        async with self._naming_lock(dqm.filename):
            # A retry is recognised whichever variant holds its bytes, before any name is
            # given away below: by its headers and digest (a failed commit may leave a gap in
            # the variants), and variant by variant (two times may give one name, in the hour
            # the clocks go back).
            holders = await self._catalog.name_holders(
                dqm.filename, dqm.agent, dqm.run_number, dqm.timestamp, incoming.sha256)
            if holders.copy is not None:
                return await self._duplicate(incoming, holders.copy, dqm, uploader)
            taken = holders.variants
            for existing in taken:
                if existing.sha256 == incoming.sha256:
                    return await self._duplicate(incoming, existing, dqm, uploader)
            # The first variant no row had: free in the catalog while the lock is held, unless
            # a quarantined file is set aside to it below.
            free_in_catalog: int | None = len(taken) + 1
            placed_here = False  # False: the same bytes were on disk under the name already
            for variant in itertools.count(1):
                name = variant_filename(dqm.filename, variant)
                if variant <= len(taken):
                    existing = taken[variant - 1]
                elif variant == free_in_catalog:
                    existing = None
                else:
                    existing = await self._catalog.get(name)
                if existing is not None and existing.sha256 == incoming.sha256:
                    # past a gap (a name on disk only, skipped)
                    return await self._duplicate(incoming, existing, dqm, uploader)
                # A name held by a quarantined (broken) file goes to this upload.
                if existing is not None and existing.location == IN_QUARANTINE:
                    free_in_catalog = None  # the set-aside file may take that variant
                    if not await self._set_aside(existing, dqm):
                        continue
                elif existing is not None:
                    continue
                if await self._storage.link_into_place(incoming, name):
                    placed_here = True
                    break
                # On disk but not cataloged: left by a crash between placing and cataloging
                # (the agent retries), or copied in by hand. The same bytes are this file,
                # cataloged now, as this upload; other bytes are never overwritten.
                try:
                    on_disk = await asyncio.to_thread(
                        sha256_of_regular_file, self._storage.path_of(name, IN_DATA_DIR),
                        HASH_CHUNK_BYTES, self._stop_hashing)
                    if on_disk == incoming.sha256:  # None (not a regular file): a name taken
                        # Made durable before its row: its placing may not have been (a
                        # crash before the directory's fsync), nor a copy by hand.
                        await asyncio.to_thread(fsync_file_and_directory,
                                                self._storage.path_of(name, IN_DATA_DIR))
                        break
                except FileNotFoundError:
                    continue  # removed meanwhile (by hand): on to the next name
            record = new_record(name, incoming.size, incoming.sha256, dqm, uploader)
            try:
                await self._catalog.add(record)
            except Exception:
                # Not cataloged means not acknowledged: take back out a file this upload
                # placed (one that was there before stays, for adoption or a retry).
                if placed_here:
                    await self._storage.remove_placed(name)
                raise
            if not placed_here:
                await incoming.discard()
        return Commit(record, duplicate=False)

    async def _duplicate(self, incoming: IncomingFile, stored: FileRecord, dqm: DQMHeaders,
                         uploader: str) -> Commit:
        """The upload's bytes are stored already: nothing new is kept. A copy adopted from
        disk (its first upload died before its row) takes this upload's headers. A copy whose
        file is gone from the data directory (deleted by hand, lost to a power cut) gets these
        bytes back under its name."""
        if (stored.location == IN_DATA_DIR
                and not await asyncio.to_thread(self._storage.taken, stored.name)
                and await self._storage.link_into_place(incoming, stored.name)):
            log.warning("file_restored", file=stored.name)
        await incoming.discard()
        if stored.uploader == ADOPTED_UPLOADER:
            upload = new_record(stored.name, stored.size, stored.sha256, dqm, uploader)
            if await self._catalog.claim_adopted(stored, upload):
                stored = dataclasses.replace(stored, uploader=uploader,
                                             data_status=dqm.data_status,
                                             received_at=upload.received_at)
        return Commit(stored, duplicate=True)

    async def _set_aside(self, quarantined: FileRecord, dqm: DQMHeaders) -> bool:
        """Move a quarantined file out of the way under the next free variant name, so its
        name goes to this upload (a sound file after a broken one keeps the agent's name).
        Under the name's naming lock. The row first: a crash before the file follows leaves
        the row pointing at a name without a file, never two rows on one name."""
        for variant in itertools.count(2):
            new_name = variant_filename(dqm.filename, variant)
            if await self._catalog.get(new_name) is None and not await asyncio.to_thread(
                    self._storage.taken, new_name):
                break
        if not await self._catalog.rename_quarantined(quarantined.name, new_name):
            return False
        await self._storage.rename_quarantined(quarantined.name, new_name)
        log.info("quarantined_file_set_aside", file=quarantined.name, now=new_name)
        return True

    async def remove_quarantined(self, name: str, arrived_before: str) -> bool:
        """Remove a quarantined file that arrived before `arrived_before` (ISO UTC), and its
        row: the file first (a crash between leaves a row without a file, removed next time).
        Under the naming lock of its DQM name, and only if it is still that old: an upload
        may meanwhile have set it aside and put a fresh broken file under the name."""
        dqm = headers_from_filename(name)
        async with self._naming_lock(dqm.filename if dqm else name):
            record = await self._catalog.get(name)
            if (record is None or record.location != IN_QUARANTINE
                    or record.received_at >= arrived_before):
                return False
            await self._storage.remove_quarantined(name)
            await self._catalog.forget_quarantined(name)
        return True

    async def untracked_quarantined_files(self) -> list[str]:
        """Names of the regular files in the quarantine that the catalog has no row for (as
        far as its invalid files tell: `remove_untracked_quarantined` looks again)."""
        known = await self._catalog.invalid_names()
        on_disk = await asyncio.to_thread(self._storage.quarantined_file_names)
        return [name for name in on_disk if name not in known]

    async def remove_untracked_quarantined(self, name: str, modified_before: float) -> bool:
        """Remove a file of the quarantine that has no catalog row and was last modified
        before `modified_before` (unix seconds; a move keeps a file's time), under the naming
        lock of its DQM name: setting a file aside renames its row before the file itself."""
        dqm = headers_from_filename(name)
        async with self._naming_lock(dqm.filename if dqm else name):
            if await self._catalog.get(name) is not None:
                return False
            return await asyncio.to_thread(self._storage.remove_untracked_quarantined, name,
                                           modified_before)

    async def adopt_unknown_files(self, chunk_bytes: int) -> int:
        """Catalog the DQM files found in the data directory but not in the catalog (copied in
        by hand, or left by a crash), as pending: the inspection sweeper queues them."""
        known_names = await self._catalog.all_names()
        unknown = await asyncio.to_thread(
            lambda: list(self._storage.unknown_dqm_files(known_names))
        )
        adopted = 0
        for path in unknown:
            try:
                adopted += await self._adopt(path, chunk_bytes)
            except HashingStopped:
                break  # shutting down: the rest is adopted at the next start
            except Exception:
                # One unreadable file must not stop the others from being adopted.
                log.exception("file_adoption_failed", file=path.name)
        return adopted

    def stop_hashing(self) -> None:
        self._stop_hashing.set()

    @property
    def hashing_stop(self) -> threading.Event:
        """Set at shutdown: hashing a file on disk stops (HashingStopped)."""
        return self._stop_hashing

    async def _adopt(self, path: Path, chunk_bytes: int) -> bool:
        dqm = headers_from_filename(path.name) or DQMHeaders(0, 0, DEFAULT_AGENT, 0)
        before = await asyncio.to_thread(path.lstat)
        sha256 = await asyncio.to_thread(sha256_of_file, path, chunk_bytes,
                                         self._stop_hashing)
        async with self._naming_lock(dqm.filename):  # as an upload of that name would
            if await self._catalog.get(path.name) is not None:
                return False  # an upload of these very bytes cataloged it meanwhile
            # Hashed outside the lock: an upload placing these bytes may have failed its
            # commit meanwhile and taken the file back (or it changed): not to be cataloged.
            if not await asyncio.to_thread(_durable_if_unchanged, path, before):
                return False
            await self._catalog.add(
                new_record(path.name, before.st_size, sha256, dqm, ADOPTED_UPLOADER),
                uploaded=False)
        log.info("file_adopted", file=path.name)
        return True


def _durable_if_unchanged(path: Path, before: os.stat_result) -> bool:
    """False if the file at `path` is gone or is no longer the one `before` described;
    otherwise it and its directory entry are fsynced (a file copied in by hand, or placed by
    an upload that died before its directory's fsync, is made durable before its row)."""
    try:
        now = path.lstat()
    except FileNotFoundError:
        return False
    if (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) != (
            before.st_ino, before.st_dev, before.st_size, before.st_mtime_ns):
        return False
    fsync_file_and_directory(path)
    return True
