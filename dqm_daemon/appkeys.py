"""Every object the application shares, each under one typed key."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from .analysis import Analyst
from .catalog import Catalog
from .ingest import Ingest
from .inspection_pool import InspectorProcess
from .inspection_queue import InspectionQueue
from .metrics import Metrics
from .previewer import Previewer
from .resumable import ResumableUploads
from .settings import Settings
from .storage import Storage
from .uploads import UploadsInProgress

SETTINGS = web.AppKey("settings", Settings)
CATALOG = web.AppKey("catalog", Catalog)
STORAGE = web.AppKey("storage", Storage)
INSPECTION_QUEUE = web.AppKey("inspection_queue", InspectionQueue)
INSPECTORS = web.AppKey("inspectors", list[InspectorProcess])
ANALYST = web.AppKey("analyst", Analyst)
PREVIEWER = web.AppKey("previewer", Previewer)
METRICS = web.AppKey("metrics", Metrics)
RESUMABLE = web.AppKey("resumable_uploads", ResumableUploads)
INGEST = web.AppKey("ingest", Ingest)
UPLOADS = web.AppKey("uploads", UploadsInProgress)
# Each upload's body is read, hashed and written by one of these threads.
UPLOAD_THREADS = web.AppKey("upload_threads", ThreadPoolExecutor)
# Pages are rendered by this one thread: a heavy page never takes the threads that commit
# uploads and probe health, and heavy pages wait their turn.
PAGE_THREAD = web.AppKey("page_thread", ThreadPoolExecutor)
STARTED_MONOTONIC = web.AppKey("started_monotonic", float)
