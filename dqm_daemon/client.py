"""The reference uploader: `dqm-daemon upload FILE... --url URL --run N --agent NAME`.

Streams each file from disk with its SHA-256 as `Repr-Digest`, shows progress, retries network
errors, 5xx, 408 and 429 with backoff (honouring Retry-After) and stops at any other 4xx, or a
redirect, with the server's message. A retry sends the same name and digest, so it never stores
a second copy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from .page_format import human_bytes

CHUNK_BYTES = 1024 * 1024
LOCKED_WAIT_SECONDS = 15
# How long an abandoned resumable upload is asked to be dropped (see `_terminate`).
TERMINATE_SECONDS = 5.0
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_GAVE_UP = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it


class UploadRefused(Exception):
    """The daemon answered 4xx: retrying the same upload cannot help."""

    def __init__(self, status: int, message: str, filename: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message
        self.filename = filename  # the name an invalid file was kept under (quarantined)


class GaveUp(Exception):
    """Every attempt failed on the network or with a server error."""


@dataclass(frozen=True)
class UploadOptions:
    url: str
    token: str
    run: int
    agent: str
    timestamp: int | None  # None: the file's modification time (the same on every retry)
    data_status: int
    retries: int = 5
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    # Files at least this large go through the resumable (tus) endpoints: a dropped link
    # resumes where it stopped instead of starting again.
    resumable_threshold: int = 64 * 1024 * 1024


class Progress:
    """Bytes, rate and ETA: redrawn in place on a terminal, a plain line every 10% otherwise."""

    def __init__(self, label: str, total: int, stream: TextIO) -> None:
        self.label, self.total, self.stream = label, total, stream
        self.sent = 0
        self._sent_before = 0  # bytes the daemon had when this attempt began (a resume)
        self.started = time.monotonic()
        self._drawn_at = 0.0
        self._next_tenth = 1
        self._terminal = stream.isatty()

    def advance(self, count: int) -> None:
        self.sent += count
        now = time.monotonic()
        if self._terminal and now - self._drawn_at >= 0.1:
            self._drawn_at = now
            self.stream.write(f"\r{self._line(now)}   ")
            self.stream.flush()
        elif not self._terminal and self.total and self.sent * 10 >= self._next_tenth * self.total:
            self._next_tenth = self.sent * 10 // self.total + 1
            self.stream.write(self._line(now) + "\n")

    def restart(self, offset: int = 0) -> None:
        """A new attempt, from `offset` (what the daemon has of a resumable upload): the rate
        counts only the bytes of this attempt."""
        self.sent = self._sent_before = offset
        self.started = time.monotonic()
        self._next_tenth = offset * 10 // self.total + 1 if self.total else 1

    def done(self) -> None:
        if self._terminal:
            self.stream.write(f"\r{self._line(time.monotonic())}\n")
            self._drawn_at = 0.0

    def note(self, message: str) -> None:
        """A message of its own line, not written over the progress redrawn in place."""
        if self._terminal and self._drawn_at:
            self.stream.write("\n")
            self._drawn_at = 0.0
        self.stream.write(message + "\n")

    def _line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        rate = (self.sent - self._sent_before) / elapsed
        eta = (self.total - self.sent) / rate if rate else 0
        percent = 100 * self.sent / self.total if self.total else 100
        # Units scaled to the file: a 24 KB file is not "0.0/0.0 MiB".
        return (f"{self.label}: {percent:5.1f}% {human_bytes(self.sent)}/"
                f"{human_bytes(self.total)} {human_bytes(rate)}/s ETA {eta:,.0f} s")


def sha256_of(path: Path, stop: threading.Event | None = None) -> bytes:
    """The file's SHA-256; stops part way (CancelledError) once `stop` is set."""
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            if stop is not None and stop.is_set():
                raise asyncio.CancelledError
            digest.update(chunk)
    return digest.digest()


