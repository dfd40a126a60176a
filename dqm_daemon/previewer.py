"""Histogram previews for the file page, read by a child process of their own and kept in a
cache bounded by the bin values it holds: a stored file never changes, so a preview is read
once."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .catalog import FileRecord
from .inspection_pool import InspectorProcess
from .storage import Storage

# Previews kept in memory, by file content and object path: at most this many bin values in all
# (a 1D preview holds up to MAX_BINS, a 2D one (MAX_BINS / 2) squared).
CACHED_VALUES = 1_000_000
MAX_BINS = 100


def _value_count(preview: dict[str, Any]) -> int:
    values = preview.get("values", [])
    return sum(len(row) for row in values) if preview.get("dimensions") == 2 else len(values)


class Previewer:
    def __init__(self, inspector: InspectorProcess, storage: Storage) -> None:
        self._inspector = inspector
        self._storage = storage
        self._cache: OrderedDict[tuple[str, str], tuple[dict[str, Any], int]] = OrderedDict()
        self._cached_values = 0

    async def previews(self, record: FileRecord, object_paths: list[str]) -> dict[str, Any]:
        """Drawable contents of the named histograms of a stored file, by object path (only
        those not already cached are read)."""
        found: dict[str, Any] = {}
        for object_path in object_paths:
            cached = self._cache.get((record.sha256, object_path))
            if cached is not None:
                self._cache.move_to_end((record.sha256, object_path))
                found[object_path] = cached[0]
        missing = [object_path for object_path in object_paths if object_path not in found]
        if missing:
            result = await self._inspector.previews(
                self._storage.path_of(record.name, record.location), missing, MAX_BINS)
            read = result.get("previews")
            if read is None:  # the whole read failed (a crash, the time limit): said, and kept
                read = {object_path: {"error": result.get("reason", "previews failed")}
                        for object_path in missing}
            for object_path, preview in read.items():
                found[object_path] = preview
                self._remember((record.sha256, object_path), preview)
        return {object_path: found[object_path] for object_path in object_paths
                if object_path in found}

    def _remember(self, key: tuple[str, str], preview: dict[str, Any]) -> None:
        if key in self._cache:  # read twice by page views at the same moment: counted once
            self._cached_values -= self._cache.pop(key)[1]
        count = _value_count(preview) + 1
        self._cache[key] = (preview, count)
        self._cached_values += count
        while self._cached_values > CACHED_VALUES and len(self._cache) > 1:
            _, (_, dropped) = self._cache.popitem(last=False)
            self._cached_values -= dropped

    async def close(self) -> None:
        await self._inspector.close()
