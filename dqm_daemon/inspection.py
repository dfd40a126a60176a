"""What a ROOT file holds. Runs in an inspection child process, never in the daemon: a hostile
file can at worst exhaust the child's memory cap or time limit.

Two passes:
- the check (`inspect_file`), which an upload waits for: the file's structure read directly
  (`root_structure`): valid means the file is complete, its directories read, and every key's
  payload lies inside the file and is framed as declared. It lists every object by path, class
  and title.
- the analysis (`analyse_file`), done later at low priority: every object decompressed, read
  with uproot and summarised (entries, axes, means, integrals, tree sizes, list members). A
  payload that does not decompress fails the analysis (the file page says so); a class uproot
  cannot interpret is listed by its stored class name, `interpreted: false`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import uproot

from .root_structure import Entry, StructureError, read_structure

OK, INVALID, FAILED = "ok", "invalid", "failed"
# The check could not read the file (gone, or an I/O fault): a fault of the daemon's disk, not a
# verdict on the file, which stays pending.
UNREADABLE = "unreadable"
ROOT_MAGIC = b"root"
# A file declaring more objects than this is listed only up to it (flagged `objects_truncated`),
# and so is one whose listing would hold more characters (paths, classes, titles, members):
# a file of a few MB, deep directories of long names, would list gigabytes.
MAX_LISTED_OBJECTS = 100_000
MAX_LISTED_CHARS = 8 * 1024 * 1024
# A list with more members than this names only the first ones (with `member_count` beside).
MAX_LISTED_MEMBERS = 1000
DIRECTORY_CLASSES = ("TDirectory", "TDirectoryFile")
LIST_CLASSES = ("TList", "TObjArray", "THashList", "TMap", "TClonesArray")
PROFILE_CLASSES = ("TProfile", "TProfile2D", "TProfile3D")
AXIS_NAMES = ("x", "y", "z")
# A reason longer than this is cut (a hostile file's object names can be megabytes long).
MAX_REASON_CHARS = 300
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


class InvalidFile(Exception):
    """The file is not sound ROOT; the message is the short reason kept in the catalog."""


def received_entry(name: str, class_name: str) -> str:
    """The Overwatch receiver's description of a top-level object. A directory's key stores
    the class `TDirectory`, which ROOT reads as a `TDirectoryFile`: the receiver named that."""
    if class_name == "TDirectory":
        class_name = "TDirectoryFile"
    return f"Obj name: {name}, Obj IsA() Name: {class_name}"


def inspect_file(path: Path) -> dict[str, Any]:
    """Check one file; returns a JSON-able result with `state` "ok" or "invalid"."""
    try:
        structure = read_structure(path, MAX_LISTED_OBJECTS, MAX_LISTED_CHARS)
        objects = [_listed(entry) for entry in structure.entries]
        received = {entry.path: received_entry(entry.path, entry.class_name)
                    for entry in structure.entries if entry.top_level}
        truncated = structure.truncated
    except (InvalidFile, StructureError) as exc:
        result: dict[str, Any] = {"state": INVALID, "reason": readable(str(exc))}
    except OSError as exc:
        result = {"state": UNREADABLE, "missing": isinstance(exc, FileNotFoundError),
                  "reason": short_reason(exc).replace(str(path), "the file")}
    except MemoryError:
        result = {"state": INVALID, "reason": "inspection exceeded the memory cap"}
    except Exception as exc:  # uproot raises many kinds on hostile input; all mean "not sound"
        # The daemon's own paths are nobody else's business.
        result = {"state": INVALID, "reason": short_reason(exc).replace(str(path), "the file")}
    else:
        result = {
            "state": OK,
            "objects": objects,
            "objects_truncated": truncated,
            "received": received,
        }
    result["peak_rss_kib"] = peak_rss_kib()
    return result


def _listed(entry: Entry) -> dict[str, Any]:
    return {"path": entry.path, "class": entry.class_name, "title": short_title(entry.title)}


def analyse_file(path: Path) -> dict[str, Any]:
    """Read and summarise every object of a checked file; `state` "ok" with the objects, or
    "failed" with the reason."""
    try:
        objects, truncated = _read_objects(path)
    except MemoryError:
        result: dict[str, Any] = {"state": FAILED, "reason": "analysis exceeded the memory cap"}
    except Exception as exc:  # the check passed, but uproot may still refuse the file
        result = {"state": FAILED, "reason": short_reason(exc).replace(str(path), "the file")}
    else:
        result = {"state": OK, "objects": objects, "objects_truncated": truncated}
    result["peak_rss_kib"] = peak_rss_kib()
    return result


def peak_rss_kib() -> int | None:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited
    across exec from the daemon)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def short_reason(exc: BaseException) -> str:
    # uproot's messages run over several lines and end with the file path: keep the gist.
    lines = [line.strip() for line in str(exc).splitlines()]
    gist = " ".join(line for line in lines if line and not line.startswith(("in file", "in object")))
    return readable(f"{type(exc).__name__}: {gist[:200]}" if gist else type(exc).__name__)


def file_text(text: str) -> str:
    """A string uproot read from a file, as the check reads them: bytes that are not UTF-8
    replaced (U+FFFD). uproot keeps them as lone surrogates (`surrogateescape`), which no page,
    strict JSON parser or header takes (a Latin-1 'µ' in a title made a file's page a 500)."""
    if text.isascii():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate of another origin
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def readable(reason: str) -> str:
    """A reason quotes names from the file, which may hold control characters, bytes that are
    not UTF-8 or run long; it is shown in pages, JSON answers and a response header: printable,
    and short."""
    reason = _UNPRINTABLE.sub("?", file_text(reason))
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 1] + "…"


