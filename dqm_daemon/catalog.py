"""The catalog: one SQLite database (WAL) in the data directory recording every stored file.

All SQLite work runs on one dedicated thread, so the event loop never waits on the disk and the
connection is only ever used from the thread that owns it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PENDING, OK, INVALID = "pending", "ok", "invalid"
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
    received_json TEXT                     -- top-level objects, as the Overwatch receiver reported
);
CREATE INDEX IF NOT EXISTS files_by_run ON files (run, agent, timestamp);
CREATE INDEX IF NOT EXISTS files_by_agent ON files (agent, timestamp);
CREATE INDEX IF NOT EXISTS files_by_time ON files (timestamp);
CREATE INDEX IF NOT EXISTS files_by_state ON files (state);
"""


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

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> FileRecord:
        values = {key: row[key] for key in row.keys() if key != "received_json"}
        received_json = row["received_json"]
        values["received"] = json.loads(received_json) if received_json else None
        return cls(**values)


class Catalog:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog")
        self._connection: sqlite3.Connection | None = None

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        assert self._connection is not None, "catalog is not open"
        connection = self._connection
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, connection)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a row is on disk when the upload is acknowledged, like the file itself.
            connection.execute("PRAGMA synchronous=FULL")
            connection.executescript(_SCHEMA)
            return connection

        self._connection = await asyncio.get_running_loop().run_in_executor(self._thread, connect)

    async def close(self) -> None:
        if self._connection is not None:
            await self._run(lambda connection: connection.close())
            self._connection = None
        self._thread.shutdown(wait=True)

    async def add(self, record: FileRecord) -> None:
        row = dataclasses.asdict(record)
        received = row.pop("received")
        row["received_json"] = json.dumps(received) if received is not None else None
        columns = ", ".join(row)
        placeholders = ", ".join(f":{key}" for key in row)
        await self._run(
            lambda connection: connection.execute(
                f"INSERT INTO files ({columns}) VALUES ({placeholders})", row
            )
        )

    async def get(self, name: str) -> FileRecord | None:
        def fetch(connection: sqlite3.Connection) -> FileRecord | None:
            row = connection.execute("SELECT * FROM files WHERE name = ?", (name,)).fetchone()
            return FileRecord.from_row(row) if row else None

        return await self._run(fetch)

    async def record_inspection(
        self,
        name: str,
        *,
        state: str,
        location: str,
        reason: str | None,
        received: dict[str, str] | None,
    ) -> None:
        received_json = json.dumps(received) if received is not None else None
        await self._run(
            lambda connection: connection.execute(
                "UPDATE files SET state = ?, location = ?, reason = ?, received_json = ?"
                " WHERE name = ?",
                (state, location, reason, received_json, name),
            )
        )

    async def dqm_file_names(
        self, *, run: int | None = None, agent: str | None = None, since: int | None = None
    ) -> list[str]:
        """Names of the sound DQM files in the data directory, sorted, optionally filtered."""
        clauses = ["state = ?", "location = ?", "instr(name, 'DQM') > 0"]
        params: list[Any] = [OK, IN_DATA_DIR]
        for clause, value in (("run = ?", run), ("agent = ?", agent), ("timestamp >= ?", since)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        query = f"SELECT name FROM files WHERE {' AND '.join(clauses)} ORDER BY name"
        rows = await self._run(lambda connection: connection.execute(query, params).fetchall())
        return [row["name"] for row in rows]

    async def all_names(self) -> set[str]:
        rows = await self._run(
            lambda connection: connection.execute("SELECT name FROM files").fetchall()
        )
        return {row["name"] for row in rows}

    async def pending(self) -> list[FileRecord]:
        """Files stored but not yet inspected (oldest first): work a restart must finish."""
        rows = await self._run(
            lambda connection: connection.execute(
                "SELECT * FROM files WHERE state = ? ORDER BY received_at", (PENDING,)
            ).fetchall()
        )
        return [FileRecord.from_row(row) for row in rows]
