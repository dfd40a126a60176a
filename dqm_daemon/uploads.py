"""Uploads in progress: who is sending what, how far they are, and the limit on how many at once."""

from __future__ import annotations

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

    def __len__(self) -> int:
        return len(self._active)

    def snapshot(self) -> list[UploadProgress]:
        return list(self._active.values())

    @contextlib.contextmanager
    def slot(self, uploader: str, agent: str, run: int) -> Iterator[UploadProgress]:
        """Hold one of the upload slots while streaming; none free → 503 with Retry-After."""
        if len(self._active) >= self._max_concurrent:
            raise web.HTTPServiceUnavailable(
                text=f"Too many uploads in progress ({self._max_concurrent}); retry later",
                headers={"Retry-After": str(self._retry_after_seconds)},
            )
        progress = UploadProgress(next(self._ids), uploader, agent, run, time.monotonic())
        self._active[progress.upload_id] = progress
        try:
            yield progress
        finally:
            del self._active[progress.upload_id]