def short_title(title: str) -> str:
    """A title as listed: `readable`, with a fast path for the usual short, printable one."""
    return title if len(title) <= MAX_REASON_CHARS and title.isprintable() else readable(title)


def _read_objects(path: Path) -> tuple[list[dict[str, Any]], bool]:
    with open(path, "rb") as raw_file:
        if raw_file.read(4) != ROOT_MAGIC:
            raise InvalidFile("not a ROOT file: it does not start with 'root'")
    # Plain reads, not a memory map: mapped pages would count against the address-space cap.
    with uproot.open(path, handler=uproot.source.file.MultithreadedFileSource) as root_file:
        declared_end = root_file.file.fEND
        actual_size = os.path.getsize(path)
        if actual_size < declared_end:
            raise InvalidFile(f"truncated: {actual_size} bytes of the {declared_end} declared")
        objects: list[dict[str, Any]] = []
        truncated = _walk(root_file, "", objects, [MAX_LISTED_CHARS])
    return objects, truncated


def _walk(directory: Any, prefix: str, objects: list[dict[str, Any]],
          chars_left: list[int]) -> bool:
    """Append an entry per key (highest cycle), depth first; True if the listing was cut short
    (`chars_left`: what the listing may still hold, shared along the walk)."""
    for key in newest_keys(directory):
        path = f"{prefix}{file_text(key.fName)}"
        entry: dict[str, Any] = {"path": path, "class": file_text(key.fClassName),
                                 "title": short_title(key.fTitle)}
        chars_left[0] -= len(path) + len(entry["class"]) + len(entry["title"])
        if len(objects) >= MAX_LISTED_OBJECTS or chars_left[0] < 0:
            return True
        objects.append(entry)
        try:
            payload = key.get()  # decompresses the payload and interprets it
        except MemoryError:
            raise
        except Exception as exc:
            _check_decompresses(key, path)  # a payload that does not decompress: unsound
            if key.fClassName in DIRECTORY_CLASSES:
                raise InvalidFile(f"{path}: directory does not read ({short_reason(exc)})") from exc
            entry["interpreted"] = False
            entry["note"] = short_reason(exc)
            continue
        if key.fClassName in DIRECTORY_CLASSES:
            if _walk(payload, f"{path}/", objects, chars_left):
                return True
            continue
        try:
            summary = describe(payload, key.fClassName)
        except MemoryError:
            raise
        except Exception as exc:  # a class that reads but does not summarise (TH2Poly, ...)
            entry["interpreted"] = False
            entry["note"] = short_reason(exc)
            continue
        entry["interpreted"] = True
        entry.update(summary)
        for member in summary.get("members", ()):
            chars_left[0] -= len(member["name"] or "") + len(member["class"])
    return False


