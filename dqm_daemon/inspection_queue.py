"""The inspection queue: committed files wait here for a worker that inspects them off the loop,
records the result in the catalog and quarantines what is not sound ROOT."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from concurrent.futures import Executor

import structlog

from .catalog import IN_DATA_DIR, IN_QUARANTINE, INVALID, PENDING, Catalog, FileRecord
from .inspection import InspectionResult, inspect_file
from .storage import Storage

log = structlog.get_logger(__name__)


class InspectionQueue:
    def __init__(
        self, catalog: Catalog, storage: Storage, executor: Executor, max_jobs: int
    ) -> None:
        self._catalog = catalog
        self._storage = storage
        self._executor = executor
        self._jobs: asyncio.Queue[FileRecord] = asyncio.Queue(maxsize=max_jobs)
        self._waiters: defaultdict[str, list[asyncio.Future[FileRecord]]] = defaultdict(list)

    @property
    def depth(self) -> int:
        return self._jobs.qsize()

    async def put(self, record: FileRecord) -> None:
        """Queue a file the catalog already holds as pending (waits while the queue is full)."""
        await self._jobs.put(record)

    async def wait_inspected(self, name: str, timeout: float) -> FileRecord | None:
        """The file's catalog record once inspected; None if that takes longer than `timeout`
        (the inspection itself goes on)."""
        future: asyncio.Future[FileRecord] = asyncio.get_running_loop().create_future()
        self._waiters[name].append(future)
        try:
            # Registered first, then checked: a result recorded in between is not missed.
            record = await self._catalog.get(name)
            if record is not None and record.state != PENDING:
                return record
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(name, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(name, None)

    async def run_worker(self) -> None:
        while True:
            record = await self._jobs.get()
            try:
                inspected = await self._inspect(record)
            except Exception:
                # A failure of the daemon itself (catalog, disk), not of the file: keep it
                # pending so a restart retries it, and keep serving.
                log.exception("inspection_failed", file=record.name)
                continue
            finally:
                self._jobs.task_done()
            for future in self._waiters.pop(record.name, []):
                if not future.done():
                    future.set_result(inspected)

    async def _inspect(self, record: FileRecord) -> FileRecord:
        started = time.perf_counter()
        path = self._storage.path_of(record.name, record.location)
        loop = asyncio.get_running_loop()
        result: InspectionResult = await loop.run_in_executor(self._executor, inspect_file, path)
        location = record.location
        if result.state == INVALID and location == IN_DATA_DIR:
            await self._storage.quarantine(record.name)
            location = IN_QUARANTINE
        await self._catalog.record_inspection(
            record.name,
            state=result.state,
            location=location,
            reason=result.reason,
            received=result.received,
        )
        log.info(
            "file_inspected",
            file=record.name,
            state=result.state,
            reason=result.reason,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        inspected = await self._catalog.get(record.name)
        assert inspected is not None
        return inspected
