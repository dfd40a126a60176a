"""The catalog: one SQLite database (WAL) in the data directory recording every stored file.

All SQLite work runs on one dedicated thread, so the event loop never waits on the disk and the
connection is only ever used from the thread that owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from . import activity
from .naming import variant_filename

T = TypeVar("T")


# At most this many writes share one commit.
GROUP_COMMIT_LIMIT = 256

PENDING, OK, INVALID = "pending", "ok", "invalid"
# The analysis of a sound file: PENDING, then DONE or FAILED.
DONE, FAILED = "done", "failed"
IN_DATA_DIR, IN_QUARANTINE = "data", "quarantine"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    name          TEXT PRIMARY KEY,
    location      TEXT NOT NULL,           -- 'data' or 'quarantine'
    size          INTEGER NOT NULL,
    sha256        TEXT NOT NULL,
    agent         TEXT NOT NULL,
    run           INTEGER NOT NULL,
    timestamp     INTEGER NOT NULL,        -- the agent's timeStamp, unix seconds
    data_status   INTEGER NOT NULL,
    received_at   TEXT NOT NULL,           -- UTC, ISO 8601
    uploader      TEXT NOT NULL,
    state         TEXT NOT NULL,           -- 'pending', 'ok' or 'invalid'
    reason        TEXT,                    -- why a file is invalid
    received_json TEXT,                    -- top-level objects, as the Overwatch receiver reported
    objects_json  TEXT,                    -- every object found, with its summary figures
    object_count  INTEGER,
    findings_json TEXT,                    -- changes since the previous file of agent and run
    inspected_at  TEXT,                    -- UTC, ISO 8601
    inspection_ms REAL,
    analysis      TEXT,                    -- per-object figures: 'pending', 'done' or 'failed'
    analysis_reason TEXT,                  -- why the analysis failed
    analysed_at   TEXT,                    -- UTC, ISO 8601
    analysis_ms   REAL
);
CREATE INDEX IF NOT EXISTS files_by_run ON files (run, agent, timestamp);
CREATE INDEX IF NOT EXISTS files_by_agent ON files (agent, timestamp);
CREATE INDEX IF NOT EXISTS files_by_time ON files (timestamp);
CREATE INDEX IF NOT EXISTS files_by_state ON files (state, received_at);
CREATE INDEX IF NOT EXISTS files_by_received ON files (received_at);
"""
# Columns added since the first catalogs were written: added to an older catalog on opening.
_LATER_COLUMNS = {"analysis": "TEXT", "analysis_reason": "TEXT", "analysed_at": "TEXT",
                  "analysis_ms": "REAL"}
_LATER_INDEX = (
    "CREATE INDEX IF NOT EXISTS files_by_analysis ON files (analysis, timestamp, received_at)")


def _add_later_columns(connection: sqlite3.Connection) -> None:
    """Bring an older catalog up to date, in one transaction: a crash half-way leaves it as it
    was, and the next start does the whole upgrade again."""
    present = {row["name"] for row in connection.execute("PRAGMA table_info(files)")}
    connection.execute("BEGIN IMMEDIATE")
    try:
        for column, kind in _LATER_COLUMNS.items():
            if column not in present:
                connection.execute(f"ALTER TABLE files ADD COLUMN {column} {kind}")
        if "analysis" not in present:
            # Sound files of an older catalog were summarised when inspected: they count as
            # analysed, so the next file of their run is compared with them.
            connection.execute("UPDATE files SET analysis = 'done' WHERE state = 'ok'")
        connection.execute(_LATER_INDEX)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