def newest_keys(directory: Any) -> list[Any]:
    """Each name's key of the highest cycle, in the directory's order, from its list of keys:
    not looked up by name, as a name holding '/' or ';' would be read as a path or a cycle
    (and one such object would fail the whole file's analysis)."""
    newest: dict[str, Any] = {}
    for key in directory._keys:  # uproot's list of the directory's keys, in file order
        if key.fName not in newest or abs(key.fCycle) > abs(newest[key.fName].fCycle):
            newest[key.fName] = key
    return list(newest.values())


def _check_decompresses(key: Any, path: str) -> None:
    try:
        key.get_uncompressed_chunk_cursor()
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidFile(f"{path}: payload does not decompress ({short_reason(exc)})") from exc


def describe(payload: Any, class_name: str) -> dict[str, Any]:
    """Summary figures of histograms, trees and lists; nothing for other classes."""
    if class_name.startswith(("TH1", "TH2", "TH3")) or class_name in PROFILE_CLASSES:
        return _describe_histogram(payload)
    if class_name in ("TTree", "TNtuple", "TNtupleD"):
        return {"entries": int(payload.num_entries), "branches": len(payload.keys(recursive=True))}
    if class_name in LIST_CLASSES:
        members = [_member(item) for _, item in zip(range(MAX_LISTED_MEMBERS), payload, strict=False)]
        return {"members": members, "member_count": len(payload)}
    return {}


def _member(item: Any) -> dict[str, Any]:
    has_name = getattr(item, "has_member", lambda _: False)("fName")
    name = item.member("fName") if has_name else None
    # Cut like a reason: names inside a compressed list can be megabytes each.
    return {"name": readable(str(name)) if name is not None else None,
            "class": readable(str(getattr(item, "classname", type(item).__name__)))}


def _finite(value: float) -> float | None:
    """JSON has no NaN: a mean of an empty histogram is reported as null."""
    return value if math.isfinite(value) else None


def _describe_histogram(histogram: Any) -> dict[str, Any]:
    # A profile's bin values are means; its contents are counted in entries per bin.
    is_profile = histogram.classname.startswith("TProfile")
    values = np.asarray(histogram.values(flow=True), dtype=np.float64)
    if is_profile:
        values = np.asarray(histogram.member("fBinEntries"), dtype=np.float64).reshape(
            values.shape, order="F")
    dimensions = values.ndim
    sum_of_weights = float(histogram.member("fTsumw"))
    entries = float(histogram.member("fEntries"))
    axes = []
    for axis_index in range(dimensions):
        axis_name = AXIS_NAMES[axis_index]
        sum_wx = float(histogram.member(f"fTsumw{axis_name}"))
        sum_wx2 = float(histogram.member(f"fTsumw{axis_name}2"))
        mean = sum_wx / sum_of_weights if sum_of_weights else math.nan
        variance = sum_wx2 / sum_of_weights - mean * mean if sum_of_weights else math.nan
        flow_slices = [slice(None)] * dimensions
        flow_slices[axis_index] = 0
        underflow = float(values[tuple(flow_slices)].sum())
        flow_slices[axis_index] = -1
        overflow = float(values[tuple(flow_slices)].sum())
        edges = histogram.axes[axis_index].edges()
        axes.append({
            "axis": axis_name,
            "bins": int(values.shape[axis_index] - 2),
            "low": float(edges[0]),
            "high": float(edges[-1]),
            "mean": _finite(mean),
            "std": _finite(math.sqrt(variance)) if variance >= 0 else None,
            "underflow": underflow,
            "overflow": overflow,
        })
    total = float(values.sum())
    return {
        "entries": entries,
        "dimensions": dimensions,
        "sum_of_weights": sum_of_weights,
        "integral": total,
        "axes": axes,
        "empty": entries == 0 and total == 0,
    }
