"""Agents' activity as the status page judges it: usual intervals, silence."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pendulum

from dqm_daemon import activity, catalog
from dqm_daemon.settings import Settings
from dqm_daemon.status import agent_silence

START = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
EVER = ""  # an agents board since the beginning


def _record(connection: sqlite3.Connection, agent: str, run: int, name: str, data_status: int,
            at: datetime, sent: datetime | None = None) -> None:
    """As the catalog adds an uploaded file: its row, then its activity (`sent`: the agent's
    timeStamp, by default when it arrived)."""
    timestamp = int((sent or at).timestamp())
    connection.execute(
        "INSERT INTO files (name, location, size, sha256, agent, run, timestamp, data_status,"
        " received_at, uploader, state) VALUES (?, 'data', 1, ?, ?, ?, ?, ?, ?, 'u', 'ok')",
        (name, name, agent, run, timestamp, data_status, at.isoformat()))
    activity.record_upload(connection, agent, run, name, at.isoformat(), EVER)
    activity.record_data_status(connection, agent, run, data_status, at.isoformat(), timestamp)


def _send(connection: sqlite3.Connection, run: int, at: datetime, data_status: int = 0,
          sent: datetime | None = None) -> None:
    _record(connection, "EMC", run, f"EMC-{run}-{at:%H%M%S}", data_status, at, sent)


def test_the_pause_between_runs_is_not_an_interval_and_silence_is_seen_early():
    """An agent sending every minute keeps its one-minute interval across a ten-hour pause
    between runs, so it counts as silent minutes (not hours) after it stops in the next run."""
    connection = _catalog()
    for minute in range(6):
        _send(connection, 1, START + timedelta(minutes=minute), 1 if minute == 0 else 0)
    _send(connection, 1, START + timedelta(minutes=6), activity.END_OF_DATA)
    run_2 = START + timedelta(hours=10)
    _send(connection, 2, run_2, activity.START_OF_DATA)
    _send(connection, 2, run_2 + timedelta(minutes=1))
    (agent,) = activity.agents_board(connection, EVER)
    assert 55 <= agent["interval_seconds"] <= 65
    settings = Settings()  # silent after 3 intervals, at least 120 s
    later = pendulum.instance(run_2 + timedelta(minutes=1, seconds=200))
    assert agent_silence(agent, settings, later)["silent"] is True
    sooner = pendulum.instance(run_2 + timedelta(minutes=1, seconds=100))
    assert agent_silence(agent, settings, sooner)["silent"] is False


def _board(connection: sqlite3.Connection) -> dict:
    (agent,) = activity.agents_board(connection, EVER)
    return agent


def _catalog() -> sqlite3.Connection:
    connection = sqlite3.connect(":memory:")
    connection.row_factory = sqlite3.Row
    connection.executescript(catalog._SCHEMA + activity.SCHEMA)
    return connection


def test_a_late_file_of_an_earlier_run_leaves_the_agent_in_its_run():
    """Retried files of run 1 arriving while the agent sends run 2 leave it in run 2, where its
    silence is still seen (they neither move it back nor restart its silence clock)."""
    connection = _catalog()
    _send(connection, 1, START, activity.START_OF_DATA)
    _send(connection, 1, START + timedelta(minutes=1), activity.END_OF_DATA)
    _send(connection, 2, START + timedelta(minutes=2), activity.START_OF_DATA)
    _send(connection, 2, START + timedelta(minutes=3))
    for minute in (24, 28):  # late retries, while run 2 has been quiet for 25 minutes
        _send(connection, 1, START + timedelta(minutes=minute))
    agent = _board(connection)
    assert (agent["last_run"], agent["last_file"]) == (2, "EMC-2-080300")
    later = pendulum.instance(START + timedelta(minutes=29))
    assert agent_silence(agent, Settings(), later)["silent"] is True
    _send(connection, 3, START + timedelta(minutes=31), activity.START_OF_DATA)  # a new run
    assert _board(connection)["last_run"] == 3


def test_a_start_of_data_after_its_end_opens_the_run_again():
    """An agent restarted within a run (start, end, then start again) is in the run again,
    watched for silence, until its next end of data."""
    connection = _catalog()
    for minute, data_status in enumerate((1, 0, 2, 1, 0)):
        _send(connection, 5, START + timedelta(minutes=minute), data_status)
    agent = _board(connection)
    assert agent["ended_at"] is None and agent["started_at"] == (
        START + timedelta(minutes=3)).isoformat()
    later = pendulum.instance(START + timedelta(minutes=30))
    watched = agent_silence(agent, Settings(), later)
    assert watched["in_run"] is True and watched["silent"] is True
    _send(connection, 5, START + timedelta(minutes=31), activity.END_OF_DATA)
    assert _board(connection)["ended_at"] is not None


def test_recent_runs_keep_every_run_and_end_only_when_every_agent_ended():
    """A run of many agents does not push an earlier run off the list, and a run shows its end
    of data only once every agent that sent in it has ended."""
    connection = _catalog()
    at = START
    for agent in ("A", "B", "C"):
        _record(connection, agent, 500, f"{agent}-500", 1, at)
    for index in range(241):
        at += timedelta(seconds=1)
        _record(connection, f"X{index}", 600, f"X{index}-600", 1, at)
    _record(connection, "X0", 600, "X0-600-end", 2, at + timedelta(seconds=1))
    _record(connection, "Y", 600, "Y-600", 0, at)  # sends in the run, never started it
    runs = {row["run"]: row for row in activity.recent_runs(connection, 12)}
    assert set(runs) == {500, 600}
    assert runs[600]["ended_at"] is None and runs[600]["agents_ended"] == 1
    # "1 of 241 agents": of those that started it (as the status page words it)
    assert (runs[600]["agents_started"], runs[600]["agent_count"]) == (241, 242)
    for agent in ("A", "B", "C"):
        _record(connection, agent, 500, f"{agent}-500-end", 2, at + timedelta(seconds=2))
    runs = {row["run"]: row for row in activity.recent_runs(connection, 12)}
    assert runs[500]["ended_at"] is not None and runs[500]["agents_ended"] == 3


def test_a_late_file_of_an_earlier_run_new_here_leaves_the_agent_in_its_run():
    """A late file of run 1 that is the first of run 1 here does not make run 1 the agent's
    run: it stays in run 2, and sending run 2 it is not silent."""
    connection = _catalog()
    _send(connection, 2, START, activity.START_OF_DATA)
    _send(connection, 1, START + timedelta(seconds=10))  # late, the only one of run 1 here
    for second in (20, 30, 40):
        _send(connection, 2, START + timedelta(seconds=second))
    agent = _board(connection)
    assert agent["last_run"] == 2
    soon = pendulum.instance(START + timedelta(seconds=45))
    assert agent_silence(agent, Settings(), soon)["silent"] is False


def test_a_start_of_data_arriving_after_its_end_does_not_open_the_run_again():
    """A start-of-data file retried and arriving after the run's end of data (it was sent
    before it) leaves the run ended, and the agent not watched."""
    connection = _catalog()
    _send(connection, 7, START + timedelta(minutes=1))
    _send(connection, 7, START + timedelta(minutes=2), activity.END_OF_DATA)
    _send(connection, 7, START + timedelta(minutes=3), activity.START_OF_DATA, sent=START)
    agent = _board(connection)
    assert agent["ended_at"] is not None
    later = pendulum.instance(START + timedelta(minutes=30))
    assert agent_silence(agent, Settings(), later)["in_run"] is False
    (run,) = activity.recent_runs(connection, 12)
    assert run["ended_at"] is not None


def test_an_end_of_data_arriving_after_the_runs_restart_does_not_end_it():
    """The agent ended its run, then restarted it; the end of data (sent before the new start)
    arrives or is checked only after that start: the run stays open, the agent watched."""
    connection = _catalog()
    _send(connection, 9, START, activity.START_OF_DATA)
    _send(connection, 9, START + timedelta(minutes=1))
    _send(connection, 9, START + timedelta(minutes=3), activity.START_OF_DATA)  # the restart
    _send(connection, 9, START + timedelta(minutes=4), activity.END_OF_DATA,
          sent=START + timedelta(minutes=2))  # the first end, late
    agent = _board(connection)
    assert agent["ended_at"] is None
    later = pendulum.instance(START + timedelta(minutes=60))
    assert agent_silence(agent, Settings(), later)["silent"] is True  # the restart went quiet
    _send(connection, 9, START + timedelta(minutes=61), activity.END_OF_DATA)
    assert _board(connection)["ended_at"] is not None


def test_the_agents_board_shows_the_agents_at_work():
    """Every agent name a client ever sent stays in the catalog; the board (the status page,
    /metrics) shows those heard from since its horizon, at most its limit, the latest heard."""
    connection = _catalog()
    for number in range(30):
        _record(connection, f"OLD{number:02}", 1, f"old-{number}", 0,
                START - timedelta(days=30, minutes=number))
    for number in range(5):
        _record(connection, f"NEW{number}", 2, f"new-{number}", 0, START + timedelta(minutes=number))
    horizon = (START - timedelta(days=7)).isoformat()
    assert [agent["agent"] for agent in activity.agents_board(connection, horizon)] == [
        "NEW0", "NEW1", "NEW2", "NEW3", "NEW4"]
    assert [agent["agent"] for agent in activity.agents_board(connection, horizon, 2)] == [
        "NEW3", "NEW4"]  # the latest heard, by name
    assert len(activity.agents_board(connection, EVER)) == 35


def test_an_agent_in_its_run_stays_on_a_full_board():
    """More agents at work than the board holds: one in its run (started, not ended), quiet
    for a while, is kept over agents heard from later but in no run: it may be silent."""
    connection = _catalog()
    _record(connection, "QUIET", 9, "quiet-1", activity.START_OF_DATA, START)
    for number in range(3):
        _record(connection, f"BUSY{number}", 9, f"busy-{number}", 0,
                START + timedelta(minutes=30 + number))
    assert [agent["agent"] for agent in activity.agents_board(connection, EVER, 2)] == [
        "BUSY2", "QUIET"]


def test_the_daemon_down_is_no_interval_of_the_agent():
    """An agent sending every minute while the daemon is down for half an hour: that pause is
    the daemon's, so its usual interval stays a minute (else it would count as silent only
    after an hour and a half, just after the restart)."""
    connection = _catalog()
    for minute in range(6):
        _send(connection, 1, START + timedelta(minutes=minute), 1 if minute == 0 else 0)
    (before,) = activity.agents_board(connection, EVER)
    restarted = START + timedelta(minutes=35)
    at = restarted + timedelta(seconds=5)
    activity.record_upload(connection, "EMC", 1, "after-restart", at.isoformat(),
                           restarted.isoformat())
    (after,) = activity.agents_board(connection, EVER)
    assert after["interval_seconds"] == before["interval_seconds"] == 60
    assert after["last_received_at"] == at.isoformat()


async def test_files_by_state_are_counted_as_rows_change(tmp_path):
    """/metrics reads how many files are in each state from counts the catalog keeps as rows
    are added, checked and removed (not by counting every row at each scrape), and a catalog
    from before those counts has its files counted once when opened."""
    from dqm_daemon.catalog import Catalog
    from dqm_daemon.ingest import new_record
    from dqm_daemon.naming import DQMHeaders

    path = tmp_path / "catalog.sqlite3"

    def counted(connection: sqlite3.Connection) -> dict[str, int]:
        actual = {"pending": 0, "ok": 0, "invalid": 0}
        for state, count in connection.execute("SELECT state, count(*) FROM files GROUP BY state"):
            actual[state] = count
        return actual

    catalog = Catalog(path)
    await catalog.open()
    for number in range(6):
        await catalog.add(new_record(f"f{number}.root", 1, f"sha{number}",
                                     DQMHeaders(number, 1, "EMC", 0), "u"))
    for number, state, location in ((0, "ok", "data"), (1, "ok", "data"),
                                    (2, "invalid", "quarantine"), (3, "invalid", "quarantine")):
        await catalog.record_inspection(f"f{number}.root", state=state, location=location,
                                        reason=None, received=None, objects_json=None,
                                        object_count=None, inspection_ms=1.0,
                                        inspected_at="2026-01-01T00:00:00Z")
    await catalog.forget_quarantined("f3.root")
    assert await catalog.view(activity.count_by_state) == {"pending": 2, "ok": 2, "invalid": 1}
    await catalog.close()
    with sqlite3.connect(path) as connection:  # as a catalog of an earlier version
        for trigger in ("insert", "delete", "update"):
            connection.execute(f"DROP TRIGGER file_states_on_{trigger}")
        connection.execute("DROP TABLE file_states")
        connection.execute("UPDATE files SET state = 'ok' WHERE name = 'f4.root'")
        expected = counted(connection)
    catalog = Catalog(path)
    await catalog.open()
    try:
        assert await catalog.view(activity.count_by_state) == expected == {
            "pending": 1, "ok": 3, "invalid": 1}
    finally:
        await catalog.close()