@dataclasses.dataclass(frozen=True)
class FileRecord:
    name: str
    location: str
    size: int
    sha256: str
    agent: str
    run: int
    timestamp: int
    data_status: int
    received_at: str
    uploader: str
    state: str = PENDING
    reason: str | None = None
    received: dict[str, str] | None = None
    object_count: int | None = None
    findings: list[dict[str, Any]] | None = None
    inspected_at: str | None = None
    inspection_ms: float | None = None
    analysis: str | None = None
    analysis_reason: str | None = None
    analysed_at: str | None = None
    analysis_ms: float | None = None
    # Only filled when asked for (it can be large): see Catalog.objects_excerpt.
    objects: list[dict[str, Any]] | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> FileRecord:
        values = {key: row[key] for key in row.keys() if not key.endswith("_json")}
        for column in _JSON_COLUMNS:
            if column in row.keys():
                text = row[column]
                values[column.removesuffix("_json")] = json.loads(text) if text else None
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        # Shallow: the object list can be long, and deep-copying it is wasted work. Every field
        # is in the instance's __dict__ (no slots), in declaration order.
        return dict(self.__dict__)


@dataclasses.dataclass(frozen=True)
class ObjectsExcerpt:
    """What a file's page shows of its objects (see `Catalog.objects_excerpt`)."""

    record: FileRecord  # with `objects`: the first ones only
    object_count: int  # all of them
    drawable_paths: list[str]  # the first drawable histograms' paths
    drawable_count: int  # all of them


@dataclasses.dataclass(frozen=True)
class NameHolders:
    """The rows a commit under one DQM name must see (see `Catalog.name_holders`)."""

    copy: FileRecord | None  # a row of the same headers and bytes, under any variant name
    variants: list[FileRecord]  # the rows of variants 1, 2, … before the first free one


_JSON_COLUMNS = ("received_json", "findings_json", "objects_json")
# Every column but the objects, which only the file's own info page needs.
_SUMMARY_COLUMNS = (
    "name, location, size, sha256, agent, run, timestamp, data_status, received_at, uploader,"
    " state, reason, received_json, object_count, findings_json, inspected_at, inspection_ms,"
    " analysis, analysis_reason, analysed_at, analysis_ms"
)
# The same without the top-level listing, for the pages and work lists, which never show it (a
# file of many top-level objects has a long one, parsed for nothing on every status view).
_PAGE_COLUMNS = ", ".join(column for column in _SUMMARY_COLUMNS.split(", ")
                          if column != "received_json")


