"""The shift crew's pages, each with a JSON twin built from the same data:
/status (+ .json), /files/{filename} (+ .json), /runs/{run} (+ .json)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from .. import activity
from ..appkeys import CATALOG, PAGE_THREAD, PREVIEWER, SETTINGS
from ..catalog import IN_DATA_DIR, OK, PENDING
from ..middlewares import LoggedFileResponse, is_token_probe
from ..naming import MAX_RUN_NUMBER, bounded_integer
from ..status import file_summary, status_report

DataBuilder = Callable[[web.Request], Awaitable[dict[str, Any]]]
# Histograms drawn on a file's page (interpreted, 1D or 2D) are of these classes.
PREVIEWED_CLASSES = ("TH1", "TH2", "TProfile")
DEFAULT_PREVIEWS, MAX_PREVIEWS = 24, 200
# A run page lists its latest files up to this many (by agent and time).
MAX_RUN_FILES = 5000
# Objects a file page lists (a file may hold 100,000): the rest are in /rest/api/files/X/info.
MAX_PAGE_OBJECTS = 2000


async def status_data(request: web.Request) -> dict[str, Any]:
    return await status_report(request.app)


async def file_data(request: web.Request) -> dict[str, Any]:
    name = request.match_info["filename"]
    wanted = min(bounded_integer(request.query.get("previews", str(DEFAULT_PREVIEWS)),
                                 "Query parameter previews", 2**31), MAX_PREVIEWS)
    excerpt = await request.app[CATALOG].objects_excerpt(name, MAX_PAGE_OBJECTS, wanted,
                                                         PREVIEWED_CLASSES)
    if excerpt is None:
        raise web.HTTPNotFound(text=f"No such file: {name}")
    record = excerpt.record
    previews = {}
    if (record.state == OK and record.location == IN_DATA_DIR and wanted > 0
            and excerpt.drawable_paths):
        previews = await request.app[PREVIEWER].previews(record, excerpt.drawable_paths)
    shown = record.as_dict()
    shown["objects"] = record.objects or []
    return {
        "file": shown,
        "object_count": excerpt.object_count,
        "info_url": f"/rest/api/files/{record.name}/info",
        # Nothing changes any more once checked and analysed: the page need not reload.
        "settled": record.state != PENDING and record.analysis != PENDING,
        "download_url": f"/rest/api/files/{record.name}" if record.location == IN_DATA_DIR else None,
        "histograms": excerpt.drawable_count,
        "previews": previews,
    }


async def run_data(request: web.Request) -> dict[str, Any]:
    run = bounded_integer(request.match_info["run"], "Run number", MAX_RUN_NUMBER)
    catalog = request.app[CATALOG]
    files, truncated = await catalog.run_files(run, MAX_RUN_FILES)
    agents = await catalog.view(activity.run_agents, run)
    if not files and not agents:
        raise web.HTTPNotFound(text=f"No files for run {run}")
    return {
        "run": run,
        "agents": agents,
        "files": [file_summary(record) for record in files],
        "files_truncated": truncated,
        "pending": sum(record.state == PENDING for record in files),
    }


def page(template: str, build: DataBuilder) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An HTML page rendering `template` with the data of `build` (and the refresh period)."""

    async def handler(request: web.Request) -> web.Response:
        data = await build(request)
        refresh = None if data.get("settled") else request.app[SETTINGS].page_refresh_seconds
        context = {"data": data, "refresh_seconds": refresh}
        # Rendered in the page thread: a file page drawing many histograms takes a while, and
        # the event loop serves uploads and health checks meanwhile.
        text = await asyncio.get_running_loop().run_in_executor(
            request.app[PAGE_THREAD], aiohttp_jinja2.render_string, template, request, context)
        # A stray lone surrogate (a name of a file analysed by an older version) is a "?", not
        # a page that cannot be encoded (500).
        return web.Response(body=text.encode("utf-8", "replace"), content_type="text/html",
                            charset="utf-8")

    return handler


def twin(build: DataBuilder) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The page's JSON twin: exactly the data the page shows."""

    async def handler(request: web.Request) -> web.Response:
        data = await build(request)
        # Off the event loop (a large file's data takes a while), but not behind the page
        # thread, where a file page of many previews may be rendering: status polls go on.
        return web.json_response(text=await asyncio.to_thread(json.dumps, data))

    return handler


def static_files(directory: Path) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The pages' static files: the few found at start-up, served by name (never a path
    joined from the request); any other name is the API's JSON 404."""
    files = {path.name: path for path in directory.iterdir() if path.is_file()}

    async def handler(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound(text="No such static file")
        return LoggedFileResponse(path)

    return handler


async def root(request: web.Request) -> web.Response:
    """The bare address leads the crew to the status page. With a token (or a POST) it is the
    Overwatch receiver's token probe: past the token check, 400 "Not implemented"."""
    if is_token_probe(request):
        raise web.HTTPBadRequest(text="Not implemented")
    raise web.HTTPFound("/status")
