"""POST /rest/api/files: stream an agent's file to disk, commit it, answer with what it holds."""

from __future__ import annotations

import asyncio
import errno
import time

import structlog
from aiohttp import web

from ..appkeys import (
    INGEST,
    INSPECTION_QUEUE,
    METRICS,
    RESUMABLE,
    SETTINGS,
    STORAGE,
    UPLOAD_THREADS,
    UPLOADS,
)
from ..catalog import INVALID, OK, PENDING, FileRecord
from ..digests import check_digests, expected_digests
from ..ingest import Commit
from ..middlewares import (
    UPLOADER,
    error_response,
    new_request_id,
    redact_tokens,
    uploader_for_token,
)
from ..naming import parse_dqm_headers
from ..storage import IncomingFile
from ..upload_body import receive_body
from ..uploads import UploadProgress

log = structlog.get_logger(__name__)

SUCCESS_MESSAGE = "Successfully received file and extracted information"
INVALID_MESSAGE = "Successfully received the file, but the file is not valid! Perhaps it was corrupted?"
EMPTY_MESSAGE = "No file uploaded and the payload was empty"
# Headers never echoed back in `receivedHeaders` (nor any whose name holds "token").
SECRET_HEADERS = frozenset({"token", "authorization", "proxy-authorization", "cookie"})



def check_room(app: web.Application, declared_length: int | None) -> None:
    """Refuse before reading a byte when the upload cannot fit. Bytes promised to unfinished
    resumable uploads count as used."""
    settings, storage = app[SETTINGS], app[STORAGE]
    if declared_length is not None and declared_length > settings.max_upload_bytes:
        raise web.HTTPRequestEntityTooLarge(
            max_size=settings.max_upload_bytes,
            actual_size=declared_length,
            text=f"Upload of {declared_length} bytes exceeds the maximum of "
            f"{settings.max_upload_bytes} bytes",
        )
    available = storage.free_bytes() - app[RESUMABLE].reserved_bytes() - (declared_length or 0)
    if available < settings.disk_reserve_bytes:
        raise web.HTTPInsufficientStorage(
            text="Not enough free disk space on the receiver; nothing was kept"
        )


async def expect_continue(request: web.Request) -> web.Response | None:
    """Answer `Expect: 100-continue` with the real verdict, so a refused client never sends
    its body: bad token, bad headers, no room, no free upload slot or a shutdown are answered
    before the upload starts."""
    if request.version < (1, 1) or request.headers.get("Expect", "").lower() != "100-continue":
        return None
    settings = request.app[SETTINGS]
    started = time.perf_counter()
    agent = None  # known once the token is
    try:
        uploader_for_token(request.headers, settings.tokens)
        agent = "unknown"
        agent = parse_dqm_headers(request.headers).agent
        expected_digests(request.headers)
        check_room(request.app, request.content_length)
        request.app[UPLOADS].check_free()  # checked again when the upload takes its slot
    except web.HTTPException as exc:
        response = upload_refusal(exc, request)
        response.force_close()
        # No middleware sees this answer: it gets its request id, log line and count here.
        request_id = new_request_id()
        response.headers["X-Request-Id"] = request_id
        log.info("request", request_id=request_id, method=request.method,
                 path=redact_tokens(request.path, settings.tokens),
                 status=response.status, expect="100-continue",
                 duration_ms=round((time.perf_counter() - started) * 1000, 1))
        if agent is not None:  # past the token check, as post_file counts
            metrics = request.app[METRICS]
            metrics.uploads.labels("rejected", metrics.agent_label(agent)).inc()
        return response
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not part of the response body
    return None


async def _receive(request: web.Request, incoming: IncomingFile, progress: UploadProgress) -> None:
    settings, storage = request.app[SETTINGS], request.app[STORAGE]
    started = time.perf_counter()
    await receive_body(request, incoming, progress, settings, storage,
                       request.app[UPLOAD_THREADS])
    if incoming.size == 0:  # an empty body, or a multipart body without the field `file`
        raise web.HTTPBadRequest(text=EMPTY_MESSAGE)
    # Where an upload's time goes: the network and hashing, or the disk's fsync.
    structlog.contextvars.bind_contextvars(
        stream_ms=round((time.perf_counter() - started - incoming.fsync_seconds) * 1000, 1),
        fsync_ms=round(incoming.fsync_seconds * 1000, 1),
    )


def received_headers(request: web.Request) -> dict[str, str]:
    """The request's headers as the Overwatch receiver echoed them, spelled as Flask gave them
    (`Runnumber`, `Amoreagent`, `Content-Type`; repeated ones joined), the secret ones left out."""
    tokens = request.app[SETTINGS].tokens
    echoed: dict[str, str] = {}
    for key, value in request.headers.items():
        if (key.lower() in SECRET_HEADERS or "token" in key.lower()
                or redact_tokens(key, tokens) != key):  # a header named with a token
            continue
        key, value = key.replace("_", "-").title(), redact_tokens(value, tokens)
        echoed[key] = f"{echoed[key]}, {value}" if key in echoed else value
    return echoed