async def _sha256(path: Path) -> bytes:
    """`sha256_of` in a thread, which a Ctrl-C stops at once (the interpreter waits for its
    threads before it exits: hashing gigabytes to the end would hold it up)."""
    stop = threading.Event()
    try:
        return await asyncio.to_thread(sha256_of, path, stop)
    finally:
        stop.set()


async def _file_body(path: Path, progress: Progress, offset: int = 0) -> AsyncIterator[bytes]:
    with open(path, "rb") as source:
        source.seek(offset)
        while chunk := await asyncio.to_thread(source.read, CHUNK_BYTES):
            progress.advance(len(chunk))
            yield chunk


def _retry_delay(attempt: int, options: UploadOptions, retry_after: str | None) -> float:
    """Retry-After when the server gives one (capped: a proxy may ask for a day), otherwise
    exponential backoff."""
    if retry_after and retry_after.strip().isdigit():
        return min(float(retry_after), options.max_backoff_seconds)
    return min(options.backoff_seconds * 2**attempt, options.max_backoff_seconds)


def _upload_headers(path: Path, options: UploadOptions, digest: bytes) -> dict[str, str]:
    """The DQM headers; the same on every attempt, so a retry is recognised as the same file."""
    timestamp = options.timestamp if options.timestamp is not None else int(path.stat().st_mtime)
    return {
        "token": options.token,
        "runNumber": str(options.run),
        "timeStamp": str(timestamp),
        "amoreAgent": options.agent,
        "dataStatus": str(options.data_status),
        "Repr-Digest": f"sha-256=:{base64.b64encode(digest).decode()}:",
    }


