"""GET /healthz: answers once the daemon accepts uploads (no token)."""

from __future__ import annotations

import time

from aiohttp import web

from .. import __version__
from ..appkeys import INSPECTION_QUEUE, STARTED_MONOTONIC, UPLOADS


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - app[STARTED_MONOTONIC], 1),
            "uploads_in_progress": len(app[UPLOADS]),
            "inspection_queue_depth": app[INSPECTION_QUEUE].depth,
        }
    )