def upload_refusal(exc: web.HTTPException, request: web.Request) -> web.Response:
    """A refused upload's answer: the JSON error, with `received: null` and the echoed headers
    as every answer to the Overwatch receiver's POST had them (but those of its token check,
    which held the message alone)."""
    tokens = request.app[SETTINGS].tokens
    if exc.status == web.HTTPUnauthorized.status_code:
        return error_response(exc, tokens=tokens)
    return error_response(exc, {"received": None, "receivedHeaders": received_headers(request)},
                          tokens)


def _answer(record: FileRecord, request: web.Request, *, status: int, message: str) -> web.Response:
    body = {
        "status": status,
        "message": message,
        "filename": record.name,
        # null for a file that is not sound ROOT, as the Overwatch receiver answered
        "received": None if record.state == INVALID else record.received or {},
        "receivedHeaders": received_headers(request),
        "size": record.size,
        "sha256": record.sha256,
        "state": record.state,
    }
    if record.reason:
        body["reason"] = record.reason
    return web.json_response(body, status=status)


async def post_file(request: web.Request) -> web.Response:
    """Count every upload by result and agent, and time it, whatever its outcome."""
    metrics = request.app[METRICS]
    started = time.perf_counter()
    outcome = {"result": "rejected", "agent": "unknown"}
    try:
        return await _store_and_answer(request, outcome)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return upload_refusal(exc, request)
    finally:
        metrics.uploads.labels(outcome["result"], metrics.agent_label(outcome["agent"])).inc()
        metrics.upload_seconds.observe(time.perf_counter() - started)


async def _store_and_answer(request: web.Request, outcome: dict[str, str]) -> web.Response:
    dqm = parse_dqm_headers(request.headers)
    digests = expected_digests(request.headers)
    outcome["agent"] = dqm.agent
    structlog.contextvars.bind_contextvars(agent=dqm.agent, run=dqm.run_number)
    uploader = request[UPLOADER]
    with request.app[UPLOADS].slot(uploader, dqm.agent, dqm.run_number) as progress:
        check_room(request.app, request.content_length)
        incoming = request.app[STORAGE].incoming_file(with_md5=digests.wants_md5)
        try:
            await _receive(request, incoming, progress)
            check_digests(digests, incoming.sha256, incoming.md5)
            committing = time.perf_counter()
            commit = await request.app[INGEST].commit(incoming, dqm, uploader)
        except OSError as exc:
            await asyncio.shield(incoming.discard())
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise web.HTTPInsufficientStorage(
                    text="The receiver's disk is full; nothing was kept"
                ) from None
            raise
        except BaseException:
            await asyncio.shield(incoming.discard())
            raise
        finally:
            structlog.contextvars.bind_contextvars(bytes=progress.received_bytes)
            request.app[METRICS].received_bytes.inc(progress.received_bytes)
    inspecting = time.perf_counter()
    inspected = await inspect_within_budget(request.app, commit)
    # The rest of an upload's time: naming and cataloging it, then its check (queue included).
    structlog.contextvars.bind_contextvars(
        commit_ms=round((inspecting - committing) * 1000, 1),
        check_ms=round((time.perf_counter() - inspecting) * 1000, 1),
    )
    record = commit.record
    if inspected is None:
        outcome["result"] = "pending"
        response = _answer(record, request, status=202, message="Received; inspection pending")
        response.headers["Location"] = f"/rest/api/files/{record.name}/info"
        return response
    outcome["result"] = "duplicate" if commit.duplicate else inspected.state
    if inspected.state == OK:
        return _answer(inspected, request, status=200, message=SUCCESS_MESSAGE)
    return _answer(inspected, request, status=400, message=INVALID_MESSAGE)


async def inspect_within_budget(app: web.Application, commit: Commit) -> FileRecord | None:
    """Queue a committed file and wait for its inspection up to the budget; None if it is
    still pending then (a full queue leaves it pending too: the sweeper queues it later)."""
    budget, inspection_queue = app[SETTINGS].inspection_budget_seconds, app[INSPECTION_QUEUE]
    if commit.duplicate and commit.record.state == PENDING:
        # The stored copy, not checked yet: queued by its own upload (then this waits for its
        # verdict), or left pending (its file was unreadable, or restored by this upload).
        return await inspection_queue.queue_and_wait(commit.record, budget, fresh=False)
    if commit.duplicate:  # the stored copy: inspected already
        return await inspection_queue.wait_inspected(commit.record.name, budget)
    return await inspection_queue.queue_and_wait(commit.record, budget)
