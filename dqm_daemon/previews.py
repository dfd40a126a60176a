"""Bin contents of histograms, coarsened for drawing. Runs in an inspection child, like
inspection itself, so a hostile file cannot hurt the daemon when a page asks for previews."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import uproot

from .inspection import INVALID, OK, short_reason


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


def _axis_title(histogram: Any, index: int) -> str:
    axis = histogram.axes[index]
    return str(axis.member("fTitle")) if hasattr(axis, "member") else ""


def histogram_preview(histogram: Any, max_bins: int) -> dict[str, Any] | None:
    """Drawable contents of a 1D or 2D histogram; None for anything else."""
    dimensions = len(getattr(histogram, "axes", ()))
    if dimensions not in (1, 2):
        return None
    is_profile = histogram.classname.startswith("TProfile")
    values = np.nan_to_num(np.asarray(histogram.values(flow=False), dtype=np.float64))
    axes = []
    for index in range(dimensions):
        edges = histogram.axes[index].edges()
        values = _coarsen(values, index, max_bins, average=is_profile)
        axes.append({"low": float(edges[0]), "high": float(edges[-1]),
                     "bins": int(values.shape[index]), "title": _axis_title(histogram, index)})
    return {
        "title": str(histogram.title),
        "class": histogram.classname,
        "dimensions": dimensions,
        "axes": axes,
        "values": values.tolist(),
    }


def read_previews(path: str | Path, object_paths: list[str], max_bins: int) -> dict[str, Any]:
    previews: dict[str, Any] = {}
    try:
        with uproot.open(path, handler=uproot.source.file.MultithreadedFileSource) as root_file:
            for object_path in object_paths:
                try:
                    preview = histogram_preview(root_file[object_path], max_bins)
                except Exception as exc:
                    previews[object_path] = {"error": short_reason(exc)}
                    continue
                if preview is not None:
                    previews[object_path] = preview
    except Exception as exc:
        return {"state": INVALID, "reason": short_reason(exc)}
    return {"state": OK, "previews": previews}
