"""The API's table of contents."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from .handlers import resumable_uploads as tus
from .handlers.files import download_file, file_info, list_files
from .handlers.health import healthz, metrics
from .handlers.pages import file_data, page, root, run_data, status_data, twin
from .handlers.upload import expect_continue, post_file


def setup_routes(app: web.Application, static_dir: Path) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    # The shift crew's pages, each with its JSON twin (the .json routes come first).
    app.router.add_get("/", root)
    app.router.add_post("/", root)  # the Overwatch receiver's token probe, as GET with a token
    app.router.add_get("/status", page("status.html", status_data))
    app.router.add_get("/status.json", twin(status_data))
    app.router.add_get("/files/{filename}.json", twin(file_data))
    app.router.add_get("/files/{filename}", page("file.html", file_data))
    app.router.add_get(r"/runs/{run:\d+}.json", twin(run_data))
    app.router.add_get(r"/runs/{run:\d+}", page("run.html", run_data))
    app.router.add_static("/static", static_dir)
    # The Overwatch-compatible API (token required).
    app.router.add_get("/rest/api/files", list_files)
    app.router.add_post("/rest/api/files", post_file, expect_handler=expect_continue)
    app.router.add_get("/rest/api/files/{filename}", download_file)
    app.router.add_get("/rest/api/files/{filename}/info", file_info)
    # Resumable uploads (tus 1.0.0).
    for collection in ("/rest/api/uploads", "/rest/api/uploads/"):
        app.router.add_route("OPTIONS", collection, tus.options)
        app.router.add_post(collection, tus.create)
    app.router.add_route("HEAD", "/rest/api/uploads/{upload_id}", tus.head)
    app.router.add_patch("/rest/api/uploads/{upload_id}", tus.patch)
    app.router.add_delete("/rest/api/uploads/{upload_id}", tus.terminate)
