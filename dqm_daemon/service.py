"""Running the daemon as a service: listen, tell systemd when ready, keep the watchdog fed from
the event loop, and shut down gracefully on SIGTERM/SIGINT (at once on a second signal)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping

import structlog
from aiohttp import web

from . import __version__
from .app import create_app
from .appkeys import INGEST, INSPECTION_QUEUE, INSPECTORS, UPLOADS
from .middlewares import refuse_malformed_requests_in_json
from .settings import Settings
from .storage import DataDirectoryInUse
from .systemd_notify import SystemdNotifier

log = structlog.get_logger(__name__)

# After the grace period, what still runs gets this long to wind down before it is cancelled.
FINAL_SHUTDOWN_SECONDS = 2.0
# How often STATUS= is refreshed when systemd asks for no watchdog.
STATUS_INTERVAL_SECONDS = 10.0


def status_line(app: web.Application) -> str:
    return (f"uploads in flight: {len(app[UPLOADS])}; "
            f"inspection queue: {app[INSPECTION_QUEUE].depth}")


async def _heartbeat(app: web.Application, notifier: SystemdNotifier,
                     stop_requested: asyncio.Event) -> None:
    """WATCHDOG=1 from the event loop itself: if the loop blocks, the pings stop and systemd
    restarts the daemon. Each ping also refreshes STATUS= (still saying "stopping" once a stop
    was asked for: the pings go on while uploads finish)."""
    interval = notifier.watchdog_interval_seconds or STATUS_INTERVAL_SECONDS
    while True:
        if notifier.watchdog_interval_seconds:
            notifier.watchdog()
        stopping = "stopping: " if stop_requested.is_set() else ""
        notifier.status(stopping + status_line(app))
        await asyncio.sleep(interval)


async def serve(settings: Settings, environ: Mapping[str, str]) -> int:
    notifier = SystemdNotifier(environ)
    app = create_app(settings)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if not stop_requested.is_set():
            log.info("shutdown_requested", signal=signal.Signals(signum).name,
                     uploads_in_flight=len(app[UPLOADS]))
            stop_requested.set()
            return
        # Second signal: leave now. Partial uploads live only in .incoming/, never under a
        # DQM name, and are removed at the next start; pending inspections are in the catalog.
        log.warning("shutdown_forced", signal=signal.Signals(signum).name)
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    # A socket buffer of a whole chunk: uploads arrive in fewer, larger reads.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=FINAL_SHUTDOWN_SECONDS,
                           read_bufsize=settings.chunk_bytes,
                           # A connection silent before or between requests is closed after
                           # this (aiohttp's default is an hour: a thousand silent clients would
                           # hold a thousand descriptors), and one whose client stops taking
                           # its answer too (`middlewares._JsonRefusals`).
                           keepalive_timeout=settings.read_timeout_seconds)
    try:
        await runner.setup()  # catalog open, temporaries removed, workers and recovery started
        refuse_malformed_requests_in_json(runner)
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
    except Exception as exc:
        # One clear line (the port taken, the data directory not a directory) rather than a
        # traceback on stderr; anything else with its traceback, as a log line.
        if isinstance(exc, OSError):
            log.error("startup_failed", error=str(exc))
        else:
            log.exception("startup_failed")
        await runner.cleanup()
        notifier.close()
        # In use by another daemon: a restart would not change that (the unit does not
        # restart on 2).
        return 2 if isinstance(exc, DataDirectoryInUse) else 1
    log.info("listening", host=settings.host, port=settings.port, version=__version__)
    # Ready once listening: uploads are taken while start-up recovery (adopting unknown files,
    # queuing pending checks) goes on, which can take minutes on a large data directory and
    # must neither run into systemd's start timeout nor delay a SIGTERM.
    notifier.ready(status_line(app))
    # The first upload should not wait for an inspection child to import uproot.
    warm_ups = [asyncio.create_task(inspector.warm_up()) for inspector in app[INSPECTORS]]
    heartbeat = asyncio.create_task(_heartbeat(app, notifier, stop_requested),
                                    name="systemd-heartbeat")

    await stop_requested.wait()
    notifier.stopping(f"stopping: {status_line(app)}")
    # Hashing a large file found on disk would hold up the exit: it stops now (adoption goes
    # on at the next start; an upload that needed it is answered 503 and retried).
    app[INGEST].stop_hashing()
    # Stop listening and refuse new uploads, but keep reading the bodies of those in flight
    # (aiohttp's own shutdown stops reading at once) for up to the grace period.
    await site.stop()
    app[UPLOADS].close()
    grace_ends = loop.time() + settings.shutdown_grace_seconds
    if not await app[UPLOADS].wait_idle(settings.shutdown_grace_seconds):
        log.warning("shutdown_grace_expired", uploads_dropped=len(app[UPLOADS]))
    # Uploads received whole wait for their check within the same grace; those still waiting
    # then are answered 202, pending (the next start checks them).
    await app[INSPECTION_QUEUE].wait_verdicts_delivered(max(0.0, grace_ends - loop.time()))
    app[INSPECTION_QUEUE].stop_waiting()
    # Then close connections (cancelling uploads still running: their temporaries are
    # removed), stop the workers (what they had not inspected stays pending in the catalog)
    # and close the catalog.
    for warm_up in warm_ups:
        warm_up.cancel()
    await runner.cleanup()
    heartbeat.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await heartbeat
    notifier.close()
    log.info("stopped")
    return 0
