"""The inspection child process: `python -m dqm_daemon.inspection_child --memory-cap BYTES`.

Reads one JSON job per line on stdin (`{"path": ...}` to check a file, with `"analyse": true` to
analyse it, with `"previews": [...]` to read histograms for drawing), answers one JSON result per
line on the original stdout (a sound file's check: the result, then its listing on the next
line). It caps its own
address space first, so a hostile file that makes uproot allocate without bound fails here, not
in the daemon.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import sys
from typing import Any

READY = {"ready": True}
# In a check's result: the next line is the listing, as JSON text.
LISTING_FOLLOWS = "listing_follows"


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a histogram holding them reports null there."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-cap", type=int, required=True, help="RLIMIT_AS in bytes")
    parser.add_argument("--nice", type=int, default=0, help="added to the CPU niceness")
    arguments = parser.parse_args()
    if arguments.nice:
        os.nice(arguments.nice)  # background work yields the CPU to uploads and checks
    # The daemon decides when a child ends (EOF on stdin, or SIGKILL): a Ctrl-C or a SIGTERM
    # meant for the whole group must not look like a file that crashed its inspector.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Results go to a private copy of stdout; anything a library prints goes to stderr.
    results = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    from .inspection import analyse_file, inspect_file  # heavy imports before the cap
    from .previews import read_previews

    resource.setrlimit(resource.RLIMIT_AS, (arguments.memory_cap, arguments.memory_cap))
    results.write(json.dumps(READY) + "\n")
    results.flush()
    for line in sys.stdin:
        job = json.loads(line)
        if "previews" in job:
            result = read_previews(job["path"], job["previews"], job["max_bins"])
        elif job.get("analyse"):
            result = analyse_file(job["path"])
        else:
            result = inspect_file(job["path"])
            if "objects" in result:
                # The daemon stores a check's listing as it is: it travels as JSON text on a
                # line of its own after the result, so the daemon neither parses nor
                # re-encodes hundreds of entries per file (nor unescapes them from a string).
                objects = result.pop("objects")
                result[LISTING_FOLLOWS], result["object_count"] = True, len(objects)
                results.write(json.dumps(finite(result), allow_nan=False) + "\n")
                results.write(json.dumps(objects) + "\n")
                results.flush()
                continue
        results.write(json.dumps(finite(result), allow_nan=False) + "\n")
        results.flush()


if __name__ == "__main__":
    main()
