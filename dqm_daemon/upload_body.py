"""An upload's body, from the socket to the disk in one thread of its own.

The event loop only reads the request's head. For the body, the handler takes the connection's
socket over (`detach_body`): what aiohttp has already buffered is drained, the transport stops
reading, and a thread reads the rest with `recv_into` into one reused buffer, finds the file's
bytes (a raw body, or the multipart field `file`, without copying), hashes and writes them, and
fsyncs the file at the end. That is the least work a receiver that proves integrity can do, and
it leaves the event loop free for the status page, health checks and other agents. The
connection is closed after the answer: aiohttp's parser never saw the body, so the connection
cannot carry another request.

Bodies the loop must decode (chunked transfer, a Content-Encoding, TLS) take the same path in
the thread, their chunks fetched from aiohttp's stream through the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor

from aiohttp import web

from .cancellation import run_to_the_end
from .multipart_body import (
    MalformedMultipart,
    MultipartField,
    boundary_from_content_type,
)
from .settings import Settings
from .storage import IncomingFile, Storage
from .uploads import UploadProgress

FILE_FIELD = "file"
# The niceness of the threads that read, hash and write upload bodies (the event loop's is 0).
UPLOAD_THREAD_NICENESS = 5
# After refusing a body part way, read and drop the rest for this long at most, so the client
# (still sending) is not cut off by a reset before it reads the answer (as aiohttp lingers).
DRAIN_SECONDS = 10.0
# Marks a request whose connection cannot be reused (see `close_detached_connections`).
BODY_DETACHED = web.RequestKey("body_detached", bool)

Chunks = Iterator[tuple[bytes | bytearray, int]]  # (buffer, how many bytes of it are new)


class BodySink:
    """Where the body's bytes go, in the upload's thread: the file's bytes are picked out of
    the body, counted against the limits, hashed and written, and fsynced at the end."""

    def __init__(self, request: web.Request, incoming: IncomingFile, progress: UploadProgress,
                 settings: Settings, storage: Storage) -> None:
        self._incoming = incoming
        self._progress = progress
        self._settings = settings
        self._storage = storage
        self._body_bytes = 0  # received, the multipart framing included
        self._unchecked_bytes = 0  # written since free space was last looked at
        self._multipart: MultipartField | None = None
        if request.content_type.startswith("multipart/"):
            try:
                boundary = boundary_from_content_type(request.headers.get("Content-Type", ""))
                self._multipart = MultipartField(boundary, FILE_FIELD)
            except MalformedMultipart as exc:
                raise web.HTTPBadRequest(text=f"Malformed multipart body: {exc}") from None

    def write(self, data: bytes | bytearray, end: int) -> None:
        settings = self._settings
        self._body_bytes += end
        if self._body_bytes > settings.max_upload_bytes:
            raise web.HTTPRequestEntityTooLarge(
                max_size=settings.max_upload_bytes, actual_size=self._body_bytes,
                text=f"Upload exceeds the maximum of {settings.max_upload_bytes} bytes")
        if self._multipart is None:
            self._write_file_bytes(memoryview(data)[:end])
            return
        try:
            pieces = self._multipart.feed(data, end)
        except MalformedMultipart as exc:
            raise web.HTTPBadRequest(text=f"Malformed multipart body: {exc}") from None
        for piece in pieces:
            self._write_file_bytes(piece)

    def _write_file_bytes(self, piece: memoryview) -> None:
        self._progress.received_bytes += piece.nbytes
        self._unchecked_bytes += piece.nbytes
        if self._unchecked_bytes >= self._settings.chunk_bytes:  # about once per chunk
            self._unchecked_bytes = 0
            room = self._storage.free_bytes() - piece.nbytes
            if room < self._settings.disk_reserve_bytes:
                raise web.HTTPInsufficientStorage(
                    text="Free disk space fell below the reserve during the upload; "
                    "nothing was kept")
        self._incoming.write_now(piece)

    def finish(self) -> None:
        """The body has ended: a multipart body must have been complete; the file is flushed
        to stable storage."""
        if self._multipart is not None:
            try:
                self._multipart.finish()
            except MalformedMultipart as exc:
                raise web.HTTPBadRequest(text=f"Malformed multipart body: {exc}") from None
        self._incoming.finish_now()


class SocketBody:
    """The rest of a Content-Length body, read straight from the connection's socket.

    While the thread reads, the socket is blocking, with the read timeout as SO_RCVTIMEO: one
    system call per wake-up, where a Python timeout costs a poll and a failed read besides.
    The connection's descriptors share that mode, so it is set back to non-blocking (as the
    event loop needs it) before the thread lets go; the loop neither reads (paused) nor writes
    (no answer before the body is read) meanwhile."""

    def __init__(self, connection: socket.socket, first: list[bytes], remaining: int,
                 buffer_bytes: int, read_timeout: float) -> None:
        self._connection = connection
        self._first = first
        self._remaining = remaining
        # No larger than the rest of the body (most DQM files are far smaller than a chunk),
        # and allocated by the reading thread, not the event loop.
        self._buffer_bytes = max(1, min(buffer_bytes, remaining))
        self._buffer: bytearray | None = None
        self._read_timeout = read_timeout

    def _own(self) -> None:
        """In the reading thread: blocking reads, the read timeout as SO_RCVTIMEO."""
        seconds, fraction = divmod(self._read_timeout, 1)
        # At least a microsecond: a timeout of zero would mean none at all.
        microseconds = max(int(fraction * 1_000_000), 0 if seconds else 1)
        self._connection.setblocking(True)
        self._connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                    struct.pack("ll", int(seconds), microseconds))

    def chunks(self) -> Chunks:
        for chunk in self._first:
            yield chunk, len(chunk)
        self._first = []
        self._own()
        buffer = self._reading_buffer()
        view = memoryview(buffer)
        # Gather the whole rest when it fits (then it is passed on in one piece), otherwise at
        # least half a buffer before passing it on: fewer, larger hashes and writes than one
        # per segment the network delivers. Never zero: every turn reads.
        fill_target = len(view) if len(view) >= self._remaining else len(view) // 2
        while self._remaining > 0:
            filled = 0
            while filled < fill_target and self._remaining > 0:
                try:
                    got = self._connection.recv_into(
                        view[filled:], min(len(view) - filled, self._remaining))
                except BlockingIOError:  # SO_RCVTIMEO ran out
                    raise _read_timeout(self._read_timeout) from None
                if got == 0:
                    raise web.HTTPBadRequest(text="The client closed the connection before "
                                             "the end of the body; nothing was kept")
                filled += got
                self._remaining -= got
            yield buffer, filled

    def _reading_buffer(self) -> bytearray:
        if self._buffer is None:
            self._buffer = bytearray(self._buffer_bytes)
        return self._buffer

    def drain(self) -> None:
        """The body was refused part way: drop the rest of it for DRAIN_SECONDS at most."""
        deadline = time.monotonic() + DRAIN_SECONDS
        view = memoryview(self._reading_buffer())
        with contextlib.suppress(OSError):  # a timeout or a reset: the client is gone
            while self._remaining > 0 and (left := deadline - time.monotonic()) > 0:
                self._connection.settimeout(left)
                got = self._connection.recv_into(view, min(len(view), self._remaining))
                if got == 0:
                    return
                self._remaining -= got

    def abort(self) -> None:
        """Unblock the reading thread (the upload is being cancelled)."""
        with contextlib.suppress(OSError):
            self._connection.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._connection.setblocking(False)  # the event loop's mode, for its answer
        self._connection.close()  # our duplicate only; the transport closes its own


class StreamBody:
    """A body aiohttp must decode, fetched chunk by chunk from its stream on the event loop."""

    def __init__(self, request: web.Request, first: list[bytes], read_timeout: float) -> None:
        self._request = request
        self._first = first
        self._read_timeout = read_timeout
        self._loop = asyncio.get_running_loop()
        self._aborted = threading.Event()

    async def _read(self) -> bytes:
        try:
            async with asyncio.timeout(self._read_timeout):
                return await self._request.content.readany()
        except TimeoutError:
            raise _read_timeout(self._read_timeout) from None

    def chunks(self) -> Chunks:
        for chunk in self._first:
            yield chunk, len(chunk)
        self._first = []
        while not self._aborted.is_set():
            pending = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
            # The read itself times out after read_timeout; this only guards a stopped loop.
            chunk = pending.result(self._read_timeout + DRAIN_SECONDS)
            if not chunk:
                return
            yield chunk, len(chunk)
        raise ConnectionAbortedError("the upload was cancelled")

    def drain(self) -> None:
        pass  # aiohttp reads and drops the rest itself (its lingering close)

    def abort(self) -> None:
        self._aborted.set()

    def close(self) -> None:
        pass


def _read_timeout(seconds: float | None) -> web.HTTPRequestTimeout:
    return web.HTTPRequestTimeout(text=f"No data received for {seconds} s; upload dropped")


def _drain_buffered(request: web.Request) -> list[bytes]:
    """What aiohttp has already read of the body. Draining may let aiohttp's parser hand over
    bytes it held back, so drain until nothing is left."""
    drained = []
    while chunk := request.content.read_nowait():
        drained.append(chunk)
    return drained


def detach_body(request: web.Request, settings: Settings) -> SocketBody | StreamBody:
    """The body's source: the socket itself when the rest of the body is plain bytes on a plain
    TCP connection, aiohttp's stream otherwise."""
    transport = request.transport
    plain = (
        transport is not None
        and transport.get_extra_info("sslcontext") is None
        and transport.get_extra_info("socket") is not None
        and request.content_length is not None
        and "Transfer-Encoding" not in request.headers
        and request.headers.get("Content-Encoding", "identity").lower() == "identity"
        # The thread makes the socket blocking, for the event loop too (one file description):
        # an earlier answer (or the 100 Continue) still waiting to be sent would then block
        # the loop in send() until this client reads.
        and transport.get_write_buffer_size() == 0
    )
    first = _drain_buffered(request)
    if not plain or request.content.is_eof():
        return StreamBody(request, first, settings.read_timeout_seconds)
    assert transport is not None and request.content_length is not None
    request[BODY_DETACHED] = True
    remaining = request.content_length - request.content.total_bytes
    # aiohttp's payload ends here, so it waits for nothing more (this resumes reading)...
    request.content.feed_eof()
    # ...and from here on the loop reads nothing from this connection: the thread does.
    transport.pause_reading()
    connection = transport.get_extra_info("socket").dup()
    return SocketBody(connection, first, remaining, settings.chunk_bytes,
                      settings.read_timeout_seconds)


