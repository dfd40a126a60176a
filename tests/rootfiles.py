"""ROOT files written by uproot for the tests: the shapes DQM agents send."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import uproot
from uproot.writing.identify import to_TAxis, to_TH1x


def th1f(name: str, title: str, counts: list[float], low: float = 0.0, high: float = 1.0):
    """A TH1F (what AMORE agents mostly send) with the given in-range bin counts."""
    values = np.zeros(len(counts) + 2, dtype=np.float32)
    values[1:-1] = counts
    total = float(sum(counts))
    return to_TH1x(
        name,
        title,
        values,
        fEntries=total,
        fTsumw=total,
        fTsumw2=total,
        fTsumwx=0.0,
        fTsumwx2=0.0,
        fSumw2=np.zeros(len(values)),
        fXaxis=to_TAxis("xaxis", "", len(counts), low, high),
    )


def write_one_histogram_file(path: Path) -> Path:
    """The Overwatch receiver's test case: one TH1F named `test`."""
    with uproot.recreate(path) as root_file:
        root_file["test"] = th1f("test", "test", [1, 2, 3, 4])
    return path


def write_dqm_file(path: Path, n_histograms: int = 3) -> Path:
    """A typical DQM file: histograms at the top and in a directory, and a tree."""
    with uproot.recreate(path) as root_file:
        for index in range(n_histograms):
            root_file[f"hist{index}"] = th1f(f"hist{index}", f"histogram {index}", [index, 1, 2])
        root_file["detector/occupancy"] = (np.ones((4, 4)), np.arange(5.0), np.arange(5.0))
        tree = root_file.mktree("events", {"energy": np.float64})
        tree.extend({"energy": np.linspace(0.0, 1.0, 10)})
    return path
