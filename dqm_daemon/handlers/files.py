"""GET /rest/api/files and /rest/api/files/{filename}: list the DQM files, serve one back."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import weakref
from stat import S_ISREG
from typing import Any

import pendulum
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETAG_ANY
from pendulum.parsing.exceptions import ParserError

from ..appkeys import CATALOG, STORAGE
from ..catalog import IN_DATA_DIR, INVALID
from ..middlewares import LoggedFileResponse
from ..naming import MAX_RUN_NUMBER, bounded_integer


def _run_query(request: web.Request) -> int | None:
    raw = request.query.get("run")
    if raw is None:
        return None
    return bounded_integer(raw, "Query parameter run", MAX_RUN_NUMBER)


# `since` only filters: any time up to the end of the year 9999 (UTC), as its ISO form allows.
MAX_SINCE = 253402300799


def _since_query(request: web.Request) -> int | None:
    """`since`: unix seconds or an ISO 8601 time, compared with the files' timeStamp."""
    raw = request.query.get("since")
    if raw is None:
        return None
    if raw.lstrip("-").isdigit():
        return bounded_integer(raw, "Query parameter since", MAX_SINCE, -MAX_SINCE)
    try:
        moment = pendulum.parse(raw)
        if not isinstance(moment, pendulum.DateTime):  # a duration ("P1D"), an interval
            raise TypeError(raw)
        return int(moment.timestamp())
    except (ValueError, TypeError, ParserError):
        raise web.HTTPBadRequest(
            text=f"Query parameter since must be unix seconds or an ISO 8601 time, got {raw!r}"
        ) from None


# Rows of `details=1` per page, by default and at most: each carries its top-level listing and
# findings, so a whole catalog in one answer would take gigabytes and minutes.
DEFAULT_DETAILS_PAGE = 1000
MAX_DETAILS_PAGE = 10_000


async def list_files(request: web.Request) -> web.Response:
    """`{"files": [names]}`, every sound DQM file (as the Overwatch receiver answers); with
    `details=1`, the catalog rows (without their objects) a page at a time: `limit` rows after
    the name `after`, and `next_after` to ask for the next page (null on the last)."""
    filters = {"run": _run_query(request), "agent": request.query.get("agent"),
               "since": _since_query(request)}
    catalog = request.app[CATALOG]
    if request.query.get("details", "0") in ("0", "false", ""):
        names = await catalog.dqm_file_names(**filters)
        # Encoded off the event loop: a catalog of months holds hundreds of thousands.
        return web.json_response(text=await asyncio.to_thread(json.dumps, {"files": names}))
    limit = bounded_integer(request.query.get("limit", str(DEFAULT_DETAILS_PAGE)),
                            "Query parameter limit", MAX_DETAILS_PAGE, 1)
    records = await catalog.dqm_files(**filters, after=request.query.get("after"), limit=limit)
    rows = [record.as_dict() for record in records]
    for row in rows:
        del row["objects"]  # never loaded for listings; only the info resource has them
    page = {"files": rows, "next_after": rows[-1]["name"] if len(rows) == limit else None}
    return web.json_response(text=await asyncio.to_thread(json.dumps, page))


async def file_info(request: web.Request) -> web.Response:
    """The catalog row of one file, with everything inspection found; quarantined files too."""
    name = request.match_info["filename"]
    found = await request.app[CATALOG].with_objects_text(name)
    if found is None:
        raise web.HTTPNotFound(text=f"No such file: {name}")
    record, objects_json = found
    # The objects as stored (JSON text, up to megabytes): spliced in, never parsed here.
    head = record.as_dict()
    del head["objects"]
    body = json.dumps(head)[:-1] + f', "objects": {objects_json or "null"}}}'
    return web.json_response(text=body)


async def download_file(request: web.Request) -> HeldFileResponse:
    """The stored bytes, with Range and ETag support. The name is looked up in the catalog,
    never joined into a path, so nothing outside the data directory can be reached."""
    name = request.match_info["filename"]
    record = await request.app[CATALOG].get(name)
    if record is None or record.location != IN_DATA_DIR or record.state == INVALID:
        raise web.HTTPNotFound(text=f"No such file: {name}")
    path = request.app[STORAGE].path_of(record.name, record.location)
    try:
        # Never blocking (a FIFO put there by hand would hold a thread for ever), never
        # following a symlink out of the data directory.
        descriptor = await asyncio.to_thread(
            os.open, path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        # Quarantined by its check just now, or replaced by hand by a symlink.
        if exc.errno not in (errno.ENOENT, errno.ELOOP):
            raise
        raise web.HTTPNotFound(text=f"No such file: {name}") from None
    try:
        # Preconditions first, then the Range (RFC 9110, section 13.2.2).
        await asyncio.to_thread(_refuse_failed_preconditions, request, descriptor, name)
        _refuse_unsatisfiable_range(request, record.size)
    except BaseException:
        os.close(descriptor)
        raise
    return HeldFileResponse(
        descriptor,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{record.name}"',
        },
    )


class HeldFileResponse(LoggedFileResponse):
    """aiohttp's FileResponse (Range, ETag, sendfile), logged as sent, of a file opened by the
    handler: a file moved away (to quarantine) between the handler and the send is still the
    file sent, not an empty 404. The descriptor is closed once sent, or when the response is
    dropped unsent."""

    def __init__(self, descriptor: int, **kwargs: Any) -> None:
        super().__init__(f"/proc/self/fd/{descriptor}", **kwargs)  # reopens the same file
        self._close_descriptor = weakref.finalize(self, os.close, descriptor)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(request)
        finally:
            self._close_descriptor()


def _refuse_failed_preconditions(request: web.Request, descriptor: int, name: str) -> None:
    """Not a regular file (replaced by hand): 404. If-Match and If-Unmodified-Since, judged as
    FileResponse judges them (same ETag), but answered 412 in the API's JSON rather than with
    an empty body."""
    stat = os.fstat(descriptor)
    if not S_ISREG(stat.st_mode):
        raise web.HTTPNotFound(text=f"No such file: {name}")
    etag = f"{stat.st_mtime_ns:x}-{stat.st_size:x}"
    if_match = request.if_match
    if if_match is not None:
        matches = (len(if_match) == 1 and if_match[0].value == ETAG_ANY) or any(
            tag.value == etag and not tag.is_weak for tag in if_match)
    else:
        since = request.if_unmodified_since
        matches = since is None or stat.st_mtime <= since.timestamp()
    if not matches:
        raise web.HTTPPreconditionFailed(
            text="The file is not the version If-Match or If-Unmodified-Since names")


def _refuse_unsatisfiable_range(request: web.Request, size: int) -> None:
    """A Range the file cannot satisfy (malformed, reversed, or starting past the end) is
    answered 416 here, in the API's JSON, rather than by FileResponse with an empty body.
    With If-Range, FileResponse decides (the Range may not apply at all)."""
    if hdrs.RANGE not in request.headers or hdrs.IF_RANGE in request.headers:
        return
    try:
        requested = request.http_range
    except ValueError:
        requested = None
    if requested is not None and (
            (requested.start is None and requested.stop is None)  # no range after all
            or (requested.start is not None and requested.start < 0)  # the last N bytes
            or ((requested.start or 0) < size)):
        return
    raise web.HTTPRequestRangeNotSatisfiable(
        text=f"Range {request.headers[hdrs.RANGE]!r} does not fit a file of {size} bytes",
        headers={hdrs.CONTENT_RANGE: f"bytes */{size}"})
