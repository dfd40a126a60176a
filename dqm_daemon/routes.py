"""The API's table of contents."""

from __future__ import annotations

from aiohttp import web

from .handlers.files import download_file, file_info, list_files
from .handlers.health import healthz
from .handlers.upload import expect_continue, post_file


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/rest/api/files", list_files)
    app.router.add_post("/rest/api/files", post_file, expect_handler=expect_continue)
    app.router.add_get("/rest/api/files/{filename}", download_file)
    app.router.add_get("/rest/api/files/{filename}/info", file_info)
