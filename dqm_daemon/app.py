"""The application factory: builds every part, wires them under typed keys, and starts and
stops the background work in cleanup contexts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp_jinja2
import jinja2
import structlog
from aiohttp import web

from . import quarantine
from .analysis import Analyst
from .appkeys import (
    ANALYST,
    CATALOG,
    INGEST,
    INSPECTION_QUEUE,
    INSPECTORS,
    METRICS,
    PAGE_THREAD,
    PREVIEWER,
    RESUMABLE,
    SETTINGS,
    STARTED_MONOTONIC,
    STORAGE,
    UPLOAD_THREADS,
    UPLOADS,
)
from .catalog import Catalog
from .handlers.resumable_uploads import commit_complete_uploads, tus_resumable_header
from .ingest import Ingest
from .inspection_pool import CHILD_COMMAND, InspectorProcess
from .inspection_queue import InspectionQueue
from .metrics import Metrics
from .middlewares import (
    basic_auth_for_pages,
    errors_as_json,
    log_file_answer,
    request_context,
    token_auth,
)
from .page_format import FILTERS
from .previewer import Previewer
from .resumable import ResumableUploads
from .routes import setup_routes
from .settings import Settings
from .storage import Storage
from .upload_body import close_detached_connections
from .uploads import UploadsInProgress

log = structlog.get_logger(__name__)

# The analysis child runs at the lowest CPU priority: uploads and their checks come first.
ANALYSIS_NICENESS = 19


async def storage_and_catalog(app: web.Application) -> AsyncIterator[None]:
    leftovers = await asyncio.to_thread(app[STORAGE].prepare)
    try:  # the data directory is this process's until released, however this ends
        if leftovers:
            log.info("temporaries_removed", count=leftovers)
        await app[CATALOG].open()
        yield
        # Uploads have ended, or were cancelled and told their threads to stop; a thread may
        # still need the loop for its last read, so it is waited for off the loop.
        await asyncio.to_thread(app[UPLOAD_THREADS].shutdown, wait=True)
        await asyncio.to_thread(app[PAGE_THREAD].shutdown, wait=True)
        await app[CATALOG].close()
    finally:
        app[STORAGE].release()


async def quarantine_retention(app: web.Application) -> AsyncIterator[None]:
    """Remove quarantined files past their retention, hourly."""
    sweeper = asyncio.create_task(quarantine.run_sweeper(
        app[CATALOG], app[INGEST], app[SETTINGS].quarantine_retention_days),
        name="quarantine-sweeper")
    yield
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper


async def resumable_uploads(app: web.Application) -> AsyncIterator[None]:
    """Take back unfinished resumable uploads; sweep: commit the complete ones, remove the
    expired ones."""
    uploads = app[RESUMABLE]
    restored = await asyncio.to_thread(uploads.load)
    if restored:
        log.info("resumable_uploads_restored", count=restored)
    sweeper = asyncio.create_task(
        uploads.run_sweeper(app[SETTINGS].resumable_sweep_seconds,
                            functools.partial(commit_complete_uploads, app)),
        name="resumable-sweeper")
    yield
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper


async def inspection_workers(app: web.Application) -> AsyncIterator[None]:
    """One worker per inspection child and the analyst, then start-up recovery: adopt unknown
    files, and let the sweeper queue everything pending (workers first, so the queue drains
    meanwhile)."""
    queue = app[INSPECTION_QUEUE]
    workers = [
        asyncio.create_task(queue.run_worker(inspector), name=f"inspection-worker-{number}")
        for number, inspector in enumerate(app[INSPECTORS])
    ]
    workers.append(asyncio.create_task(app[ANALYST].run(), name="analyst"))

    async def recover_then_sweep() -> None:
        try:  # first: a name it finds on disk is then cataloged with its upload's headers
            committed = await commit_complete_uploads(app)
            if committed:
                log.info("resumable_uploads_committed", count=committed)
        except Exception:  # they stay complete on disk: committed at the next start
            log.exception("startup_resumable_commit_failed")
        try:
            adopted = await app[INGEST].adopt_unknown_files(app[SETTINGS].chunk_bytes)
            log.info("startup_recovery", adopted_files=adopted)
        except Exception:  # the files stay where they are: adopted at the next start
            log.exception("startup_adoption_failed")
        await queue.run_sweeper(app[SETTINGS].inspection_sweep_seconds)

    sweeper = asyncio.create_task(recover_then_sweep(), name="inspection-sweeper")
    yield
    app[INGEST].stop_hashing()  # its thread may be hashing a large file: it stops too
    for task in (sweeper, *workers):
        task.cancel()
    for task in (sweeper, *workers):
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await app[PREVIEWER].close()


def create_app(
    settings: Settings, *, inspection_command: tuple[str, ...] = CHILD_COMMAND
) -> web.Application:
    """The application. `inspection_command` starts an inspection child (tests swap in one
    that misbehaves on purpose)."""
    settings.require_tokens()
    app = web.Application(
        middlewares=[request_context, errors_as_json, token_auth(settings.tokens),
                     basic_auth_for_pages(settings.pages_basic_auth)],
        # Uploads are streamed by the handlers; this only bounds bodies read whole (none today).
        client_max_size=1024 * 1024,
    )
    storage = Storage(settings)
    catalog = Catalog(settings.catalog_path)
    metrics = Metrics()
    uploads = UploadsInProgress(settings.max_concurrent_uploads, settings.retry_after_seconds)
    analyst = Analyst(catalog, storage, metrics, InspectorProcess(
        settings.inspection_memory_cap_bytes, settings.inspection_time_limit_seconds,
        inspection_command, niceness=ANALYSIS_NICENESS), uploads)
    inspection_queue = InspectionQueue(catalog, storage, metrics,
                                       settings.inspection_queue_length, analyst.announce)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[STORAGE] = storage
    app[CATALOG] = catalog
    app[INSPECTORS] = [
        InspectorProcess(settings.inspection_memory_cap_bytes,
                         settings.inspection_time_limit_seconds, inspection_command)
        for _ in range(settings.inspection_workers)
    ]
    app[INSPECTION_QUEUE] = inspection_queue
    app[ANALYST] = analyst
    app[PREVIEWER] = Previewer(
        InspectorProcess(settings.inspection_memory_cap_bytes,
                         settings.inspection_time_limit_seconds, inspection_command),
        storage,
    )
    app[INGEST] = Ingest(catalog, storage)
    app[RESUMABLE] = ResumableUploads(settings.resumable_dir, settings.resumable_expiry_seconds,
                                      settings.resumable_unstarted_expiry_seconds,
                                      settings.max_unfinished_resumable_uploads)
    app[UPLOADS] = uploads
    app[UPLOAD_THREADS] = ThreadPoolExecutor(max_workers=settings.max_concurrent_uploads,
                                             thread_name_prefix="upload-body")
    app[PAGE_THREAD] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="page")
    app[STARTED_MONOTONIC] = time.monotonic()
    app.cleanup_ctx.append(storage_and_catalog)
    app.cleanup_ctx.append(resumable_uploads)
    app.cleanup_ctx.append(quarantine_retention)
    app.cleanup_ctx.append(inspection_workers)
    web_files = importlib.resources.files("dqm_daemon.web")
    pages = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(web_files / "templates")),
        autoescape=jinja2.select_autoescape(["html"]),
        filters=FILTERS,
    )
    for template in pages.list_templates():
        pages.get_template(template)  # compiled now, not on the first page view (~0.1 s)
    setup_routes(app, static_dir=Path(str(web_files / "static")))
    app.on_response_prepare.append(log_file_answer)
    app.on_response_prepare.append(tus_resumable_header)
    app.on_response_prepare.append(close_detached_connections)
    return app
