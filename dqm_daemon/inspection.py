"""What a ROOT file holds, read with uproot. Runs in a worker, never on the event loop."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import uproot

from .catalog import INVALID, OK


@dataclasses.dataclass(frozen=True)
class InspectionResult:
    state: str  # OK or INVALID
    reason: str | None = None
    # Top-level object name → "Obj name: NAME, Obj IsA() Name: CLASS", as the Overwatch receiver said.
    received: dict[str, str] | None = None


ROOT_MAGIC = b"root"


def _received_entry(name: str, class_name: str) -> str:
    return f"Obj name: {name}, Obj IsA() Name: {class_name}"


def inspect_file(path: Path) -> InspectionResult:
    """Open the file with uproot and list its top-level objects; any failure makes it invalid."""
    try:
        with open(path, "rb") as raw_file:
            magic = raw_file.read(4)
        if magic != ROOT_MAGIC:
            return InspectionResult(INVALID, "not a ROOT file: it does not start with 'root'")
        with uproot.open(path) as root_file:
            declared_end = root_file.file.fEND
            actual_size = os.path.getsize(path)
            if actual_size < declared_end:
                return InspectionResult(
                    INVALID, f"truncated: {actual_size} bytes of the {declared_end} declared"
                )
            class_names = root_file.classnames(recursive=False, cycle=False)
    except Exception as exc:  # uproot raises many kinds on hostile input; all mean "not sound"
        return InspectionResult(INVALID, _short_reason(exc))
    received = {name: _received_entry(name, class_name) for name, class_name in class_names.items()}
    return InspectionResult(OK, received=received)


def _short_reason(exc: BaseException) -> str:
    # uproot's messages run over several lines and end with the file path: keep the gist.
    lines = [line.strip() for line in str(exc).splitlines()]
    gist = " ".join(line for line in lines if line and not line.startswith(("in file", "in object")))
    return f"{type(exc).__name__}: {gist[:200]}" if gist else type(exc).__name__
