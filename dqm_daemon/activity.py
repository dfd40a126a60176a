"""Who sends what: per-agent and per-run activity kept beside the files in the catalog database,
updated with every upload, and the bounded, indexed queries the status pages are built from.

Every function here takes the catalog's connection and runs on the catalog's thread.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_runs (
    agent             TEXT NOT NULL,
    run               INTEGER NOT NULL,
    files             INTEGER NOT NULL,
    first_received_at TEXT NOT NULL,
    last_received_at  TEXT NOT NULL,
    last_file         TEXT NOT NULL,
    started_at        TEXT,       -- when its dataStatus 1 (start of data) file arrived
    ended_at          TEXT,       -- when its dataStatus 2 (end of data) file arrived
    PRIMARY KEY (agent, run)
);
CREATE INDEX IF NOT EXISTS agent_runs_by_time ON agent_runs (last_received_at);
CREATE INDEX IF NOT EXISTS agent_runs_by_run ON agent_runs (run);
CREATE TABLE IF NOT EXISTS agents (
    agent             TEXT PRIMARY KEY,
    last_run          INTEGER NOT NULL,
    last_file         TEXT NOT NULL,
    last_received_at  TEXT NOT NULL,
    files             INTEGER NOT NULL,
    interval_seconds  REAL        -- usual time between its files (moving average)
);
CREATE INDEX IF NOT EXISTS agents_by_time ON agents (last_received_at);
-- How many files are in each state, kept by the catalog itself as rows change: /metrics reads
-- them at every scrape, and counting millions of rows took 0.2 s of the reader's time.
CREATE TABLE IF NOT EXISTS file_states (
    state TEXT PRIMARY KEY,
    files INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS file_states_on_insert AFTER INSERT ON files BEGIN
    INSERT INTO file_states VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET files = files + 1;
END;
CREATE TRIGGER IF NOT EXISTS file_states_on_delete AFTER DELETE ON files BEGIN
    UPDATE file_states SET files = files - 1 WHERE state = OLD.state;
END;
CREATE TRIGGER IF NOT EXISTS file_states_on_update AFTER UPDATE OF state ON files
    WHEN OLD.state IS NOT NEW.state BEGIN
    UPDATE file_states SET files = files - 1 WHERE state = OLD.state;
    INSERT INTO file_states VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET files = files + 1;
END;
"""

START_OF_DATA, END_OF_DATA = 1, 2
# Weight of the newest interval in the moving average of an agent's usual interval.
INTERVAL_SMOOTHING = 0.3
# Queries never return more rows than this.
MAX_BOARD_AGENTS = 200
# The agents board shows agents heard from within this many days.
BOARD_AGENT_DAYS = 7


def _seconds_between(earlier_iso: str, later_iso: str) -> float:
    return (datetime.fromisoformat(later_iso) - datetime.fromisoformat(earlier_iso)).total_seconds()


def record_upload(connection: sqlite3.Connection, agent: str, run: int, name: str,
                  received_at: str, daemon_up_since: str) -> None:
    """Fold one received file into its agent's and its run's activity (the file's own row is
    already in `files`). Its start or end of data counts once its check finds it sound
    (`record_data_status`): a broken file neither opens nor closes a run. A pause since the
    agent's previous file that spans `daemon_up_since` (the daemon was down) is not one of its
    intervals."""
    connection.execute(
        "INSERT INTO agent_runs VALUES (?, ?, 1, ?, ?, ?, NULL, NULL)"
        " ON CONFLICT (agent, run) DO UPDATE SET files = files + 1,"
        " last_received_at = excluded.last_received_at, last_file = excluded.last_file",
        (agent, run, received_at, received_at, name),
    )
    previous = connection.execute(
        "SELECT last_received_at, last_run, last_file, interval_seconds FROM agents"
        " WHERE agent = ?",
        (agent,),
    ).fetchone()
    # The agent's current run: the highest it has sent (run numbers only grow). A late file
    # of a run it had left (a retry) leaves it in its current run, still watched for silence.
    current_run, current_file, current_received_at = run, name, received_at
    interval = None
    if previous is not None:
        interval = old = previous["interval_seconds"]
        # The pause between two runs is no interval of sending: an agent's usual interval
        # comes from files of one run only (else it would not count as silent for hours).
        if previous["last_run"] == run and previous["last_received_at"] >= daemon_up_since:
            latest = max(_seconds_between(previous["last_received_at"], received_at), 0.0)
            interval = latest if old is None else old + INTERVAL_SMOOTHING * (latest - old)
        elif run < previous["last_run"]:  # its current run's last file stays its last word
            current_run, current_file, current_received_at = (
                previous["last_run"], previous["last_file"], previous["last_received_at"])
    connection.execute(
        "INSERT INTO agents VALUES (?, ?, ?, ?, 1, ?)"
        " ON CONFLICT (agent) DO UPDATE SET last_run = excluded.last_run,"
        " last_file = excluded.last_file, last_received_at = excluded.last_received_at,"
        " files = files + 1, interval_seconds = excluded.interval_seconds",
        (agent, current_run, current_file, current_received_at, interval),
    )


