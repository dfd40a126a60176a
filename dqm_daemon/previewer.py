"""Histogram previews for the file page, read by a child process of their own and kept in a
small cache: a stored file never changes, so its previews are read once."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .catalog import FileRecord
from .inspection_pool import InspectorProcess
from .storage import Storage

# Files whose previews are kept in memory (each holds at most max_previews coarse histograms).
CACHED_FILES = 32
MAX_BINS = 100


class Previewer:
    def __init__(self, inspector: InspectorProcess, storage: Storage) -> None:
        self._inspector = inspector
        self._storage = storage
        self._cache: OrderedDict[tuple[str, str, tuple[str, ...]], dict[str, Any]] = OrderedDict()

    async def previews(self, record: FileRecord, object_paths: list[str]) -> dict[str, Any]:
        """Drawable contents of the named histograms of a stored file, by object path."""
        key = (record.name, record.sha256, tuple(object_paths))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        result = await self._inspector.previews(
            self._storage.path_of(record.name, record.location), object_paths, MAX_BINS
        )
        previews = result.get("previews", {})
        self._cache[key] = previews
        if len(self._cache) > CACHED_FILES:
            self._cache.popitem(last=False)
        return previews

    async def close(self) -> None:
        await self._inspector.close()
