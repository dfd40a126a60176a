"""What changed since the previous file of the same agent and run: objects that disappeared or
appeared, objects whose class changed, histograms that became empty, entries that went
backwards."""

from __future__ import annotations

from typing import Any

# Each finding lists at most this many object paths (with the full count beside them).
MAX_LISTED_PATHS = 50


def _kind(class_name: str | None) -> str | None:
    """Histograms by dimension (TH1F and TH1D alike), any other class by its name."""
    if class_name and len(class_name) == 4 and class_name[:3] in ("TH1", "TH2", "TH3"):
        return class_name[:3]
    return class_name


def _finding(kind: str, paths: list[str], previous_file: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "count": len(paths),
        "objects": paths[:MAX_LISTED_PATHS],
        "previous_file": previous_file,
        **extra,
    }


def compare_with_previous(
    previous_file: str, previous_objects: list[dict[str, Any]], objects: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    before = {entry["path"]: entry for entry in previous_objects}
    now = {entry["path"]: entry for entry in objects}
    findings = []
    disappeared = sorted(before.keys() - now.keys())
    if disappeared:
        findings.append(_finding("objects_disappeared", disappeared, previous_file))
    appeared = sorted(now.keys() - before.keys())
    if appeared:
        findings.append(_finding("objects_appeared", appeared, previous_file))
    in_both = sorted(before.keys() & now.keys())
    class_changed = [path for path in in_both
                     if before[path].get("class") != now[path].get("class")]
    if class_changed:
        findings.append(_finding(
            "class_changed", class_changed, previous_file,
            classes={path: [before[path].get("class"), now[path].get("class")]
                     for path in class_changed[:MAX_LISTED_PATHS]},
        ))
    # Contents are compared only within one kind of object (a histogram's entries and a tree's
    # say different things; a TH1F that became a TH1D is still a 1D histogram).
    in_both = [path for path in in_both
               if _kind(before[path].get("class")) == _kind(now[path].get("class"))]
    became_empty = [path for path in in_both
                    if now[path].get("empty") is True and before[path].get("empty") is False]
    if became_empty:
        findings.append(_finding("histograms_became_empty", became_empty, previous_file))
    backwards = [
        path for path in in_both
        if isinstance(now[path].get("entries"), (int, float))
        and isinstance(before[path].get("entries"), (int, float))
        and now[path]["entries"] < before[path]["entries"]
    ]
    if backwards:
        findings.append(_finding(
            "entries_went_backwards", backwards, previous_file,
            entries={path: [before[path]["entries"], now[path]["entries"]]
                     for path in backwards[:MAX_LISTED_PATHS]},
        ))
    return findings
