"""Uploads in progress: who is sending what, how far they are, and the limit on how many at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import Iterator

from aiohttp import web


@dataclasses.dataclass
class UploadProgress:
    upload_id: int
    uploader: str
    agent: str
    run: int
    started_monotonic: float
    received_bytes: int = 0

    @property
    def bytes_per_second(self) -> float:
        elapsed = time.monotonic() - self.started_monotonic
        return self.received_bytes / elapsed if elapsed > 0 else 0.0


class UploadsInProgress:
    def __init__(self, max_concurrent: int, retry_after_seconds: int) -> None:
        self._max_concurrent = max_concurrent
        self._retry_after_seconds = retry_after_seconds
        self._active: dict[int, UploadProgress] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        # When an upload last started or ended (for background work that yields to uploads).
        self.last_change_monotonic = time.monotonic()

    def __len__(self) -> int:
        return len(self._active)

    def snapshot(self) -> list[UploadProgress]:
        return list(self._active.values())

    def close(self) -> None:
        """Shutting down: uploads in flight go on, new ones are refused."""
        self._closed = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no upload is in flight; False if `timeout` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def check_free(self) -> None:
        """503 with Retry-After when no slot is free (or the receiver is stopping)."""
        if self._closed:
            raise web.HTTPServiceUnavailable(
                text="The receiver is shutting down; retry later",
                headers={"Retry-After": str(self._retry_after_seconds)},
            )
        if len(self._active) >= self._max_concurrent:
            raise web.HTTPServiceUnavailable(
                text=f"Too many uploads in progress ({self._max_concurrent}); retry later",
                headers={"Retry-After": str(self._retry_after_seconds)},
            )

    @contextlib.contextmanager
    def slot(self, uploader: str, agent: str, run: int) -> Iterator[UploadProgress]:
        """Hold one of the upload slots while streaming; none free → 503 with Retry-After."""
        self.check_free()
        progress = UploadProgress(next(self._ids), uploader, agent, run, time.monotonic())
        self._active[progress.upload_id] = progress
        self._idle.clear()
        self.last_change_monotonic = time.monotonic()
        try:
            yield progress
        finally:
            del self._active[progress.upload_id]
            self.last_change_monotonic = time.monotonic()
            if not self._active:
                self._idle.set()

    async def wait_quiet(self, quiet_seconds: float, at_most_seconds: float) -> None:
        """Wait until no upload has started or ended for `quiet_seconds` (a burst of uploads
        is over), but no longer than `at_most_seconds`."""
        deadline = time.monotonic() + at_most_seconds
        while (now := time.monotonic()) < deadline:
            quiet_since = now - self.last_change_monotonic
            if not self._active and quiet_since >= quiet_seconds:
                return
            await asyncio.sleep(min(quiet_seconds - quiet_since if not self._active
                                    else quiet_seconds, deadline - now))
