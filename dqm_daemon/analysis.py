"""The analysis of checked files: every object read with uproot and summarised, then compared
with the previous file of the same agent and run (the findings).

It runs after the check an upload waits for, in a child process of its own at the lowest CPU
priority, and before each batch of files it waits (up to YIELD_SECONDS) for a burst of uploads
to end, so a burst is answered at the speed of the check while the figures follow when it is
over; under uploads that never pause, it still analyses BATCH files per YIELD_SECONDS at least.
Its work list is the catalog itself (files whose analysis is pending), so a restart loses
nothing; files are taken in the order their agents sent them, so each file is compared with an
analysed predecessor.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pendulum
import structlog

from .catalog import DONE, FAILED, Catalog, FileRecord
from .findings import compare_with_previous
from .inspection import OK
from .inspection_pool import ChildStartFailed, InspectorProcess
from .metrics import Metrics
from .storage import Storage
from .uploads import UploadsInProgress

log = structlog.get_logger(__name__)

# Files taken from the catalog per trip.
BATCH = 20
# With nothing announced, the catalog is looked at again after this long anyway.
IDLE_POLL_SECONDS = 30.0
# After the child failed to start, wait this long before the next try.
START_FAILURE_BACKOFF_SECONDS = 5.0
# Object lists longer than this are compared off the event loop.
LARGE_OBJECT_LIST = 2_000
# Before each batch, wait this long at most for a burst of uploads to end: a burst is over when
# no upload has started or ended for QUIET_SECONDS.
YIELD_SECONDS = 10.0
QUIET_SECONDS = 0.5


class Analyst:
    def __init__(self, catalog: Catalog, storage: Storage, metrics: Metrics,
                 analyser: InspectorProcess, uploads: UploadsInProgress) -> None:
        self._catalog = catalog
        self._uploads = uploads
        self._storage = storage
        self._metrics = metrics
        self._analyser = analyser
        self._work_announced = asyncio.Event()
        self.busy = False

    def announce(self) -> None:
        """A file has passed its check: analyse it soon."""
        self._work_announced.set()

    async def run(self) -> None:
        """Analyse pending files until cancelled; a file interrupted by shutdown stays pending."""
        try:
            while True:
                self._work_announced.clear()  # before looking: an announcement is never lost
                try:
                    batch = await self._catalog.awaiting_analysis(BATCH)
                    if batch:
                        await self._uploads.wait_quiet(QUIET_SECONDS, YIELD_SECONDS)
                    for record in batch:
                        await self._analyse(record)
                except ChildStartFailed as exc:
                    log.error("analysis_child_failed_to_start", error=str(exc))
                    await asyncio.sleep(START_FAILURE_BACKOFF_SECONDS)
                    continue
                except Exception:
                    log.exception("analysis_failed")  # the daemon's fault (catalog, disk)
                    batch = []
                if not batch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._work_announced.wait(), IDLE_POLL_SECONDS)
        finally:
            await self._analyser.close()

    async def _analyse(self, record: FileRecord) -> None:
        started = time.perf_counter()
        self.busy = True
        try:
            result = await self._analyser.analyse(
                self._storage.path_of(record.name, record.location))
        finally:
            self.busy = False
        objects, findings = None, None
        if result["state"] == OK:
            analysis, objects = DONE, result["objects"]
            previous = await self._catalog.previous_objects(record)
            if previous and len(objects) > LARGE_OBJECT_LIST:
                findings = await asyncio.to_thread(compare_with_previous, *previous, objects)
            else:
                findings = compare_with_previous(*previous, objects) if previous else []
        else:
            analysis = FAILED  # the file stays valid: its check passed; the figures are missing
        duration_seconds = time.perf_counter() - started
        self._metrics.analysis_seconds.labels(analysis).observe(duration_seconds)
        await self._catalog.record_analysis(
            record.name, analysis=analysis, reason=result.get("reason"), objects=objects,
            findings=findings, analysis_ms=round(duration_seconds * 1000, 1),
            analysed_at=pendulum.now("UTC").to_iso8601_string(),
        )
        log.info("file_analysed", file=record.name, analysis=analysis,
                 reason=result.get("reason"), findings=len(findings) if findings else 0,
                 duration_ms=round(duration_seconds * 1000, 1),
                 child_peak_rss_kib=result.get("peak_rss_kib"))
        if analysis == DONE:
            await self._compare_successor(record, objects)

    async def _compare_successor(self, record: FileRecord, objects: list[dict[str, Any]]) -> None:
        """A file analysed after its successor (it arrived late, or waited for its check) is
        the one its successor must be compared with: the successor's findings are redone."""
        successor = await self._catalog.next_analysed(record)
        if successor is None:
            return
        name, successor_objects = successor
        if len(successor_objects) > LARGE_OBJECT_LIST:
            findings = await asyncio.to_thread(compare_with_previous, record.name, objects,
                                               successor_objects)
        else:
            findings = compare_with_previous(record.name, objects, successor_objects)
        await self._catalog.record_findings(name, findings)
        log.info("findings_redone", file=name, previous_file=record.name, findings=len(findings))