# At most this much is dropped of what follows a detached body when its answer is sent.
AFTER_BODY_DROP_BYTES = 1024 * 1024


async def close_detached_connections(request: web.Request,
                                     response: web.StreamResponse) -> None:
    """on_response_prepare: the answer to a detached body closes its connection. Bytes the
    client sent after the body (a pipelined request, a Content-Length too short) are dropped
    first: closing a socket with unread input makes the kernel reset the connection, and the
    answer still on its way would be lost."""
    if request.get(BODY_DETACHED):
        response.force_close()
        response.headers["Connection"] = "close"
        connection = request.transport.get_extra_info("socket") if request.transport else None
        if connection is not None:  # non-blocking, as the event loop keeps it
            dropped = 0
            with contextlib.suppress(OSError):  # nothing more (EAGAIN), or the client is gone
                while dropped < AFTER_BODY_DROP_BYTES and (
                        got := len(os.read(connection.fileno(), 65536))):
                    dropped += got


async def receive_body(request: web.Request, incoming: IncomingFile, progress: UploadProgress,
                       settings: Settings, storage: Storage, threads: Executor) -> None:
    """Stream the body's file into `incoming` in a thread of the upload's own, and fsync it."""
    sink = BodySink(request, incoming, progress, settings, storage)
    body = detach_body(request, settings)

    def pump() -> None:
        _yield_to_the_event_loop()
        try:
            chunks = body.chunks()
            for data, end in chunks:
                try:
                    sink.write(data, end)
                except (web.HTTPException, OSError):  # a refusal, or the disk (full, failing)
                    chunks.close()
                    body.drain()  # so the client reads the answer (400, 413, 507) not a reset
                    raise
            sink.finish()
        finally:
            body.close()

    await run_to_the_end(asyncio.get_running_loop().run_in_executor(threads, pump), body.abort)


def _yield_to_the_event_loop() -> None:
    """Lower this upload thread's CPU priority a little: with the cores saturated by uploads,
    the event loop (health checks, the status page, other agents' requests) still gets them
    first. Linux gives each thread its own niceness; elsewhere this does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, thread) < UPLOAD_THREAD_NICENESS:
            os.setpriority(os.PRIO_PROCESS, thread, UPLOAD_THREAD_NICENESS)
