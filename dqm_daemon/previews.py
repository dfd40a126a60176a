"""Bin contents of histograms, coarsened for drawing. Runs in an inspection child, like
inspection itself, so a hostile file cannot hurt the daemon when a page asks for previews."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import uproot

from .inspection import (
    DIRECTORY_CLASSES,
    INVALID,
    OK,
    file_text,
    newest_keys,
    readable,
    short_reason,
)

# Bin values beyond this are drawn at it: scales computed from them stay finite.
MAX_DRAWN_VALUE = 1e150


def _coarsen(values: np.ndarray, axis: int, max_bins: int, average: bool) -> np.ndarray:
    """Merge neighbouring bins along `axis` until at most `max_bins` remain."""
    bins = values.shape[axis]
    factor = math.ceil(bins / max_bins)
    if factor <= 1:
        return values
    starts = np.arange(0, bins, factor)
    merged = np.add.reduceat(values, starts, axis=axis)
    if average:  # profiles hold means: merged bins are averaged, not summed
        sizes = np.diff(np.append(starts, bins)).astype(np.float64)
        shape = [1] * values.ndim
        shape[axis] = len(sizes)
        merged = merged / sizes.reshape(shape)
    return merged


def _variable_edges(edges: np.ndarray, bins: int, shown_bins: int) -> list[float] | None:
    """The edges of the shown (coarsened) bins of an axis whose bins differ in width, to draw
    each where it lies; None for equal bins (drawn evenly), or edges a file got wrong (not
    finite, not increasing: drawn evenly too)."""
    if len(edges) != bins + 1 or bins < 2:
        return None
    widths = np.diff(edges)
    if not (np.all(np.isfinite(edges)) and np.all(widths > 0)):
        return None
    if np.allclose(widths, widths[0], rtol=1e-6, atol=0.0):
        return None
    factor = math.ceil(bins / shown_bins)
    return [float(edge) for edge in edges[::factor]] + (
        [float(edges[-1])] if bins % factor else [])


def _axis_title(histogram: Any, index: int) -> str:
    axis = histogram.axes[index]
    return readable(str(axis.member("fTitle"))) if hasattr(axis, "member") else ""


def histogram_preview(histogram: Any, max_bins: int) -> dict[str, Any] | None:
    """Drawable contents of a 1D or 2D histogram (a 2D one on a grid of at most half
    `max_bins` a side); None for anything else. A file's numbers are not trusted: bins that
    are not finite are drawn empty, values are clipped so no scale overflows, and an axis whose
    range is not finite and increasing cannot be drawn (ValueError)."""
    dimensions = len(getattr(histogram, "axes", ()))
    if dimensions not in (1, 2):
        return None
    if dimensions == 2:
        max_bins = max(1, max_bins // 2)
    is_profile = histogram.classname.startswith("TProfile")
    values = np.asarray(histogram.values(flow=False), dtype=np.float64)
    values = np.clip(np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0),
                     -MAX_DRAWN_VALUE, MAX_DRAWN_VALUE)
    axes = []
    for index in range(dimensions):
        edges = np.asarray(histogram.axes[index].edges(), dtype=np.float64)
        low, high = float(edges[0]), float(edges[-1])
        if not (math.isfinite(low) and math.isfinite(high) and low < high
                and math.isfinite(high - low)):
            raise ValueError(f"axis {index + 1} runs from {low} to {high}: nothing to draw")
        bins = values.shape[index]
        values = _coarsen(values, index, max_bins, average=is_profile)
        axis = {"low": low, "high": high, "bins": int(values.shape[index]),
                "title": _axis_title(histogram, index)}
        if variable := _variable_edges(edges, bins, int(values.shape[index])):
            axis["edges"] = variable
        axes.append(axis)
    return {
        "title": readable(str(histogram.title)),  # a file's titles may run to megabytes
        "class": histogram.classname,
        "dimensions": dimensions,
        "axes": axes,
        "values": values.tolist(),
    }


def _keys_by_path(directory: Any, prefix: str, wanted: set[str], found: dict[str, Any]) -> None:
    """The keys of the wanted object paths, paths built as the analysis lists them (not looked
    up by name: a name may hold '/' or ';', which a lookup reads as a path or a cycle)."""
    for key in newest_keys(directory):
        path = f"{prefix}{file_text(key.fName)}"
        if path in wanted and path not in found:
            found[path] = key
        if key.fClassName in DIRECTORY_CLASSES and any(
                name.startswith(f"{path}/") for name in wanted):
            _keys_by_path(key.get(), f"{path}/", wanted, found)


def read_previews(path: str | Path, object_paths: list[str], max_bins: int) -> dict[str, Any]:
    previews: dict[str, Any] = {}
    try:
        with uproot.open(path, handler=uproot.source.file.MultithreadedFileSource) as root_file:
            keys: dict[str, Any] = {}
            _keys_by_path(root_file, "", set(object_paths), keys)
            for object_path in object_paths:
                try:
                    if object_path not in keys:
                        raise KeyError(f"no object {object_path!r} in the file")
                    preview = histogram_preview(keys[object_path].get(), max_bins)
                except Exception as exc:
                    previews[object_path] = {"error": short_reason(exc)}
                    continue
                if preview is not None:
                    previews[object_path] = preview
    except Exception as exc:
        return {"state": INVALID, "reason": short_reason(exc)}
    return {"state": OK, "previews": previews}
