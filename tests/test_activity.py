"""Agents' activity as the status page judges it: usual intervals, silence."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pendulum

from dqm_daemon import activity
from dqm_daemon.settings import Settings
from dqm_daemon.status import agent_silence

START = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def _send(connection: sqlite3.Connection, run: int, at: datetime, data_status: int = 0) -> None:
    activity.record_upload(connection, "EMC", run, f"EMC-{run}-{at:%H%M%S}", data_status,
                           at.isoformat())


def test_the_pause_between_runs_is_not_an_interval_and_silence_is_seen_early():
    """An agent sending every minute keeps its one-minute interval across a ten-hour pause
    between runs, so it counts as silent minutes (not hours) after it stops in the next run."""
    connection = sqlite3.connect(":memory:")
    connection.row_factory = sqlite3.Row
    connection.executescript(activity.SCHEMA)
    for minute in range(6):
        _send(connection, 1, START + timedelta(minutes=minute), 1 if minute == 0 else 0)
    _send(connection, 1, START + timedelta(minutes=6), activity.END_OF_DATA)
    run_2 = START + timedelta(hours=10)
    _send(connection, 2, run_2, activity.START_OF_DATA)
    _send(connection, 2, run_2 + timedelta(minutes=1))
    (agent,) = activity.agents_board(connection)
    assert 55 <= agent["interval_seconds"] <= 65
    settings = Settings()  # silent after 3 intervals, at least 120 s
    later = pendulum.instance(run_2 + timedelta(minutes=1, seconds=200))
    assert agent_silence(agent, settings, later)["silent"] is True
    sooner = pendulum.instance(run_2 + timedelta(minutes=1, seconds=100))
    assert agent_silence(agent, settings, sooner)["silent"] is False
