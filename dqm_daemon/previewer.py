"""Histogram previews for the file page, read by a child process of their own and kept in a
cache bounded by the memory it takes: a stored file never changes, so a preview is read once."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from .catalog import FileRecord
from .inspection_pool import ChildStartFailed, InspectorProcess
from .storage import Storage

# Previews kept in memory, by file content and object path: about this many bytes in all (a 1D
# preview holds up to MAX_BINS values, a 2D one (MAX_BINS / 2) squared, and titles of at most
# MAX_REASON_CHARS characters).
CACHED_BYTES = 64 * 1024 * 1024
# A failed read of a file's previews is said again without a new read for this long.
FAILED_READ_SECONDS = 300.0
MAX_BINS = 100
# What a preview costs in memory, roughly: a float in a list, and the dictionaries around.
BYTES_PER_VALUE = 32
BYTES_PER_PREVIEW = 1024


def _estimated_bytes(preview: dict[str, Any]) -> int:
    values = preview.get("values", [])
    count = sum(len(row) for row in values) if preview.get("dimensions") == 2 else len(values)
    texts = [preview.get("title", ""), preview.get("error", "")]
    texts += [axis.get("title", "") for axis in preview.get("axes", [])]
    count += sum(len(axis.get("edges") or ()) for axis in preview.get("axes", []))
    return BYTES_PER_PREVIEW + BYTES_PER_VALUE * count + sum(len(text) for text in texts)


class Previewer:
    def __init__(self, inspector: InspectorProcess, storage: Storage) -> None:
        self._inspector = inspector
        self._storage = storage
        self._cache: OrderedDict[tuple[str, str], tuple[dict[str, Any], int]] = OrderedDict()
        self._cached_bytes = 0
        # Whole reads that failed lately: (the error said, until when it is said again).
        self._failed: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}

    async def previews(self, record: FileRecord, object_paths: list[str]) -> dict[str, Any]:
        """Drawable contents of the named histograms of a stored file, by object path (only
        those not already cached are read)."""
        found: dict[str, Any] = {}
        now = time.monotonic()
        for key in [key for key, (_, until) in self._failed.items() if until <= now]:
            del self._failed[key]
        for object_path in object_paths:
            cached = self._cache.get((record.sha256, object_path))
            if cached is not None:
                self._cache.move_to_end((record.sha256, object_path))
                found[object_path] = cached[0]
            elif (failed := self._failed.get((record.sha256, object_path))) is not None:
                found[object_path] = failed[0]
        missing = [object_path for object_path in object_paths if object_path not in found]
        if missing:
            child_start_failed = False
            try:
                result = await self._inspector.previews(
                    self._storage.path_of(record.name, record.location), missing, MAX_BINS)
            except ChildStartFailed as exc:  # the page still shows, saying why
                result, child_start_failed = {"reason": str(exc)}, True
            read = result.get("previews")
            if read is None:
                # The whole read failed (the child did not start or crashed, the time limit):
                # said, and kept FAILED_READ_SECONDS only (a file that times out would hold the
                # one preview child at every view; a passing fault must not stay for good).
                failure = {"error": result.get("reason", "previews failed")}
                for object_path in missing:
                    found[object_path] = failure
                    if not child_start_failed:
                        self._failed[(record.sha256, object_path)] = (
                            failure, time.monotonic() + FAILED_READ_SECONDS)
            else:
                for object_path, preview in read.items():
                    found[object_path] = preview
                    self._remember((record.sha256, object_path), preview)
        return {object_path: found[object_path] for object_path in object_paths
                if object_path in found}

    def _remember(self, key: tuple[str, str], preview: dict[str, Any]) -> None:
        if key in self._cache:  # read twice by page views at the same moment: counted once
            self._cached_bytes -= self._cache.pop(key)[1]
        size = _estimated_bytes(preview)
        self._cache[key] = (preview, size)
        self._cached_bytes += size
        while self._cached_bytes > CACHED_BYTES and len(self._cache) > 1:
            _, (_, dropped) = self._cache.popitem(last=False)
            self._cached_bytes -= dropped

    async def close(self) -> None:
        await self._inspector.close()