async def upload_file(session: aiohttp.ClientSession, path: Path, options: UploadOptions,
                      progress_stream: TextIO) -> dict[str, Any]:
    """Upload one file; the daemon's answer (200 or 202) or UploadRefused / GaveUp."""
    size = path.stat().st_size
    digest = await _sha256(path)
    headers = _upload_headers(path, options, digest)
    if size >= options.resumable_threshold:
        return await _resumable_upload(session, path, options, headers, size, progress_stream)
    headers.update({"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    progress = Progress(path.name, size, progress_stream)
    last_problem = ""
    for attempt in range(options.retries + 1):
        progress.restart()
        try:
            async with session.post(f"{options.url.rstrip('/')}/rest/api/files",
                                    data=_file_body(path, progress), headers=headers,
                                    allow_redirects=False) as answer:
                body = await _json_or_text(answer)
                if (answer.status in (200, 202) and isinstance(body, dict)
                        and {"filename", "sha256"} <= body.keys()):
                    progress.done()
                    return body
                _refuse_for_good(answer, body)
                message = body.get("message", "") if isinstance(body, dict) else body
                last_problem = f"{answer.status}: {message}"
                delay = _retry_delay(attempt, options, answer.headers.get("Retry-After"))
        except aiohttp.ClientSSLError as exc:
            raise GaveUp(f"{path.name}: TLS failed, retrying cannot help ({exc})") from None
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            last_problem = f"{type(exc).__name__}: {exc}"
            delay = _retry_delay(attempt, options, None)
        if attempt < options.retries:
            progress.note(f"{path.name}: {last_problem}; retrying in {delay:g} s")
            await asyncio.sleep(delay)
    raise GaveUp(f"{path.name}: gave up after {options.retries + 1} attempts ({last_problem})")


TUS = {"Tus-Resumable": "1.0.0"}


async def _resumable_upload(session: aiohttp.ClientSession, path: Path, options: UploadOptions,
                            headers: dict[str, str], size: int,
                            progress_stream: TextIO) -> dict[str, Any]:
    """Create a tus upload, then PATCH from wherever the daemon says it stands, until done.
    An upload left unfinished (given up, refused, Ctrl-C) is terminated: nothing could resume
    it (its address is not kept), and the daemon would hold its bytes, and the disk it
    reserved for the rest, until it expires."""
    upload = _ResumableUpload(session, path, options, headers, size, progress_stream)
    try:
        return await upload.run()
    except BaseException:
        if upload.location is not None and not upload.finished:
            await _terminate(session, upload.location, options.token)
        raise


class _ResumableUpload:
    def __init__(self, session: aiohttp.ClientSession, path: Path, options: UploadOptions,
                 headers: dict[str, str], size: int, progress_stream: TextIO) -> None:
        self.session, self.path, self.options = session, path, options
        self.headers, self.size = headers, size
        self.progress = Progress(path.name, size, progress_stream)
        self.location: str | None = None  # the upload's address once created
        self.finished = False  # the daemon has the whole file (stored, or refused as invalid)

    def _finish(self, headers: Any) -> dict[str, Any]:
        self.finished = True
        return _finished(headers)

    async def run(self) -> dict[str, Any]:
        session, path, options, size = self.session, self.path, self.options, self.size
        base = options.url.rstrip("/")
        progress = self.progress
        last_problem = ""
        attempt, best_offset = 0, -1
        while attempt <= options.retries:
            try:
                if self.location is None:
                    async with session.post(f"{base}/rest/api/uploads/", headers={
                            **self.headers, **TUS, "Upload-Length": str(size)},
                            allow_redirects=False) as answer:
                        if answer.status != 201:
                            await _refuse_or_retry(answer)
                        self.location = base + answer.headers["Location"]
                async with session.head(self.location, headers={"token": options.token, **TUS},
                                        allow_redirects=False) as answer:
                    if answer.status == 404:
                        self.location = None  # expired: start a new upload (the daemon dedups)
                        raise aiohttp.ClientError("the unfinished upload expired")
                    if answer.status != 200:
                        await _refuse_or_retry(answer)
                    if "DQM-Filename" in answer.headers:
                        return self._finish(answer.headers)
                    offset = int(answer.headers["Upload-Offset"])
                if offset > best_offset:  # progress since the last try: the retries start afresh
                    attempt, best_offset = 0, offset
                progress.restart(offset)
                async with session.patch(self.location, data=_file_body(path, progress, offset),
                                         headers={
                        "token": options.token, **TUS, "Upload-Offset": str(offset),
                        "Content-Type": "application/offset+octet-stream",
                        "Content-Length": str(size - offset)}, allow_redirects=False) as answer:
                    if answer.status != 204:
                        await _refuse_or_retry(answer)
                    if "DQM-Filename" in answer.headers:
                        progress.done()
                        return self._finish(answer.headers)
                attempt += 1  # the PATCH ended early: ask where we stand
                continue
            except UploadRefused:
                raise
            except aiohttp.ClientSSLError as exc:
                raise GaveUp(f"{path.name}: TLS failed, retrying cannot help ({exc})") from None
            except _RetryLater as exc:
                last_problem, delay = str(exc), _retry_delay(attempt, options, exc.retry_after)
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError) as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
                delay = _retry_delay(attempt, options, None)
            if attempt < options.retries:
                progress.note(f"{path.name}: {last_problem}; resuming in {delay:g} s")
                await asyncio.sleep(delay)
            attempt += 1
        raise GaveUp(f"{path.name}: gave up after {options.retries + 1} attempts without "
                     f"progress ({last_problem})")


async def _terminate(session: aiohttp.ClientSession, location: str, token: str) -> None:
    """Best effort, for TERMINATE_SECONDS at most: ask the daemon to drop an unfinished
    resumable upload (tus termination). A PATCH just cut on our side may still hold it (423)
    until the daemon notices the cut."""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
        async with asyncio.timeout(TERMINATE_SECONDS):
            while True:
                async with session.delete(location, headers={"token": token, **TUS},
                                          allow_redirects=False) as answer:
                    if answer.status != 423:
                        return
                await asyncio.sleep(0.2)


class _RetryLater(Exception):
    def __init__(self, message: str, retry_after: str | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


async def _json_or_text(answer: aiohttp.ClientResponse) -> dict[str, Any] | str:
    """The daemon answers JSON; a proxy in between may not."""
    text = await answer.text(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()[:300] or (answer.reason or "")


# 4xx answers worth another try: the link stalled (408), slow down (429).
RETRIED_REFUSALS = frozenset({408, 429})
# And for a resumable upload: the offset moved (409), another request holds the upload (423),
# a chunk was damaged (460): ask where it stands and go on.
RETRIED_RESUMABLE_REFUSALS = RETRIED_REFUSALS | {409, 423, 460}


def _refuse_for_good(answer: aiohttp.ClientResponse, body: dict[str, Any] | str,
                     retried: frozenset[int] = RETRIED_REFUSALS) -> None:
    """Raise UploadRefused for an answer another try cannot change: a 4xx (but `retried`), a
    redirect (never followed: it would turn the upload into a GET, and could take the token
    to another host), or a success that is not the daemon's."""
    message = body.get("message", "") if isinstance(body, dict) else body
    if isinstance(body, dict) and body.get("reason"):  # why a file is not sound ROOT
        message = f"{message} ({body['reason']})"
    if 300 <= answer.status < 400:
        raise UploadRefused(answer.status, f"redirected to {answer.headers.get('Location')!r};"
                            " give the receiver's own address as --url")
    if 400 <= answer.status < 500 and answer.status not in retried:
        raise UploadRefused(answer.status, message,
                            body.get("filename") if isinstance(body, dict) else None)
    if 200 <= answer.status < 300:
        raise UploadRefused(answer.status, f"not an answer of dqm-daemon: {str(body)[:300]}")


async def _refuse_or_retry(answer: aiohttp.ClientResponse) -> None:
    """Refuse the file for good (see `_refuse_for_good`), or raise _RetryLater."""
    body = await _json_or_text(answer)
    message = body.get("message", "") if isinstance(body, dict) else body
    _refuse_for_good(answer, body, RETRIED_RESUMABLE_REFUSALS)
    # A PATCH cut off on our side may hold the upload until the daemon's read timeout.
    retry_after = str(LOCKED_WAIT_SECONDS) if answer.status == 423 else None
    raise _RetryLater(f"{answer.status}: {message}",
                      answer.headers.get("Retry-After") or retry_after)


def _finished(headers: Any) -> dict[str, Any]:
    state = headers.get("DQM-State")
    if state == "invalid":
        raise UploadRefused(400, "Successfully received the file, but the file is not valid! "
                            f"({headers.get('DQM-Reason', '')})", headers.get("DQM-Filename"))
    return {"status": 200 if state == "ok" else 202, "filename": headers["DQM-Filename"],
            "sha256": headers["DQM-Sha256"], "state": state}


async def upload_all(paths: list[Path], options: UploadOptions, as_json: bool,
                     out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    exit_code = EXIT_OK
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for path in paths:
            try:
                answer = await upload_file(session, path, options, err)
            except UploadRefused as exc:
                err.write(f"{path}: refused ({exc.status}): {exc.message}\n")
                result = {"file": str(path), "status": exc.status, "message": exc.message}
                if exc.filename:  # kept, quarantined, under this name
                    result["filename"] = exc.filename
                exit_code = max(exit_code, EXIT_REFUSED)
            except GaveUp as exc:
                err.write(f"{exc}\n")
                result = {"file": str(path), "status": None, "message": str(exc)}
                exit_code = max(exit_code, EXIT_GAVE_UP)
            except OSError as exc:
                if isinstance(exc, aiohttp.ClientError):
                    raise  # the network's, not the file's (retried until GaveUp)
                # Removed or unreadable since the command started: the others still go.
                message = f"cannot be read: {exc.strerror or exc}"
                err.write(f"{path}: {message}\n")
                result = {"file": str(path), "status": None, "message": message}
                exit_code = max(exit_code, EXIT_USAGE)
            else:
                result = {"file": str(path), "status": answer["status"],
                          "filename": answer["filename"], "sha256": answer["sha256"],
                          "state": answer.get("state")}
                if not as_json:
                    out.write(f"{path} -> {answer['filename']} sha256 {answer['sha256']} "
                              f"({answer.get('state')})\n")
            if as_json:
                out.write(json.dumps(result) + "\n")
    return exit_code
