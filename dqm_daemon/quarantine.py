"""Quarantine retention: files that were not sound ROOT (their agents were answered 400) are
kept for experts for `quarantine_retention_days`, then removed with their catalog rows, so a
stream of broken uploads cannot fill the disk over months. Files in the quarantine without a
row (left by a crash part way through setting one aside, or kept beside as `.stray-…`) go
once they are as old."""

from __future__ import annotations

import asyncio
import datetime

import structlog

from .catalog import Catalog, iso_utc
from .ingest import Ingest

log = structlog.get_logger(__name__)

# How often the quarantine is swept, and how many files at most each time.
SWEEP_SECONDS = 3600.0
SWEEP_BATCH = 1000


async def remove_expired(catalog: Catalog, ingest: Ingest, retention_days: float,
                         now: datetime.datetime) -> int:
    """Remove the quarantined files (and rows) that arrived more than `retention_days` before
    `now`; returns how many of the batch looked at were removed."""
    if retention_days <= 0:
        return 0
    cutoff = now - datetime.timedelta(days=retention_days)
    before = iso_utc(cutoff)
    removed = 0
    for name in await catalog.quarantined_before(before, SWEEP_BATCH):
        try:
            removed += await ingest.remove_quarantined(name, before)
        except OSError as exc:  # one that cannot be removed must not stop the others
            log.warning("quarantined_file_not_removed", file=name, error=str(exc))
    untracked = 0
    for name in await ingest.untracked_quarantined_files():
        try:
            untracked += await ingest.remove_untracked_quarantined(name, cutoff.timestamp())
        except OSError as exc:
            log.warning("quarantined_file_not_removed", file=name, error=str(exc))
    if removed or untracked:
        log.info("quarantine_expired", removed=removed, untracked=untracked,
                 retention_days=retention_days)
    return removed


async def run_sweeper(catalog: Catalog, ingest: Ingest, retention_days: float) -> None:
    while True:
        try:
            while await remove_expired(catalog, ingest, retention_days,
                                       datetime.datetime.now(datetime.UTC)) == SWEEP_BATCH:
                pass  # a backlog: on at once
        except Exception:  # a disk or catalog fault: tried again at the next sweep
            log.exception("quarantine_sweep_failed")
        await asyncio.sleep(SWEEP_SECONDS)
