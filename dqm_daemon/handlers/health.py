"""GET /healthz (no token): 200 when healthy, 503 with the reasons when not;
GET /metrics: Prometheus text format."""

from __future__ import annotations

import datetime
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__, activity
from ..appkeys import (
    CATALOG,
    INSPECTION_QUEUE,
    METRICS,
    STARTED_MONOTONIC,
    STORAGE,
    UPLOADS,
)
from ..health_checks import health_problems
from ..status import agents_since


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    problems = await health_problems(app)
    return web.json_response(
        {
            "status": "unhealthy" if problems else "ok",
            "problems": problems,
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - app[STARTED_MONOTONIC], 1),
            "uploads_in_progress": len(app[UPLOADS]),
            "inspection_queue_depth": app[INSPECTION_QUEUE].depth,
        },
        status=503 if problems else 200,
    )


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    registry = app[METRICS]
    registry.queue_depth.set(app[INSPECTION_QUEUE].depth)
    registry.uploads_in_flight.set(len(app[UPLOADS]))
    registry.free_disk.set(app[STORAGE].free_bytes())
    # When the catalog cannot be read, its gauges keep their last values: /healthz says why.
    for state, count in (await app[CATALOG].view_if_readable(activity.count_by_state)
                         or {}).items():
        registry.files.labels(state).set(count)
    latest: dict[str, float] = {}  # by label: agents past the label limit share one
    board = await app[CATALOG].view_if_readable(activity.agents_board,
                                                agents_since(datetime.datetime.now(datetime.UTC))) or []
    # The latest heard first: after a restart, labels go to the agents at work.
    for agent in sorted(board, key=lambda agent: agent["last_received_at"], reverse=True):
        label = registry.agent_label(agent["agent"])
        latest[label] = max(latest.get(label, 0.0),
                            activity.unix_seconds(agent["last_received_at"]))
    for label, seconds in latest.items():
        registry.last_upload.labels(label).set(seconds)
    body = generate_latest(registry.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
