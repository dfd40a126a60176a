"""What makes the receiver unhealthy: the reasons /healthz answers 503 with, and the ERROR
reasons of the status banner."""

from __future__ import annotations

import time

from aiohttp import web

from .appkeys import CATALOG, INSPECTION_QUEUE, INSPECTORS, RESUMABLE, SETTINGS, STORAGE
from .page_format import human_bytes

# The queue is stuck when it holds jobs and no inspection started or finished for this long
# beyond the inspection time limit.
STUCK_MARGIN_SECONDS = 30.0
# A fault of the catalog (its disk, its file) is reported this long after the latest one.
CATALOG_FAULT_SECONDS = 60.0


async def health_problems(app: web.Application) -> list[str]:
    settings, storage, queue = app[SETTINGS], app[STORAGE], app[INSPECTION_QUEUE]
    problems = []
    if not await storage.writable():
        problems.append("data directory not writable")
    if fault := app[CATALOG].recent_fault(CATALOG_FAULT_SECONDS):
        problems.append(f"catalog failing: {fault}")
    promised = app[RESUMABLE].reserved_bytes()
    if storage.free_bytes() - promised < settings.disk_reserve_bytes:
        # As uploads are refused: bytes promised to unfinished resumable uploads count as used.
        held = (f" ({len(app[RESUMABLE])} unfinished resumable uploads hold "
                f"{human_bytes(promised)})" if promised else "")
        problems.append(f"free disk below the reserve: uploads are refused{held}")
    workers = len(app[INSPECTORS])
    if queue.running_workers < workers:
        problems.append(f"inspection workers down: {queue.running_workers} of {workers} running")
    if queue.child_start_failure:
        problems.append(f"inspection child cannot start: {queue.child_start_failure}")
    idle_for = time.monotonic() - queue.last_progress_monotonic
    if queue.depth > 0 and idle_for > settings.inspection_time_limit_seconds + STUCK_MARGIN_SECONDS:
        waiting = f"{queue.depth} file{'s' if queue.depth > 1 else ''} waiting"
        problems.append(f"inspection queue stuck: {waiting}, no progress for {idle_for:.0f} s")
    return problems
