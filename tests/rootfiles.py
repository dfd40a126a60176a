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


def _axis(name: str, bins: int, low: float, high: float):
    return to_TAxis(name, name, bins, low, high)


def _counts_with_flow(columns: list[np.ndarray], bins: int, low: float, high: float,
                      weights: np.ndarray | None = None) -> np.ndarray:
    """Bin contents including under- and overflow along every axis (ROOT's layout)."""
    edges = [np.concatenate(([-np.inf], np.linspace(low, high, bins + 1), [np.inf]))] * len(columns)
    counts, _ = np.histogramdd(np.column_stack(columns), bins=edges, weights=weights)
    # ROOT stores x fastest: transpose numpy's C order (first index slowest).
    return counts.T.reshape(-1)


def _in_range(columns: list[np.ndarray], low: float, high: float) -> np.ndarray:
    inside = np.ones(len(columns[0]), dtype=bool)
    for column in columns:
        inside &= (column >= low) & (column < high)
    return inside


def histogram(name: str, title: str, columns: list[np.ndarray], bins: int = 20,
              low: float = 0.0, high: float = 1.0, dtype=np.float64,
              axis_titles: tuple[str, ...] = ("xaxis", "yaxis", "zaxis")):
    """A TH1/TH2/TH3 (F, D or I by dtype) filled with the sample columns, statistics as ROOT
    keeps them (sums over in-range entries)."""
    dimensions = len(columns)
    data = _counts_with_flow(columns, bins, low, high).astype(dtype)
    inside = _in_range(columns, low, high)
    x, *rest = [column[inside] for column in columns]
    total = float(inside.sum())
    sums = {"fEntries": float(len(columns[0])), "fTsumw": total, "fTsumw2": total,
            "fTsumwx": float(x.sum()), "fTsumwx2": float((x * x).sum())}
    axes = {"fXaxis": _axis(axis_titles[0], bins, low, high)}
    if dimensions >= 2:
        y = rest[0]
        sums.update(fTsumwy=float(y.sum()), fTsumwy2=float((y * y).sum()),
                    fTsumwxy=float((x * y).sum()))
        axes["fYaxis"] = _axis(axis_titles[1], bins, low, high)
    if dimensions == 3:
        z = rest[1]
        sums.update(fTsumwz=float(z.sum()), fTsumwz2=float((z * z).sum()),
                    fTsumwxz=float((x * z).sum()), fTsumwyz=float((rest[0] * z).sum()))
        axes["fZaxis"] = _axis(axis_titles[2], bins, low, high)
    builder = {1: to_TH1x, 2: uproot.writing.identify.to_TH2x,
               3: uproot.writing.identify.to_TH3x}[dimensions]
    return builder(name, title, data, fSumw2=np.zeros(len(data)), **sums, **axes)


def profile(name: str, title: str, columns: list[np.ndarray], values: np.ndarray,
            bins: int = 10, low: float = 0.0, high: float = 1.0):
    """A TProfile (one column) or TProfile2D (two columns) of `values`."""
    inside = _in_range(columns, low, high)
    sums_of_values = _counts_with_flow(columns, bins, low, high, weights=values)
    entries = _counts_with_flow(columns, bins, low, high)
    x = columns[0][inside]
    total = float(inside.sum())
    common = dict(
        fEntries=float(len(values)), fTsumw=total, fTsumw2=total,
        fTsumwx=float(x.sum()), fTsumwx2=float((x * x).sum()),
        fSumw2=_counts_with_flow(columns, bins, low, high, weights=values * values),
        fBinEntries=entries, fBinSumw2=np.zeros(len(entries)),
        fXaxis=_axis("xaxis", bins, low, high),
    )
    v = values[inside]
    if len(columns) == 1:
        return uproot.writing.identify.to_TProfile(
            name, title, sums_of_values, fTsumwy=float(v.sum()), fTsumwy2=float((v * v).sum()),
            **common)
    y = columns[1][inside]
    return uproot.writing.identify.to_TProfile2D(
        name, title, sums_of_values, fTsumwy=float(y.sum()), fTsumwy2=float((y * y).sum()),
        fTsumwxy=float((x * y).sum()), fTsumwz=float(v.sum()), fTsumwz2=float((v * v).sum()),
        fYaxis=_axis("yaxis", bins, low, high), **common)


def write_many_histograms_file(path: Path, n_histograms: int, n_directories: int = 10) -> Path:
    """A large DQM file: `n_histograms` TH1F spread over nested directories."""
    rng = np.random.default_rng(7)
    with uproot.recreate(path) as root_file:
        for index in range(n_histograms):
            directory = f"det{index % n_directories}/sub{index % 3}"
            name = f"h{index}"
            root_file[f"{directory}/{name}"] = histogram(
                name, f"histogram {index}", [rng.random(100)], bins=50, dtype=np.float32)
    return path


def write_shift_file(path: Path, seed: int = 1, events: int = 20_000) -> Path:
    """What a detector agent sends mid-run: rates, an occupancy map, cluster sizes, a profile."""
    rng = np.random.default_rng(seed)
    time_of_hit = rng.normal(50.0, 12.0, events)
    column, row = rng.normal(20.0, 6.0, events), rng.normal(20.0, 4.0, events)
    cluster_size = rng.exponential(3.0, events)
    energy = 0.8 * cluster_size + rng.normal(0.0, 0.5, events)
    with uproot.recreate(path) as root_file:
        root_file["hits/time"] = histogram("time", "Hit time", [time_of_hit], bins=60, low=0,
                                           high=100, dtype=np.float32,
                                           axis_titles=("time (ns)",))
        root_file["hits/occupancy"] = histogram(
            "occupancy", "Occupancy", [column, row], bins=40, low=0, high=40, dtype=np.float32,
            axis_titles=("column", "row"))
        root_file["clusters/size"] = histogram("size", "Cluster size", [cluster_size], bins=30,
                                               low=0, high=15, axis_titles=("pixels",))
        root_file["clusters/energy_vs_size"] = profile("energy_vs_size", "Energy vs size",
                                                       [cluster_size], energy, bins=15, low=0,
                                                       high=15)
        tree = root_file.mktree("events", {"time": np.float64, "size": np.float64})
        tree.extend({"time": time_of_hit[:1000], "size": cluster_size[:1000]})
    return path
