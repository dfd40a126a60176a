"""Resumable uploads under /rest/api/uploads/ (tus 1.0.0: core, creation, checksum, expiration
and termination). A finished upload goes through the same commit, naming, dedup and inspection as
a POST; the final PATCH answers with the stored file in `DQM-*` headers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import errno
import hashlib
import re
from collections.abc import Iterator
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..appkeys import CATALOG, INGEST, METRICS, RESUMABLE, SETTINGS, UPLOADS
from ..cancellation import run_to_the_end
from ..catalog import FileRecord
from ..digests import ExpectedDigests, check_digests, expected_digests
from ..ingest import Commit
from ..middlewares import UPLOADER, Handler
from ..naming import bounded_integer, dqm_filename, parse_dqm_headers
from ..resumable import FinishedAnswer, ResumableUpload, TooManyUnfinished
from ..storage import WRITEBACK_BYTES, HashingStopped, start_writeback
from .upload import check_room, inspect_within_budget

log = structlog.get_logger(__name__)

TUS_VERSION = "1.0.0"
TUS = {"Tus-Resumable": TUS_VERSION}
UPLOADS_PREFIX = "/rest/api/uploads"
CHECKSUMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "md5": hashlib.md5}
DQM_METADATA = ("runNumber", "timeStamp", "amoreAgent", "dataStatus")
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
# tus core: a POST carrying it is a request of the method it names (for clients behind proxies
# that pass only GET and POST).
METHOD_OVERRIDE = "X-HTTP-Method-Override"
_NOT_HEADER_TEXT = re.compile(r"[^\x20-\x7e]")


class HTTPLocked(web.HTTPClientError):
    """Another request is writing to this upload (WebDAV's 423, as tus servers use it)."""

    status_code = 423


class HTTPChecksumMismatch(web.HTTPClientError):
    """tus checksum extension: the chunk is not what its Upload-Checksum says."""

    status_code = 460


async def tus_resumable_header(request: web.Request, response: web.StreamResponse) -> None:
    """tus wants Tus-Resumable on every answer under its endpoint, errors included."""
    if request.path.startswith(UPLOADS_PREFIX):
        response.headers.setdefault("Tus-Resumable", TUS_VERSION)


def _tus_version(request: web.Request) -> None:
    if request.headers.get("Tus-Resumable") != TUS_VERSION:
        raise web.HTTPPreconditionFailed(
            text=f"Tus-Resumable must be {TUS_VERSION}",
            headers={"Tus-Version": TUS_VERSION, **TUS})


def _metadata(header: str | None) -> dict[str, str]:
    """`Upload-Metadata: key base64value, key2 base64value`."""
    values: dict[str, str] = {}
    for pair in (header or "").split(","):
        if not pair.strip():
            continue
        key, _, encoded = pair.strip().partition(" ")
        try:
            values[key] = base64.b64decode(encoded, validate=True).decode() if encoded else ""
        except ValueError:  # binascii.Error, not ASCII, or not UTF-8 once decoded
            raise web.HTTPBadRequest(text=f"Upload-Metadata value of {key!r} is not base64",
                                     headers=TUS) from None
    return values


def _length(request: web.Request) -> int:
    raw = request.headers.get("Upload-Length")
    if raw is None:
        raise web.HTTPBadRequest(text="Upload-Length is required (Upload-Defer-Length is not "
                                 "supported)", headers=TUS)
    return bounded_integer(raw, "Header Upload-Length", 2**63 - 1)


def _upload(request: web.Request) -> ResumableUpload:
    upload = request.app[RESUMABLE].get(request.match_info["upload_id"])
    if upload is None:
        raise web.HTTPNotFound(text="No such upload (finished, terminated or expired)",
                               headers=TUS)
    return upload


def _expiry(request: web.Request, upload: ResumableUpload) -> dict[str, str]:
    """tus expiration: when the unfinished upload goes if its client sends nothing more (a
    complete one never does: it is committed)."""
    if upload.offset == upload.length:
        return {}
    expires_at = request.app[RESUMABLE].expires_at(upload)
    return {"Upload-Expires": email.utils.formatdate(expires_at, usegmt=True)}


def _file_headers(record: FileRecord) -> dict[str, str]:
    headers = {"DQM-Filename": record.name, "DQM-Sha256": record.sha256, "DQM-State": record.state,
               "DQM-Info": f"/rest/api/files/{record.name}/info"}
    if record.reason:  # a header carries printable ASCII only (a reason quotes the file)
        headers["DQM-Reason"] = _NOT_HEADER_TEXT.sub("?", record.reason)
    return headers


async def options(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return web.Response(status=204, headers={
        **TUS, "Tus-Version": TUS_VERSION, "Tus-Extension": "creation,checksum,expiration,termination",
        "Tus-Max-Size": str(settings.max_upload_bytes),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUMS)})


async def create(request: web.Request) -> web.Response:
    _tus_version(request)
    length = _length(request)
    if length == 0:
        raise web.HTTPBadRequest(text="No file uploaded and the payload was empty", headers=TUS)
    # The DQM headers come as Upload-Metadata or as plain headers (headers win).
    fields = _metadata(request.headers.get("Upload-Metadata"))
    fields.update({name: request.headers[name] for name in DQM_METADATA if name in request.headers})
    dqm = parse_dqm_headers(fields)
    digests = expected_digests(request.headers)
    if digests.wants_md5:
        raise web.HTTPBadRequest(text="Content-MD5 is not supported for resumable uploads: "
                                 "send Repr-Digest: sha-256=:…: at creation", headers=TUS)
    check_room(request.app, length)
    try:  # no await in between: the room checked is the room reserved
        upload = await request.app[RESUMABLE].create(
            length, dqm, request[UPLOADER], digests.sha256,
            request.headers.get("Upload-Metadata"))
    except TooManyUnfinished as exc:
        raise web.HTTPServiceUnavailable(
            text=f"Too many unfinished resumable uploads ({exc}); finish or terminate some, "
            "or retry later",
            headers={**TUS, "Retry-After": str(request.app[SETTINGS].retry_after_seconds)},
        ) from None
    log.info("resumable_upload_created", upload_id=upload.upload_id, length=length,
             agent=dqm.agent, run=dqm.run_number)
    return web.Response(status=201, headers={
        **TUS, "Location": f"/rest/api/uploads/{upload.upload_id}", **_expiry(request, upload)})


async def head(request: web.Request) -> web.Response:
    _tus_version(request)
    finished = request.app[RESUMABLE].finished_answer(request.match_info["upload_id"])
    record = await _stored_as(request.app, finished) if finished is not None else None
    if finished is not None and record is not None:  # the file as it stands now
        metadata = {"Upload-Metadata": finished.metadata} if finished.metadata else {}
        return web.Response(status=200, headers={
            **TUS, "Cache-Control": "no-store", "Upload-Offset": str(finished.length),
            "Upload-Length": str(finished.length), **metadata, **_file_headers(record)})
    upload = _upload(request)
    metadata = {"Upload-Metadata": upload.metadata} if upload.metadata else {}
    return web.Response(status=200, headers={
        **TUS, "Cache-Control": "no-store", "Upload-Offset": str(upload.offset),
        "Upload-Length": str(upload.length), **metadata, **_expiry(request, upload)})


async def _stored_as(app: web.Application, finished: FinishedAnswer) -> FileRecord | None:
    """The file a finished upload was stored as, as it stands now: under its name, or, if that
    name went to another file since (a broken file's name goes to a later upload), found by
    its headers and bytes."""
    catalog = app[CATALOG]
    record = await catalog.get(finished.name)
    if record is not None and record.sha256 == finished.sha256:
        return record
    holders = await catalog.name_holders(
        dqm_filename(finished.agent, finished.run, finished.timestamp), finished.agent,
        finished.run, finished.timestamp, finished.sha256)
    return holders.copy


def _chunk_checksum(request: web.Request) -> tuple[Any, bytes] | None:
    raw = request.headers.get("Upload-Checksum")
    if raw is None:
        return None
    algorithm, _, encoded = raw.strip().partition(" ")
    if algorithm not in CHECKSUMS:
        raise web.HTTPBadRequest(text=f"Upload-Checksum algorithm {algorithm!r} is not "
                                 f"supported ({', '.join(CHECKSUMS)})", headers=TUS)
    hasher = CHECKSUMS[algorithm]()
    try:
        digest = base64.b64decode(encoded, validate=True)
    except ValueError:  # binascii.Error, or not ASCII at all
        raise web.HTTPBadRequest(text="Upload-Checksum value is not base64",
                                 headers=TUS) from None
    if len(digest) != hasher.digest_size:  # no chunk could match it: a malformed request
        raise web.HTTPBadRequest(text=f"Upload-Checksum value is not a {algorithm} digest "
                                 f"({hasher.digest_size} bytes in base64)", headers=TUS)
    return hasher, digest


def _append_sync(upload: ResumableUpload, chunk: bytes, chunk_hasher: Any) -> None:
    end = upload.offset + len(chunk)
    with open(upload.path, "r+b") as part:
        part.seek(upload.offset)
        part.write(chunk)
        if end // WRITEBACK_BYTES > upload.offset // WRITEBACK_BYTES:  # crossed a boundary
            part.flush()
            start_writeback(part.fileno(), upload.offset // WRITEBACK_BYTES * WRITEBACK_BYTES,
                            end)
    if upload.hasher is not None:
        upload.hasher.update(chunk)
    if chunk_hasher is not None:
        chunk_hasher.update(chunk)
    upload.offset += len(chunk)


def _truncate_sync(upload: ResumableUpload, offset: int) -> None:
    with open(upload.path, "r+b") as part:
        part.truncate(offset)
    upload.offset = offset
    upload.unverified_from = None
    upload.hasher = None  # it has seen bytes now thrown away: recomputed at completion


async def patch(request: web.Request) -> web.Response:
    _tus_version(request)
    if request.content_type != OFFSET_CONTENT_TYPE:
        raise web.HTTPUnsupportedMediaType(text=f"Content-Type must be {OFFSET_CONTENT_TYPE}",
                                           headers=TUS)
    upload = _upload(request)
    if upload.lock.locked():
        raise HTTPLocked(text="Another PATCH is writing to this upload", headers=TUS)
    async with upload.lock:
        if request.headers.get("Upload-Offset") is None:
            raise web.HTTPBadRequest(text="Upload-Offset is required", headers=TUS)
        offset = bounded_integer(request.headers["Upload-Offset"], "Header Upload-Offset",
                                 2**63 - 1)
        if offset != upload.offset:
            raise web.HTTPConflict(text=f"Upload-Offset must be {upload.offset}, got {offset}",
                                   headers=TUS)
        if (request.content_length or 0) > upload.remaining:  # refused before any byte is read
            raise web.HTTPRequestEntityTooLarge(
                max_size=upload.remaining, actual_size=request.content_length or 0,
                text=f"More bytes than Upload-Length: {upload.remaining} remain", headers=TUS)
        checksum = _chunk_checksum(request)
        start = upload.offset
        settings = request.app[SETTINGS]
        with request.app[UPLOADS].slot(upload.uploader, upload.dqm.agent,
                                       upload.dqm.run_number) as progress:
            if checksum is not None:
                with _disk_full_is_507(upload):
                    await request.app[RESUMABLE].begin_checksummed_chunk(upload)
            try:
                while chunk := await asyncio.wait_for(
                        request.content.read(settings.chunk_bytes),
                        settings.read_timeout_seconds):
                    if upload.offset + len(chunk) > upload.length:
                        await asyncio.to_thread(_truncate_sync, upload, start)
                        raise web.HTTPRequestEntityTooLarge(
                            max_size=upload.length, actual_size=upload.offset + len(chunk),
                            text="More bytes than Upload-Length", headers=TUS)
                    try:
                        # Awaited to its end even when cancelled: nothing may truncate the
                        # file under a write still going on.
                        await run_to_the_end(asyncio.to_thread(
                            _append_sync, upload, chunk, checksum[0] if checksum else None))
                    except OSError as exc:
                        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                            raise
                        if checksum is not None:  # what it did not vouch for is not kept
                            await asyncio.to_thread(_truncate_sync, upload, start)
                        await _record_progress_if_room(request.app, upload)
                        raise web.HTTPInsufficientStorage(
                            text=f"The receiver's disk is full; the upload stands at offset "
                            f"{upload.offset}", headers=TUS) from None
                    request.app[METRICS].received_bytes.inc(len(chunk))
                    progress.received_bytes += len(chunk)
            except (TimeoutError, ConnectionError, HttpProcessingError,
                    asyncio.CancelledError) as exc:
                # Keep what arrived (that is the point of resuming), unless a checksum must
                # vouch for the whole chunk.
                if checksum is not None:
                    await asyncio.shield(asyncio.to_thread(_truncate_sync, upload, start))
                await asyncio.shield(_record_progress_if_room(request.app, upload))
                if isinstance(exc, TimeoutError):
                    raise web.HTTPRequestTimeout(
                        text=f"No data received for {settings.read_timeout_seconds} s; the "
                        f"upload stands at offset {upload.offset}", headers=TUS) from None
                raise
            except BaseException:
                # Any other way out (a disk error, too many bytes): a chunk its checksum did
                # not vouch for is not kept, and no longer marked for the next start to drop.
                if checksum is not None and upload.unverified_from is not None:
                    await asyncio.shield(asyncio.to_thread(_truncate_sync, upload, start))
                    await asyncio.shield(_record_progress_if_room(request.app, upload))
                raise
            if checksum is not None:
                if checksum[0].digest() != checksum[1]:
                    await asyncio.to_thread(_truncate_sync, upload, start)
                    await _record_progress_if_room(request.app, upload)
                    raise HTTPChecksumMismatch(text="Upload-Checksum does not match the chunk",
                                               headers=TUS)
                upload.unverified_from = None
            with _disk_full_is_507(upload):  # not acknowledged: the client asks where it stands
                await request.app[RESUMABLE].record_progress(upload)
            headers = {**TUS, "Upload-Offset": str(upload.offset)}
            # The last byte arrived: committed within the slot, like a POST...
            commit = (await _commit_finished(request.app, upload)
                      if upload.offset == upload.length else None)
        if commit is not None:  # ...and its check awaited outside it, like a POST
            headers.update(await _answer_finished(request, upload, commit))
        else:
            headers.update(_expiry(request, upload))
    return web.Response(status=204, headers=headers)


@contextlib.contextmanager
def _disk_full_is_507(upload: ResumableUpload) -> Iterator[None]:
    """The upload's state could not be saved for a full disk: 507, as for its bytes."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise web.HTTPInsufficientStorage(
            text=f"The receiver's disk is full; the upload stands at offset {upload.offset}",
            headers=TUS) from None


async def _record_progress_if_room(app: web.Application, upload: ResumableUpload) -> None:
    """Save the upload's state on the way out of a failed PATCH, if the disk has room: the
    bytes on disk decide its offset at the next start, and the failure itself is what the
    client must hear."""
    try:
        await app[RESUMABLE].record_progress(upload)
    except OSError as exc:
        log.warning("resumable_state_not_saved", upload_id=upload.upload_id,
                    error=exc.strerror or type(exc).__name__)


async def _commit_finished(app: web.Application, upload: ResumableUpload) -> Commit:
    """Commit a complete upload exactly as a POST's file."""
    with _disk_full_is_507(upload):  # its state is saved once more before the commit
        finished = await app[RESUMABLE].finish(upload, app[SETTINGS].chunk_bytes,
                                               app[INGEST].hashing_stop)
    try:
        check_digests(ExpectedDigests(sha256=upload.expected_sha256), finished.sha256, None)
    except web.HTTPException:  # not the bytes it was created for: never to be stored
        await asyncio.shield(app[RESUMABLE].terminate(upload))
        raise
    # A failure from here on (a full disk, a catalog fault, a shutdown) is not the upload's:
    # it stays, complete (the commit takes only a second link to its bytes), and the next
    # sweep (or start) commits it.
    try:
        with _disk_full_is_507(upload):
            commit = await app[INGEST].commit(finished, upload.dqm, upload.uploader)
    except BaseException:
        await asyncio.shield(finished.discard())
        raise
    # Its state and part file go (the file is in place), its answer stays for HEAD.
    await app[RESUMABLE].record_finished(upload, commit.record.name, finished.sha256)
    app[RESUMABLE].forget(upload)
    return commit


async def _answer_finished(request: web.Request, upload: ResumableUpload,
                           commit: Commit) -> dict[str, str]:
    """Wait for the committed file's check, as a POST does."""
    app = request.app
    inspected = await inspect_within_budget(app, commit)
    file_headers = _file_headers(inspected or commit.record)
    result = "duplicate" if commit.duplicate else (inspected.state if inspected else "pending")
    app[METRICS].uploads.labels(result, app[METRICS].agent_label(upload.dqm.agent)).inc()
    log.info("resumable_upload_finished", upload_id=upload.upload_id,
             file=commit.record.name, duplicate=commit.duplicate)
    return file_headers


async def commit_complete_uploads(app: web.Application) -> int:
    """Commit every unfinished upload that holds all its bytes: at start-up, those whose last
    PATCH the daemon died answering; then, at each sweep, those whose last PATCH failed after
    its last byte was written. A tus client asking finds the offset at the length and takes
    the upload as done: nothing else would ever commit it. The file is then pending, checked
    like any other; HEAD answers with its name until the upload's expiry."""
    uploads, committed = app[RESUMABLE], 0
    for upload in uploads.complete():
        if upload.lock.locked():
            continue  # a PATCH that arrived meanwhile is committing it
        async with upload.lock:
            if uploads.get(upload.upload_id) is not upload:
                continue
            try:
                commit = await _commit_finished(app, upload)
            except HashingStopped:
                break  # shutting down: the rest are committed at the next start
            except Exception as exc:  # e.g. not the Repr-Digest it was created with
                log.warning("resumable_upload_not_committed", upload_id=upload.upload_id,
                            error=getattr(exc, "text", None) or type(exc).__name__)
                continue
        committed += 1
        log.info("resumable_upload_finished", upload_id=upload.upload_id,
                 file=commit.record.name, duplicate=commit.duplicate, unanswered=True)
    return committed


async def terminate(request: web.Request) -> web.Response:
    _tus_version(request)
    upload = _upload(request)
    if upload.lock.locked():
        raise HTTPLocked(text="A PATCH is writing to this upload", headers=TUS)
    await request.app[RESUMABLE].terminate(upload)
    return web.Response(status=204, headers=TUS)


async def collection_post(request: web.Request) -> web.StreamResponse:
    """POST on the collection: a creation, or the method X-HTTP-Method-Override names."""
    return await _overridden(request, {"POST": create, "OPTIONS": options}, create)


async def upload_post(request: web.Request) -> web.StreamResponse:
    """POST on an upload: the method X-HTTP-Method-Override names (HEAD, PATCH or DELETE)."""
    return await _overridden(request, {"HEAD": head, "PATCH": patch, "DELETE": terminate})


async def _overridden(request: web.Request, handlers: dict[str, Handler],
                      plain_post: Handler | None = None) -> web.StreamResponse:
    named = request.headers.get(METHOD_OVERRIDE)
    if named is None and plain_post is not None:
        return await plain_post(request)
    handler = handlers.get((named or "").strip().upper())
    if handler is None:
        allowed = " or ".join(", ".join(handlers).rsplit(", ", 1))
        raise web.HTTPMethodNotAllowed(
            request.method, list(handlers), headers=TUS,
            text=f"{METHOD_OVERRIDE} must name {allowed} here")
    structlog.contextvars.bind_contextvars(method_override=(named or "").strip().upper())
    return await handler(request)
