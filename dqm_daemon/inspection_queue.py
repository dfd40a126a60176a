"""The inspection queue: committed files wait here for a worker. Each worker owns one inspection
child process, records the check's verdict and listing in the catalog, quarantines files that
are not sound ROOT, and announces sound ones to the analyst."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pendulum
import structlog

from .catalog import IN_DATA_DIR, IN_QUARANTINE, INVALID, PENDING, Catalog, FileRecord
from .inspection import UNREADABLE
from .inspection_pool import ChildStartFailed, InspectorProcess
from .metrics import Metrics
from .storage import Storage

log = structlog.get_logger(__name__)

# After a child failed to start, a worker waits this long before taking the next job.
START_FAILURE_BACKOFF_SECONDS = 5.0
# Pending files the sweeper queues per pass (the rest on the next pass).
SWEEP_BATCH = 10_000


# `_record_check`'s answer for a file found missing but back on disk since (an upload restored
# it): checked again, its waiters waiting on.
_CHECK_AGAIN = object()


@dataclasses.dataclass(frozen=True)
class _Checked:
    """What a child said of a file: where the file was, the result, and how long it took."""

    location: str
    result: dict[str, Any]
    seconds: float


class InspectionQueue:
    def __init__(self, catalog: Catalog, storage: Storage, metrics: Metrics, max_jobs: int,
                 on_sound_file: Callable[[], None] = lambda: None) -> None:
        self._catalog = catalog
        self._on_sound_file = on_sound_file
        self._storage = storage
        self._metrics = metrics
        self._jobs: asyncio.Queue[FileRecord] = asyncio.Queue(maxsize=max_jobs)
        self._waiters: defaultdict[str, list[asyncio.Future[FileRecord | None]]] = defaultdict(
            list)
        # Shutting down: nobody waits for a verdict any more (see `stop_waiting`).
        self._stopped_waiting = False
        # Names queued or being inspected: a file is never queued twice at once.
        self._queued: set[str] = set()
        # Of those, the ones queued by their own upload right after it cataloged them.
        self._fresh: set[str] = set()
        # Verdicts being recorded while the workers' children go on with the next files.
        self._recordings: set[asyncio.Task[None]] = set()
        self.running_workers = 0
        self.busy_workers = 0
        # Why the last inspection child failed to start; cleared by the next inspection done.
        self.child_start_failure: str | None = None
        # Set once start-up recovery has queued what the catalog held pending.
        self.recovery_queued = asyncio.Event()
        # When a worker last took or finished a job (for the stuck-queue health check).
        self.last_progress_monotonic = time.monotonic()
        # Files the check could not read (gone from the disk, I/O errors), by name, with why:
        # pending until they can be; the status banner names how many.
        self.unreadable: dict[str, str] = {}

    @property
    def depth(self) -> int:
        return self._jobs.qsize()

    async def put(self, record: FileRecord, *, fresh: bool = False) -> None:
        """Queue a file the catalog already holds as pending (waits while the queue is full;
        a file not queued in the end stays pending and the sweeper queues it). `fresh`: its
        upload cataloged it just now (see `_check`)."""
        if record.name in self._queued:
            return
        self._queued.add(record.name)
        if fresh:
            self._fresh.add(record.name)
        try:
            await self._jobs.put(record)
        except BaseException:
            self._queued.discard(record.name)
            self._fresh.discard(record.name)
            raise

    async def run_sweeper(self, interval_seconds: float) -> None:
        """Queue every file the catalog holds as pending: at start-up (what a restart or a
        kill -9 left), then every `interval_seconds` (what a full queue turned away)."""
        while True:
            try:
                pending = await self._catalog.pending(SWEEP_BATCH)
                queued_now = 0
                for record in pending:
                    if self._jobs.full() and not self.recovery_queued.is_set():
                        # The rest stays pending in the catalog (durable); readiness need
                        # not wait for a long backlog to fit in the queue.
                        self.recovery_queued.set()
                    await self.put(record)
                    queued_now += 1
                if not self.recovery_queued.is_set():
                    log.info("startup_recovery_queued", files=queued_now)
                    self.recovery_queued.set()
            except Exception:
                log.exception("inspection_sweep_failed")
                self.recovery_queued.set()
            await asyncio.sleep(interval_seconds)

    async def queue_and_wait(self, record: FileRecord, timeout: float, *,
                             fresh: bool = True) -> FileRecord | None:
        """Queue a file cataloged as pending and return its record once inspected; None if
        that takes longer than `timeout` (the inspection goes on; a file the full queue did
        not take in time stays pending, and the sweeper queues it). `fresh`: cataloged just
        now by the caller (see `_check`)."""
        if self._stopped_waiting:
            return None  # pending in the catalog: checked at the next start
        verdict = self._expect(record.name)  # before queueing: the verdict cannot be missed
        try:
            async with asyncio.timeout(timeout):
                if not fresh:  # registered first, then read: a verdict between is not missed
                    current = await self._catalog.get(record.name)
                    if current is None or current.state != PENDING:
                        return current
                if self._jobs.full():
                    # Waiting for room, a shutdown's `stop_waiting` must still answer it.
                    putting = asyncio.ensure_future(self.put(record, fresh=fresh))
                    try:
                        await asyncio.wait((putting, verdict),
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        putting.cancel()  # if still waiting: not queued, pending for the sweeper
                else:
                    await self.put(record, fresh=fresh)
                return await verdict
        except TimeoutError:
            return None
        finally:
            self._forget(record.name, verdict)

    async def wait_inspected(self, name: str, timeout: float) -> FileRecord | None:
        """The record of a file cataloged earlier once inspected; None if that takes longer
        than `timeout` (the inspection itself goes on)."""
        verdict = self._expect(name)
        try:
            # Registered first, then checked: a result recorded in between is not missed.
            record = await self._catalog.get(name)
            if record is not None and record.state != PENDING:
                return record
            return await asyncio.wait_for(verdict, timeout)
        except TimeoutError:
            return None
        finally:
            self._forget(name, verdict)

    async def wait_verdicts_delivered(self, timeout: float) -> bool:
        """Shutting down: wait (up to `timeout`) until no upload waits for its verdict."""
        deadline = time.monotonic() + timeout
        while self._waiters:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def stop_waiting(self) -> None:
        """Shutting down: whoever waits for a verdict has None at once (their upload answers
        202, its file pending and checked at the next start), and so has whoever asks later."""
        self._stopped_waiting = True
        for verdicts in self._waiters.values():
            for verdict in verdicts:
                if not verdict.done():
                    verdict.set_result(None)

    def _expect(self, name: str) -> asyncio.Future[FileRecord | None]:
        verdict: asyncio.Future[FileRecord | None] = asyncio.get_running_loop().create_future()
        if self._stopped_waiting:
            verdict.set_result(None)
        self._waiters[name].append(verdict)
        return verdict

    def _forget(self, name: str, verdict: asyncio.Future[FileRecord | None]) -> None:
        waiters = self._waiters.get(name, [])
        if verdict in waiters:
            waiters.remove(verdict)
        if not waiters:
            self._waiters.pop(name, None)

    async def run_worker(self, inspector: InspectorProcess) -> None:
        """Take jobs until cancelled. A job interrupted by shutdown stays pending in the catalog
        and is queued again at the next start."""
        self.running_workers += 1
        try:
            while True:
                record = await self._jobs.get()
                self.busy_workers += 1
                self.last_progress_monotonic = time.monotonic()
                try:
                    checked = await self._check(record, inspector)
                    self.child_start_failure = None
                except ChildStartFailed as exc:
                    self.child_start_failure = str(exc)
                    log.error("inspection_child_failed_to_start", file=record.name, error=str(exc))
                    await asyncio.sleep(START_FAILURE_BACKOFF_SECONDS)
                    self._jobs.task_done()
                    try:
                        self._jobs.put_nowait(record)  # queued again: its name stays queued
                    except asyncio.QueueFull:
                        self._queued.discard(record.name)  # pending: the sweeper queues it
                    continue
                except Exception:
                    # A fault of the daemon (catalog, disk), not of the file: the file stays
                    # pending, so a restart retries it; the worker keeps serving.
                    log.exception("inspection_failed", file=record.name)
                    self._job_done(record)
                    continue
                finally:
                    self.busy_workers -= 1
                    self.last_progress_monotonic = time.monotonic()
                # The child takes the next file while this one's verdict is being recorded.
                recording = asyncio.create_task(self._record(record, checked))
                self._recordings.add(recording)
                recording.add_done_callback(self._recordings.discard)
        finally:
            self.running_workers -= 1
            for recording in list(self._recordings):
                recording.cancel()  # not recorded: pending, checked again at the next start
            await inspector.close()

    def _job_done(self, record: FileRecord) -> None:
        self._queued.discard(record.name)
        self._fresh.discard(record.name)
        self._jobs.task_done()

    async def _check(self, record: FileRecord, inspector: InspectorProcess,
                     ) -> FileRecord | _Checked:
        """The child's verdict on a pending file; the catalog's record if it is pending no more.

        A file queued by its own upload right after the commit is known to be pending and in
        the data directory (while it is queued nobody else can queue or check it). A file
        queued from the catalog (the sweeper, at start-up or later) may have been checked since
        the catalog was read, or left half-way into quarantine by a crash: it is looked up."""
        started = time.perf_counter()
        if record.name in self._fresh:
            location = record.location
        else:
            current = await self._catalog.get(record.name)
            if current is None or current.state != PENDING:
                return current or record  # checked meanwhile (queued by a POST and the sweeper)
            started = time.perf_counter()
            location = await asyncio.to_thread(
                self._storage.current_location, record.name, record.location
            )
        result: dict[str, Any] = await inspector.inspect(
            self._storage.path_of(record.name, location)
        )
        return _Checked(location, result, time.perf_counter() - started)

    async def _record(self, record: FileRecord, checked: FileRecord | _Checked) -> None:
        """Quarantine an invalid file, record the verdict, and answer whoever waits for it
        (None: no verdict, the file stays pending)."""
        try:
            inspected = checked if isinstance(checked, FileRecord) else await self._record_check(
                record, checked)
        except Exception:
            log.exception("inspection_failed", file=record.name)  # stays pending
            return
        finally:
            self._job_done(record)
        if inspected is _CHECK_AGAIN:
            await self.put(record)
            return
        for future in self._waiters.pop(record.name, []):
            if not future.done():
                future.set_result(inspected)

    async def _record_check(self, record: FileRecord, checked: _Checked) -> Any:
        """The recorded verdict; None for none (the file stays pending), or _CHECK_AGAIN."""
        result, location = checked.result, checked.location
        if result["state"] == UNREADABLE:  # a fault of the disk, no verdict on the file
            if result.get("missing") and await asyncio.to_thread(self._storage.taken,
                                                                 record.name):
                return _CHECK_AGAIN  # restored while it was being checked
            said_before = record.name in self.unreadable
            self.unreadable[record.name] = result.get("reason") or "unreadable"
            (log.debug if said_before else log.warning)(
                "file_unreadable", file=record.name, reason=result.get("reason"))
            return None  # pending: checked again at the next sweep
        self.unreadable.pop(record.name, None)
        if result["state"] == INVALID and location == IN_DATA_DIR:
            await self._storage.quarantine(record.name)
            location = IN_QUARANTINE
        object_count = result.get("object_count")
        duration_ms = round(checked.seconds * 1000, 1)
        self._metrics.inspection_seconds.labels(result["state"]).observe(checked.seconds)
        inspected = await self._catalog.record_inspection(
            record.name,
            state=result["state"],
            location=location,
            reason=result.get("reason"),
            received=result.get("received"),
            objects_json=result.get("objects_json"),
            object_count=object_count,
            inspection_ms=duration_ms,
            inspected_at=pendulum.now("UTC").to_iso8601_string(),
        )
        log.info(
            "file_inspected",
            file=record.name,
            state=result["state"],
            reason=result.get("reason"),
            objects=object_count,
            duration_ms=duration_ms,
            child_peak_rss_kib=result.get("peak_rss_kib"),
        )
        if result["state"] != INVALID:
            self._on_sound_file()
        return inspected