def _as_json(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None


def is_fault(error: BaseException) -> bool:
    """An error of the catalog itself (its disk, its file), not of one statement's values."""
    return isinstance(error, sqlite3.DatabaseError) and not isinstance(
        error, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError,
                sqlite3.NotSupportedError))


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled; the write happened all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Lane:
    """One SQLite connection and the one thread that uses it."""

    def __init__(self, name: str) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.connection: sqlite3.Connection | None = None
        # Writes waiting for the next commit, and whether a commit is under way.
        self._batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._batch_lock = threading.Lock()
        self._committing = False

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in a transaction shared with the writes queued meanwhile (group commit):
        under load, one fsync makes many writes durable. Returns once its commit is on disk;
        if `work` raises, only its own changes are rolled back."""
        assert self.connection is not None, "catalog is not open"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._batch_lock:
            self._batch.append((work, future))
            start = not self._committing
            self._committing = True
        if start:
            loop.run_in_executor(self._thread, self._commit_batches, loop)
        return await future

    def _commit_batches(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._batch_lock:
                batch, self._batch = self._batch[:GROUP_COMMIT_LIMIT], self._batch[GROUP_COMMIT_LIMIT:]
                if not batch:
                    self._committing = False
                    return
            try:
                outcomes = self._commit(batch)
            except BaseException as exc:  # not even begun (closed connection): all fail
                outcomes = [(future, None, exc) for _, future in batch]
            try:
                for future, result, error in outcomes:
                    loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                with self._batch_lock:
                    self._committing = False
                return

    def _commit(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]],
                ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        connection = self.connection
        assert connection is not None
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            connection.execute("BEGIN IMMEDIATE")
            for work, future in batch:
                connection.execute("SAVEPOINT one_write")
                try:
                    result = work(connection)
                except Exception as exc:
                    try:
                        connection.execute("ROLLBACK TO one_write")
                        connection.execute("RELEASE one_write")
                    except sqlite3.Error:
                        raise exc from None  # SQLite ended the transaction itself: all fail
                    outcomes.append((future, None, exc))
                else:
                    connection.execute("RELEASE one_write")
                    outcomes.append((future, result, None))
            connection.execute("COMMIT")
        except Exception as exc:  # the commit failed (disk full, I/O error): none is durable
            if connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
            return [(future, None, exc) for _, future in batch]
        return outcomes

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        assert self.connection is not None, "catalog is not open"
        connection = self.connection
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, connection)

    async def connect(self, path: Path, *, writer: bool) -> None:
        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            connection.row_factory = sqlite3.Row
            if writer:
                connection.execute("PRAGMA journal_mode=WAL")
                # FULL: a row is on disk when the upload is acknowledged, like the file itself.
                connection.execute("PRAGMA synchronous=FULL")
                connection.executescript(_SCHEMA)
                _add_later_columns(connection)
                connection.executescript(activity.SCHEMA)
                activity.count_states_once(connection)
            else:
                connection.execute("PRAGMA query_only=ON")
                # A first read opens the write-ahead log now. Opened later, after the data
                # directory vanished (an unmounted disk), it never opens: every read fails.
                connection.execute("SELECT count(*) FROM files").fetchone()
            return connection

        self.connection = await asyncio.get_running_loop().run_in_executor(self._thread, connect)

    async def close(self) -> None:
        if self.connection is not None:
            await self.run(lambda connection: connection.close())
            self.connection = None
        self._thread.shutdown(wait=True)


def iso_utc(moment: datetime.datetime) -> str:
    """UTC, ISO 8601, always with microseconds: the catalog sorts these as text, and a time on
    a whole second written without its fraction would sort after the rest of that second."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Catalog:
    """Writes go through one connection; reads through another, so a page or a listing never
    waits behind a commit's fsync (WAL lets readers see every committed write)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer = _Lane("catalog-writer")
        self._reader = _Lane("catalog-reader")
        # The latest fault of the catalog itself: when (monotonic) and what.
        self._last_fault: tuple[float, str] | None = None
        # When this daemon opened it: a pause in an agent's files spanning that moment is the
        # daemon's downtime, not the agent's usual interval.
        self._opened_at = ""

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await self._writer.write(work)
        except Exception as exc:
            self._note_fault(exc)
            raise

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await self._reader.run(work)
        except Exception as exc:
            self._note_fault(exc)
            raise

    async def _read_if_readable(self, work: Callable[[sqlite3.Connection], T]) -> T | None:
        """`work`'s result, or None when a fault of the catalog stops it (kept for /healthz)."""
        try:
            return await self._read(work)
        except Exception as exc:
            if not is_fault(exc):
                raise
            return None

    def _note_fault(self, error: Exception) -> None:
        if is_fault(error):
            self._last_fault = (time.monotonic(), str(error))

    def recent_fault(self, within_seconds: float) -> str | None:
        """What the catalog's latest fault said, if it came within the last `within_seconds`."""
        if self._last_fault is None:
            return None
        when, what = self._last_fault
        return what if time.monotonic() - when <= within_seconds else None

    async def open(self) -> None:
        self._opened_at = iso_utc(datetime.datetime.now(datetime.UTC))
        await self._writer.connect(self._path, writer=True)  # creates the schema first
        await self._reader.connect(self._path, writer=False)

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    async def add(self, record: FileRecord, *, uploaded: bool = True) -> None:
        """Insert a new file; an uploaded one (not adopted from disk) also counts as activity
        of its agent and run."""
        # Shallow (asdict copies every value deeply): the values are written at once.
        row = {field.name: getattr(record, field.name) for field in dataclasses.fields(record)}
        for column in _JSON_COLUMNS:
            value = row.pop(column.removesuffix("_json"))
            row[column] = json.dumps(value) if value is not None else None
        columns = ", ".join(row)
        placeholders = ", ".join(f":{key}" for key in row)

        def insert(connection: sqlite3.Connection) -> None:
            connection.execute(f"INSERT INTO files ({columns}) VALUES ({placeholders})", row)
            if uploaded:
                activity.record_upload(connection, record.agent, record.run, record.name,
                                       record.received_at, self._opened_at)

        await self._run(insert)

    async def view(self, query: Callable[..., T], *args: Any) -> T:
        """Run a read-only query function (see `activity`) on the catalog's thread."""
        return await self._read(lambda connection: query(connection, *args))

    async def view_if_readable(self, query: Callable[..., T], *args: Any) -> T | None:
        """`view`, or None when a fault of the catalog stops it (kept for /healthz)."""
        return await self._read_if_readable(lambda connection: query(connection, *args))

    async def status_snapshot(self, latest: int, runs: int, invalid_since: str,
                              agents_since: str) -> dict[str, Any] | None:
        """Everything the status page reads, in one trip to the reader thread: under load,
        each trip waits its turn on a busy event loop. None when a fault of the catalog stops
        it: the page still shows the live state, and the fault."""

        def snapshot(connection: sqlite3.Connection) -> dict[str, Any]:
            rows = connection.execute(
                f"SELECT {_PAGE_COLUMNS} FROM files ORDER BY received_at DESC LIMIT ?",
                (latest,),
            ).fetchall()
            pending_files, oldest_pending = activity.count_pending(connection)
            return {
                "latest_files": [FileRecord.from_row(row) for row in rows],
                "pending_files": pending_files,
                "oldest_pending_at": oldest_pending,
                "awaiting_analysis": connection.execute(
                    "SELECT count(*) FROM files WHERE analysis = ?", (PENDING,)).fetchone()[0],
                "agents": activity.agents_board(connection, agents_since),
                "runs": activity.recent_runs(connection, runs),
                "invalid_since": activity.count_invalid_since(connection, invalid_since),
            }

        return await self._read_if_readable(snapshot)

    async def run_files(self, run: int, limit: int) -> tuple[list[FileRecord], bool]:
        """One run's latest `limit` files (by arrival), by agent and time, and whether it has
        more: a long run shows its latest files of every agent, not the first agents' all."""
        latest = await self._records("run = ? ORDER BY received_at DESC LIMIT ?",
                                     (run, limit + 1))
        shown = sorted(latest[:limit],
                       key=lambda record: (record.agent, record.timestamp, record.received_at))
        return shown, len(latest) > limit

    async def with_objects_text(self, name: str) -> tuple[FileRecord, str | None] | None:
        """A file's row and its objects as the JSON text stored (the info resource sends it
        as it is: parsing 100,000 objects to encode them again held the event loop a second)."""

        def fetch(connection: sqlite3.Connection) -> tuple[FileRecord, str | None] | None:
            row = connection.execute(
                f"SELECT {_SUMMARY_COLUMNS}, objects_json FROM files WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                return None
            summary = {key: row[key] for key in row.keys() if key != "objects_json"}
            return FileRecord.from_row(summary), row["objects_json"]

        return await self._read(fetch)

    async def objects_excerpt(self, name: str, listed: int, drawable: int,
                              drawable_classes: tuple[str, ...]) -> ObjectsExcerpt | None:
        """A file's row with its first `listed` objects, how many it has, and the paths of its
        first `drawable` histograms (interpreted, 1D or 2D, of `drawable_classes`) and how many
        there are. SQLite walks the stored list (off the interpreter lock); only the excerpt is
        parsed in Python."""
        drawn_class = " OR ".join(
            "json_extract(value, '$.class') GLOB ? || '*'" for _ in drawable_classes)
        drawable_where = (
            "json_extract(value, '$.interpreted') = 1 AND json_extract(value, '$.dimensions')"
            f" IN (1, 2) AND ({drawn_class})")

        def fetch(connection: sqlite3.Connection) -> ObjectsExcerpt | None:
            row = connection.execute(
                f"SELECT {_SUMMARY_COLUMNS}, json_array_length(objects_json) AS object_total,"
                " (SELECT json_group_array(json(value)) FROM (SELECT value FROM"
                "   json_each(files.objects_json) LIMIT ?)) AS objects_json"
                " FROM files WHERE name = ?", (listed, name)).fetchone()
            if row is None:
                return None
            record = FileRecord.from_row(
                {key: row[key] for key in row.keys() if key != "object_total"})
            drawable_count, paths = 0, []
            if row["object_total"]:
                drawable_count = connection.execute(
                    "SELECT count(*) FROM files, json_each(files.objects_json)"
                    f" WHERE name = ? AND {drawable_where}",
                    (name, *drawable_classes)).fetchone()[0]
                # As JSON text, parsed here: json_extract would turn an escape the JSON holds
                # (a lone surrogate of an older catalog's row) into bytes no decoder takes.
                paths = [json.loads(path) for (path,) in connection.execute(
                    "SELECT value -> '$.path' FROM files, json_each(files.objects_json)"
                    f" WHERE name = ? AND {drawable_where} LIMIT ?",
                    (name, *drawable_classes, drawable))]
            return ObjectsExcerpt(record, row["object_total"] or 0, paths, drawable_count)

        return await self._read(fetch)

    async def get(self, name: str) -> FileRecord | None:
        """A file's row, without its objects (see `objects_excerpt`, `with_objects_text`)."""

        def fetch(connection: sqlite3.Connection) -> FileRecord | None:
            row = connection.execute(
                f"SELECT {_SUMMARY_COLUMNS} FROM files WHERE name = ?", (name,)
            ).fetchone()
            return FileRecord.from_row(row) if row else None

        return await self._read(fetch)

    async def record_inspection(
        self,
        name: str,
        *,
        state: str,
        location: str,
        reason: str | None,
        received: dict[str, str] | None,
        objects_json: str | None,
        object_count: int | None,
        inspection_ms: float,
        inspected_at: str,
    ) -> FileRecord:
        """The check's verdict and listing (JSON text, stored as the child wrote it); a sound
        file then awaits its analysis. Returns the file's record as committed."""
        analysis = PENDING if state == OK else None

        def update(connection: sqlite3.Connection) -> FileRecord:
            connection.execute(
                "UPDATE files SET state = ?, location = ?, reason = ?, received_json = ?,"
                " objects_json = ?, object_count = ?, inspection_ms = ?, inspected_at = ?,"
                " analysis = ? WHERE name = ?",
                (state, location, reason, _as_json(received), objects_json, object_count,
                 inspection_ms, inspected_at, analysis, name),
            )
            row = connection.execute(
                f"SELECT {_SUMMARY_COLUMNS} FROM files WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise LookupError(f"{name} is not in the catalog")
            record = FileRecord.from_row(row)
            if state == OK:  # only a sound file starts or ends its agent's run
                activity.record_data_status(connection, record.agent, record.run,
                                            record.data_status, record.received_at,
                                            record.timestamp)
            return record

        return await self._run(update)

    async def record_analysis(
        self,
        name: str,
        *,
        analysis: str,
        reason: str | None,
        objects: list[dict[str, Any]] | None,
        findings: list[dict[str, Any]] | None,
        analysis_ms: float,
        analysed_at: str,
    ) -> None:
        """The analysis' figures replace the check's listing; a failed analysis keeps it."""
        await self._run(
            lambda connection: connection.execute(
                "UPDATE files SET analysis = ?, analysis_reason = ?,"
                " objects_json = coalesce(?, objects_json), findings_json = ?, analysis_ms = ?,"
                " analysed_at = ? WHERE name = ?",
                (analysis, reason, _as_json(objects), _as_json(findings), analysis_ms,
                 analysed_at, name),
            )
        )

    async def awaiting_analysis(self, limit: int) -> list[FileRecord]:
        """Sound files not analysed yet, in the order their agents sent them."""
        return await self._records("analysis = ? ORDER BY timestamp, received_at LIMIT ?",
                                   (PENDING, limit))

    async def _records(self, condition: str, parameters: tuple[Any, ...]) -> list[FileRecord]:
        """The summary rows `WHERE condition` (which may end with ORDER BY and LIMIT), without
        the top-level listing (`received` is None)."""
        rows = await self._read(
            lambda connection: connection.execute(
                f"SELECT {_PAGE_COLUMNS} FROM files WHERE {condition}", parameters
            ).fetchall()
        )
        return [FileRecord.from_row(row) for row in rows]

    async def previous_objects(self, record: FileRecord) -> tuple[str, list[dict[str, Any]]] | None:
        """The objects of the latest analysed file of the same agent and run sent before
        `record`."""

        def fetch(connection: sqlite3.Connection) -> tuple[str, list[dict[str, Any]]] | None:
            row = connection.execute(
                "SELECT name, objects_json FROM files WHERE agent = ? AND run = ? AND +state = ?"
                " AND +analysis = ? AND name != ?"
                " AND (timestamp < ? OR (timestamp = ? AND received_at < ?))"
                " ORDER BY timestamp DESC, received_at DESC LIMIT 1",
                (record.agent, record.run, OK, DONE, record.name, record.timestamp,
                 record.timestamp, record.received_at),
            ).fetchone()
            if row is None or row["objects_json"] is None:
                return None
            return row["name"], json.loads(row["objects_json"])

        return await self._read(fetch)

    async def next_analysed(self, record: FileRecord) -> tuple[str, list[dict[str, Any]]] | None:
        """The name and objects of the earliest analysed file of the same agent and run sent
        after `record`: analysed before it (it arrived late), it was compared with another."""

        def fetch(connection: sqlite3.Connection) -> tuple[str, list[dict[str, Any]]] | None:
            row = connection.execute(
                "SELECT name, objects_json FROM files WHERE agent = ? AND run = ? AND +state = ?"
                " AND +analysis = ? AND name != ?"
                " AND (timestamp > ? OR (timestamp = ? AND received_at > ?))"
                " ORDER BY timestamp, received_at LIMIT 1",
                (record.agent, record.run, OK, DONE, record.name, record.timestamp,
                 record.timestamp, record.received_at),
            ).fetchone()
            if row is None or row["objects_json"] is None:
                return None
            return row["name"], json.loads(row["objects_json"])

        return await self._read(fetch)

    async def name_holders(self, filename: str, agent: str, run: int, timestamp: int,
                           sha256: str) -> NameHolders:
        """In one read, what a commit of a file under the DQM name `filename` must know: a file
        of these headers holding these bytes, whichever variant of the name it has (the run's
        index finds it), and the rows of the name's variants 1, 2, … up to the first variant
        no row has."""

        def fetch(connection: sqlite3.Connection) -> NameHolders:
            row = connection.execute(
                f"SELECT {_SUMMARY_COLUMNS} FROM files WHERE run = ? AND agent = ?"
                " AND timestamp = ? AND sha256 = ? ORDER BY name LIMIT 1",
                (run, agent, timestamp, sha256)).fetchone()
            variants: list[FileRecord] = []
            while variant := connection.execute(
                    f"SELECT {_SUMMARY_COLUMNS} FROM files WHERE name = ?",
                    (variant_filename(filename, len(variants) + 1),)).fetchone():
                variants.append(FileRecord.from_row(variant))
            return NameHolders(FileRecord.from_row(row) if row else None, variants)

        return await self._read(fetch)

    async def claim_adopted(self, adopted: FileRecord, upload: FileRecord) -> bool:
        """A file adopted from disk (left by a crash between placing and cataloging it) whose
        upload came again: its row takes the upload's uploader, dataStatus and time, and the
        upload counts as its agent's activity, as the first attempt would have (an end of data
        is not lost). False if another upload claimed it first."""

        def claim(connection: sqlite3.Connection) -> bool:
            if connection.execute(
                    "UPDATE files SET uploader = ?, data_status = ?, received_at = ?"
                    " WHERE name = ? AND uploader = ?",
                    (upload.uploader, upload.data_status, upload.received_at, adopted.name,
                     adopted.uploader)).rowcount != 1:
                return False
            activity.record_upload(connection, upload.agent, upload.run, adopted.name,
                                   upload.received_at, self._opened_at)
            (state,) = connection.execute("SELECT state FROM files WHERE name = ?",
                                          (adopted.name,)).fetchone()
            if state == OK:  # checked already; a pending one's verdict counts it
                activity.record_data_status(connection, upload.agent, upload.run,
                                            upload.data_status, upload.received_at,
                                            upload.timestamp)
            return True

        return await self._run(claim)

    async def quarantined_before(self, before_iso: str, limit: int) -> list[str]:
        """Names of quarantined files that arrived before `before_iso`, the oldest first."""
        return await self._read(lambda connection: [row[0] for row in connection.execute(
            "SELECT name FROM files WHERE state = ? AND received_at < ? AND location = ?"
            " ORDER BY received_at LIMIT ?", (INVALID, before_iso, IN_QUARANTINE, limit))])

    async def forget_quarantined(self, name: str) -> None:
        """Remove a quarantined file's row (its file is gone)."""
        await self._run(lambda connection: connection.execute(
            "DELETE FROM files WHERE name = ? AND location = ?", (name, IN_QUARANTINE)))

    async def rename_quarantined(self, name: str, new_name: str) -> bool:
        """Give a quarantined file's row another name (its name goes to a sound upload);
        False if `name` is not a quarantined row any more."""

        def rename(connection: sqlite3.Connection) -> bool:
            return connection.execute(
                "UPDATE files SET name = ? WHERE name = ? AND location = ?",
                (new_name, name, IN_QUARANTINE)).rowcount == 1

        return await self._run(rename)

    async def record_findings(self, name: str, findings: list[dict[str, Any]]) -> None:
        await self._run(lambda connection: connection.execute(
            "UPDATE files SET findings_json = ? WHERE name = ?", (_as_json(findings), name)))

    @staticmethod
    def _dqm_files_where(run: int | None, agent: str | None,
                         since: int | None) -> tuple[str, list[Any]]:
        """The sound DQM files in the data directory, optionally filtered. `+state` and
        `+location` keep SQLite off their index, which matches most of the catalog: it takes
        the run's, the agent's or the time's, or walks names in order."""
        clauses = ["+state = ?", "+location = ?", "instr(name, 'DQM') > 0"]
        params: list[Any] = [OK, IN_DATA_DIR]
        for clause, value in (("run = ?", run), ("agent = ?", agent), ("timestamp >= ?", since)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return " AND ".join(clauses), params

    async def dqm_file_names(self, *, run: int | None = None, agent: str | None = None,
                             since: int | None = None) -> list[str]:
        """The names of the sound DQM files in the data directory, sorted, optionally filtered:
        the name column alone, on the reader thread."""
        where, params = self._dqm_files_where(run, agent, since)
        query = f"SELECT name FROM files WHERE {where} ORDER BY name"
        return await self._read(
            lambda connection: [row[0] for row in connection.execute(query, params)])

    async def dqm_files(
        self, *, run: int | None = None, agent: str | None = None, since: int | None = None,
        after: str | None = None, limit: int,
    ) -> list[FileRecord]:
        """The rows (without objects) of at most `limit` sound DQM files named after `after`,
        sorted by name, optionally filtered; parsed on the reader thread."""
        where, params = self._dqm_files_where(run, agent, since)
        if after is not None:
            where += " AND name > ?"
            params.append(after)
        query = f"SELECT {_SUMMARY_COLUMNS} FROM files WHERE {where} ORDER BY name LIMIT ?"
        params.append(limit)
        return await self._read(lambda connection: [
            FileRecord.from_row(row) for row in connection.execute(query, params)])

    async def invalid_names(self) -> set[str]:
        """The names of the files found invalid (those of the quarantine): the state's index
        reads them without a scan of every file."""
        return await self._read(lambda connection: {
            name for (name,) in connection.execute(
                "SELECT name FROM files WHERE state = ?", (INVALID,))})

    async def all_names(self) -> set[str]:
        rows = await self._read(
            lambda connection: connection.execute("SELECT name FROM files").fetchall()
        )
        return {row["name"] for row in rows}

    async def pending(self, limit: int) -> list[FileRecord]:
        """Files stored but not yet inspected (oldest first): work a restart must finish."""
        return await self._records("state = ? ORDER BY received_at LIMIT ?", (PENDING, limit))
