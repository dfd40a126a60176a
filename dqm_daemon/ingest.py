"""Committing a finished upload under its DQM name, and recovering what a previous run left.

A commit never overwrites: the same name with the same SHA-256 is the same file (the agent
retried), and a different file with a taken name is kept under the next free variant name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import pendulum
import structlog

from .catalog import IN_DATA_DIR, Catalog, FileRecord
from .inspection_queue import InspectionQueue
from .naming import DEFAULT_AGENT, DQMHeaders, headers_from_filename, variant_filename
from .storage import IncomingFile, Storage, sha256_of_file

log = structlog.get_logger(__name__)

ADOPTED_UPLOADER = "adopted"


@dataclasses.dataclass(frozen=True)
class Commit:
    record: FileRecord
    duplicate: bool  # True: the same file was already stored; nothing new was kept


def utc_now() -> str:
    return pendulum.now("UTC").to_iso8601_string()


class Ingest:
    def __init__(self, catalog: Catalog, storage: Storage, inspection_queue: InspectionQueue):
        self._catalog = catalog
        self._storage = storage
        self._inspection_queue = inspection_queue
        # Serialises the name choice, so two uploads never both think a name is free.
        self._naming_lock = asyncio.Lock()

    async def commit(self, incoming: IncomingFile, dqm: DQMHeaders, uploader: str) -> Commit:
        """Store a finished, fsynced upload under its DQM name and catalog it as pending."""
        async with self._naming_lock:
            for variant in itertools.count(1):
                name = variant_filename(dqm.filename, variant)
                existing = await self._catalog.get(name)
                if existing is not None:
                    if existing.sha256 == incoming.sha256:
                        await incoming.discard()
                        return Commit(existing, duplicate=True)
                    continue
                if await self._storage.link_into_place(incoming, name):
                    break
                # A file of that name is on disk but not cataloged: never overwrite it.
            record = FileRecord(
                name=name,
                location=IN_DATA_DIR,
                size=incoming.size,
                sha256=incoming.sha256,
                agent=dqm.agent,
                run=dqm.run_number,
                timestamp=dqm.timestamp,
                data_status=dqm.data_status,
                received_at=utc_now(),
                uploader=uploader,
            )
            await self._catalog.add(record)
        return Commit(record, duplicate=False)

    async def recover(self, chunk_bytes: int) -> int:
        """Adopt DQM files found on disk but not in the catalog, and queue every file still
        pending inspection. Returns how many files were queued."""
        known_names = await self._catalog.all_names()
        for path in self._storage.unknown_dqm_files(known_names):
            dqm = headers_from_filename(path.name) or DQMHeaders(0, 0, DEFAULT_AGENT, 0)
            sha256 = await asyncio.to_thread(sha256_of_file, path, chunk_bytes)
            await self._catalog.add(
                FileRecord(
                    name=path.name,
                    location=IN_DATA_DIR,
                    size=path.stat().st_size,
                    sha256=sha256,
                    agent=dqm.agent,
                    run=dqm.run_number,
                    timestamp=dqm.timestamp,
                    data_status=dqm.data_status,
                    received_at=utc_now(),
                    uploader=ADOPTED_UPLOADER,
                ),
                uploaded=False,
            )
            log.info("file_adopted", file=path.name)
        pending = await self._catalog.pending()
        for record in pending:
            await self._inspection_queue.put(record)
        return len(pending)
