"""The state of the receiver at a glance: what the status page and /status.json show.

Built from the catalog (bounded, indexed queries) and the daemon's live state (uploads in
progress, the inspection queue), as plain JSON-able data; the page only formats it.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from aiohttp import web

from . import __version__, activity
from .appkeys import (
    ANALYST,
    CATALOG,
    INSPECTION_QUEUE,
    INSPECTORS,
    RESUMABLE,
    SETTINGS,
    STARTED_MONOTONIC,
    STORAGE,
    UPLOADS,
)
from .catalog import INVALID, iso_utc
from .health_checks import health_problems
from .page_format import duration, human_bytes
from .settings import Settings

OK_LEVEL, WARNING_LEVEL, ERROR_LEVEL = "OK", "WARNING", "ERROR"
LATEST_FILES = 25
RECENT_RUNS = 12
INVALID_WINDOW_SECONDS = 3600
# An inspection backlog whose oldest file waits longer than this is reported too.
BACKLOG_AGE_WARNING_SECONDS = 600


# The standard library, not pendulum, on these paths: a status view parses a time per agent and
# per file shown, and the page is polled under load.
def _seconds_since(iso_time: str | None, now: datetime.datetime) -> float | None:
    if iso_time is None:
        return None
    return (now - datetime.datetime.fromisoformat(iso_time)).total_seconds()


def agents_since(now: datetime.datetime) -> str:
    """The agents board's horizon: agents heard from since then are shown."""
    return iso_utc(now - datetime.timedelta(days=activity.BOARD_AGENT_DAYS))


def agent_silence(agent: dict[str, Any], settings: Settings, now: datetime.datetime) -> dict:
    """Is this agent silent: it started its run (dataStatus 1), has not ended it (dataStatus 2),
    and has sent nothing for several of its usual intervals?"""
    interval = agent["interval_seconds"] or settings.default_agent_interval_seconds
    quiet_for = _seconds_since(agent["last_received_at"], now) or 0.0
    in_run = agent["started_at"] is not None and agent["ended_at"] is None
    silent_after = max(settings.silent_after_intervals * interval, settings.silent_minimum_seconds)
    return {**agent, "in_run": in_run, "quiet_seconds": quiet_for,
            "silent_after_seconds": silent_after, "silent": in_run and quiet_for > silent_after}


def _banner(report: dict[str, Any], settings: Settings,
            errors: list[str]) -> tuple[str, list[str]]:
    """ERROR for what makes /healthz fail, WARNING for what the crew should look at."""
    warnings = []
    disk = report["disk"]
    available = disk["free_bytes"] - disk["promised_bytes"]
    if settings.disk_reserve_bytes <= available < 2 * settings.disk_reserve_bytes:
        promised = (f", {human_bytes(disk['promised_bytes'])} of it promised to unfinished "
                    "resumable uploads" if disk["promised_bytes"] else "")
        warnings.append(f"free disk low (under twice the reserve){promised}")
    inspection = report["inspection"]
    if inspection["unreadable_files"]:
        warnings.append(f"{inspection['unreadable_files']} cataloged file(s) cannot be read "
                        "from the disk (gone, or I/O errors; see the log's file_unreadable): "
                        "they stay pending")
    if (inspection["pending_files"] or 0) > settings.inspection_backlog_warning:
        warnings.append(f"inspection backlog: {inspection['pending_files']} files waiting")
    elif (inspection["oldest_pending_seconds"] or 0) > BACKLOG_AGE_WARNING_SECONDS:
        warnings.append("inspection backlog: a file has waited over "
                        f"{BACKLOG_AGE_WARNING_SECONDS // 60} min")
    for agent in report["agents"]:
        if agent["silent"]:
            warnings.append(f"agent {agent['agent']} silent in run {agent['last_run']} for "
                            f"{duration(agent['quiet_seconds'])}")
    if report["invalid_last_hour"]:
        warnings.append(f"{report['invalid_last_hour']} invalid file(s) in the last hour")
    level = ERROR_LEVEL if errors else WARNING_LEVEL if warnings else OK_LEVEL
    return level, errors + warnings


async def status_report(app: web.Application) -> dict[str, Any]:
    settings, catalog = app[SETTINGS], app[CATALOG]
    now = datetime.datetime.now(datetime.UTC)
    invalid_since = iso_utc(now - datetime.timedelta(seconds=INVALID_WINDOW_SECONDS))
    snapshot = await catalog.status_snapshot(LATEST_FILES, RECENT_RUNS, invalid_since,
                                             agents_since(now))
    catalog_readable = snapshot is not None
    if snapshot is None:  # the live state still shows; the banner says what failed
        snapshot = dict.fromkeys(("pending_files", "oldest_pending_at", "awaiting_analysis",
                                  "invalid_since"))
        snapshot.update(latest_files=[], agents=[], runs=[])
    queue = app[INSPECTION_QUEUE]
    report: dict[str, Any] = {
        "generated_at": iso_utc(now),
        "catalog_readable": catalog_readable,
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - app[STARTED_MONOTONIC]),
        "disk": {"free_bytes": app[STORAGE].free_bytes(),
                 # promised to unfinished resumable uploads: counted as used, as uploads are
                 "promised_bytes": app[RESUMABLE].reserved_bytes(),
                 "reserve_bytes": settings.disk_reserve_bytes},
        "uploads": [
            {"agent": upload.agent, "run": upload.run, "uploader": upload.uploader,
             "received_bytes": upload.received_bytes,
             "bytes_per_second": round(upload.bytes_per_second),
             "seconds": round(time.monotonic() - upload.started_monotonic, 1)}
            for upload in app[UPLOADS].snapshot()
        ],
        "inspection": {
            "queue_depth": queue.depth,
            "pending_files": snapshot["pending_files"],
            "oldest_pending_at": snapshot["oldest_pending_at"],
            "oldest_pending_seconds": _seconds_since(snapshot["oldest_pending_at"], now),
            "workers": len(app[INSPECTORS]),
            "workers_running": queue.running_workers,
            "workers_busy": queue.busy_workers,
            "child_start_failure": queue.child_start_failure,
            "unreadable_files": len(queue.unreadable),
            "awaiting_analysis": snapshot["awaiting_analysis"],
            "analyst_busy": app[ANALYST].busy,
        },
        "latest_files": [file_summary(record) for record in snapshot["latest_files"]],
        "agents": [agent_silence(agent, settings, now) for agent in snapshot["agents"]],
        "runs": snapshot["runs"],
        "invalid_last_hour": snapshot["invalid_since"],
    }
    report["level"], report["reasons"] = _banner(report, settings, await health_problems(app))
    return report


def file_summary(record: Any) -> dict[str, Any]:
    """A file's row in a list (the latest files, a run's files): its findings as a count and
    their kinds; each list of objects is its own page's (a run of 5,000 files made 34 MB)."""
    row = record.as_dict()
    row.pop("objects", None)
    row.pop("received", None)
    row.pop("findings", None)
    row["findings_count"] = len(record.findings or [])
    row["finding_kinds"] = sorted({finding["kind"] for finding in record.findings or []})
    row["is_invalid"] = record.state == INVALID
    return row