def record_data_status(connection: sqlite3.Connection, agent: str, run: int,
                       data_status: int, received_at: str, timestamp: int) -> None:
    """A sound file's start or end of data (dataStatus 1 or 2; `received_at`: when it arrived,
    `timestamp`: the agent's timeStamp). A start of data sent after the run's (sound) end of
    data opens the run again (the agent restarted): it is watched for silence again. One sent
    before it (a retry arriving late) does not. Likewise an end of data sent before the run's
    latest start (it arrived, or was checked, after the restart's start) ends nothing."""
    if data_status == END_OF_DATA:
        (start_sent,) = connection.execute(
            "SELECT max(timestamp) FROM files WHERE run = ? AND agent = ? AND data_status = ?"
            " AND state = 'ok'", (run, agent, START_OF_DATA)).fetchone()
        if start_sent is None or timestamp >= start_sent:
            connection.execute("UPDATE agent_runs SET ended_at = ? WHERE agent = ? AND run = ?",
                               (received_at, agent, run))
    elif data_status == START_OF_DATA:
        (end_sent,) = connection.execute(
            "SELECT max(timestamp) FROM files WHERE run = ? AND agent = ? AND data_status = ?"
            " AND state = 'ok'", (run, agent, END_OF_DATA)).fetchone()
        reopens = end_sent is not None and timestamp > end_sent
        connection.execute(
            "UPDATE agent_runs SET started_at = CASE WHEN ? THEN ? ELSE coalesce(started_at, ?)"
            " END, ended_at = CASE WHEN ? THEN NULL ELSE ended_at END WHERE agent = ? AND run = ?",
            (reopens, received_at, received_at, reopens, agent, run))


def agents_board(connection: sqlite3.Connection, since_iso: str,
                 limit: int = MAX_BOARD_AGENTS) -> list[dict[str, Any]]:
    """The agents heard from since `since_iso` (at most `limit`: those in a run first, then
    the latest heard), by name, each with its latest run's start and end. Every name a client
    ever sent stays in the catalog; the pages and /metrics show the ones at work. An agent in
    its run is never crowded out by others sending more lately: the quietest of those is the
    one the crew must see (silent)."""
    rows = connection.execute(
        "SELECT a.agent, a.last_run, a.last_file, a.last_received_at, a.files,"
        " a.interval_seconds, r.started_at, r.ended_at, r.files AS run_files"
        " FROM agents a LEFT JOIN agent_runs r ON r.agent = a.agent AND r.run = a.last_run"
        " WHERE a.last_received_at >= ?"
        " ORDER BY (r.started_at IS NOT NULL AND r.ended_at IS NULL) DESC,"
        " a.last_received_at DESC LIMIT ?",
        (since_iso, limit),
    ).fetchall()
    return sorted((dict(row) for row in rows), key=lambda agent: agent["agent"])


def recent_runs(connection: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    """The `limit` runs with the most recent activity, newest first. A run's end of data is
    its last agent's, once every agent that started in it has ended (`agents_ended` of
    `agents_started` says how far it is; `agent_count`: every agent that sent in it)."""
    if limit <= 0:
        return []
    latest: list[int] = []  # walking the time index back stops at the `limit`-th run
    for (run,) in connection.execute(
            "SELECT run FROM agent_runs ORDER BY last_received_at DESC"):
        if run not in latest:
            latest.append(run)
            if len(latest) == limit:
                break
    rows = connection.execute(
        "SELECT run, group_concat(agent, ' ') AS agents, count(*) AS agent_count,"
        " sum(files) AS files, min(first_received_at) AS first_received_at,"
        " max(last_received_at) AS last_received_at, min(started_at) AS started_at,"
        " CASE WHEN count(ended_at) > 0 AND count(started_at IS NOT NULL AND ended_at IS NULL"
        "   OR NULL) = 0 THEN max(ended_at) END AS ended_at,"
        " count(started_at IS NOT NULL AND ended_at IS NOT NULL OR NULL) AS agents_ended,"
        " count(started_at) AS agents_started"
        f" FROM agent_runs WHERE run IN ({', '.join('?' * len(latest))})"
        " GROUP BY run ORDER BY max(last_received_at) DESC",
        latest,
    ).fetchall()
    return [dict(row) for row in rows]


def run_agents(connection: sqlite3.Connection, run: int) -> list[dict[str, Any]]:
    rows = connection.execute(
        "SELECT * FROM agent_runs WHERE run = ? ORDER BY agent", (run,)
    ).fetchall()
    return [dict(row) for row in rows]


def count_invalid_since(connection: sqlite3.Connection, since_iso: str) -> int:
    return connection.execute(
        "SELECT count(*) FROM files WHERE state = 'invalid' AND received_at >= ?", (since_iso,)
    ).fetchone()[0]


def count_states_once(connection: sqlite3.Connection) -> None:
    """A catalog from before `file_states` (its triggers keep it from then on): its files are
    counted now, once."""
    if connection.execute("SELECT 1 FROM file_states LIMIT 1").fetchone() is None:
        connection.execute(
            "INSERT INTO file_states SELECT state, count(*) FROM files GROUP BY state")


def count_by_state(connection: sqlite3.Connection) -> dict[str, int]:
    counts = {"pending": 0, "ok": 0, "invalid": 0}
    for state, count in connection.execute("SELECT state, files FROM file_states"):
        counts[state] = count
    return counts


def unix_seconds(iso_time: str) -> float:
    return datetime.fromisoformat(iso_time).timestamp()


def count_pending(connection: sqlite3.Connection) -> tuple[int, str | None]:
    """How many files wait for inspection, and since when the oldest has waited."""
    row = connection.execute(
        "SELECT count(*), min(received_at) FROM files WHERE state = 'pending'"
    ).fetchone()
    return row[0], row[1]
