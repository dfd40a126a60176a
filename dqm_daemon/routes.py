"""The API's table of contents."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from .handlers import resumable_uploads as tus
from .handlers.files import download_file, file_info, list_files
from .handlers.health import healthz, metrics
from .handlers.pages import (
    file_data,
    page,
    root,
    run_data,
    static_files,
    status_data,
    twin,
)
from .handlers.upload import expect_continue, post_file
from .middlewares import Handler, continue_or_ignore


async def no_such_route(request: web.Request) -> web.StreamResponse:
    """What no route takes: 404, or 405 (with Allow) when the path has routes for other
    methods, as aiohttp answers, but past the middlewares (JSON, a request id, a log line)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        match, methods = await resource.resolve(request)
        if match is None:
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def setup_routes(app: web.Application, static_dir: Path) -> None:
    def get(path: str, handler: Handler) -> None:
        app.router.add_get(path, handler, expect_handler=continue_or_ignore)

    def route(method: str, path: str, handler: Handler) -> None:
        app.router.add_route(method, path, handler, expect_handler=continue_or_ignore)

    get("/healthz", healthz)
    get("/metrics", metrics)
    # The shift crew's pages, each with its JSON twin (the .json routes come first).
    get("/", root)
    route("POST", "/", root)  # the Overwatch receiver's token probe, as GET with a token
    get("/status", page("status.html", status_data))
    get("/status.json", twin(status_data))
    get("/files/{filename}.json", twin(file_data))
    get("/files/{filename}", page("file.html", file_data))
    get(r"/runs/{run:\d+}.json", twin(run_data))
    get(r"/runs/{run:\d+}", page("run.html", run_data))
    get("/static/{name}", static_files(static_dir))
    # The Overwatch-compatible API (token required).
    get("/rest/api/files", list_files)
    app.router.add_post("/rest/api/files", post_file, expect_handler=expect_continue)
    get("/rest/api/files/{filename}", download_file)
    get("/rest/api/files/{filename}/info", file_info)
    # Resumable uploads (tus 1.0.0).
    for collection in ("/rest/api/uploads", "/rest/api/uploads/"):
        route("OPTIONS", collection, tus.options)
        route("POST", collection, tus.collection_post)
    route("HEAD", "/rest/api/uploads/{upload_id}", tus.head)
    route("POST", "/rest/api/uploads/{upload_id}", tus.upload_post)  # X-HTTP-Method-Override
    route("PATCH", "/rest/api/uploads/{upload_id}", tus.patch)
    route("DELETE", "/rest/api/uploads/{upload_id}", tus.terminate)
    # Last, every other path and method. aiohttp answers those itself, but an `Expect` other
    # than 100-continue it refuses first, in plain text quoting the header (417).
    route("*", "/{path:(?s:.*)}", no_such_route)  # (?s): a path may hold a newline (%0A)
