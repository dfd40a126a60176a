"""The CPU a small file costs before any HTTP: what dqm-daemon must do per file to keep its
promises, done back to back in one synchronous loop (no event loop, no threads, no sockets),
beside what the FastAPI comparator does per file. It bounds how far tuning the daemon can go.

    python benchmarks/essential_work.py [--files 400]

Per file, as the daemon does it: SHA-256 of the bytes, write and fsync a temporary file, link it
under its name and fsync the directory, a durable SQLite row (WAL, synchronous=FULL), the
structure check (`root_structure`, through `inspection.inspect_file`), and a second commit with
the verdict and listing. The
comparator's per-file work: write and fsync, then uproot's top-level key listing. Files are the
benchmark's small files (200 histograms, about 100 KiB to 2 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

import uproot

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import write_small_files  # noqa: E402

from dqm_daemon.inspection import inspect_file  # noqa: E402
from dqm_daemon.storage import fsync_directory  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_and_fsync(path: Path, content: bytes) -> None:
    descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(descriptor, content)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def daemon_work(index: int, content: bytes, scratch: Path, catalog: sqlite3.Connection) -> None:
    sha256 = hashlib.sha256(content).hexdigest()
    incoming = scratch / "incoming" / uuid.uuid4().hex
    write_and_fsync(incoming, content)
    name = f"BENCHhistos_{index}_DQM.root"
    os.link(incoming, scratch / "data" / name)
    incoming.unlink()
    fsync_directory(scratch / "data")
    catalog.execute("BEGIN IMMEDIATE")  # the file is cataloged before it is checked...
    catalog.execute("INSERT INTO files VALUES (?, ?, ?, NULL)", (name, sha256, len(content)))
    catalog.execute("COMMIT")
    result = inspect_file(scratch / "data" / name)
    assert result["state"] == "ok", result
    catalog.execute("BEGIN IMMEDIATE")  # ...and its verdict and listing recorded after
    catalog.execute("UPDATE files SET objects_json = ? WHERE name = ?",
                    (json.dumps(result["objects"]), name))
    catalog.execute("COMMIT")


def comparator_work(index: int, content: bytes, scratch: Path) -> None:
    path = scratch / "comparator" / f"{index}-{uuid.uuid4().hex}.root"
    write_and_fsync(path, content)
    with uproot.open(path) as root_file:
        root_file.classnames(recursive=False, cycle=False)


def measure(count: int, work) -> tuple[float, float]:
    """CPU and wall milliseconds per call of `work(index)`, over `count` calls."""
    started_cpu, started = cpu_seconds(), time.perf_counter()
    for index in range(count):
        work(index)
    return ((cpu_seconds() - started_cpu) / count * 1000,
            (time.perf_counter() - started) / count * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--files", type=int, default=400)
    count = parser.parse_args().files
    with tempfile.TemporaryDirectory(prefix="dqm-essential-", dir=".") as tmp:
        scratch = Path(tmp).resolve()
        for directory in ("incoming", "data", "comparator"):
            (scratch / directory).mkdir()
        contents = [path.read_bytes() for path in write_small_files(scratch)]
        catalog = sqlite3.connect(scratch / "catalog.sqlite3", isolation_level=None)
        catalog.execute("PRAGMA journal_mode=WAL")
        catalog.execute("PRAGMA synchronous=FULL")
        catalog.execute("CREATE TABLE files (name TEXT PRIMARY KEY, sha256 TEXT, size INTEGER,"
                        " objects_json TEXT)")
        daemon_work(-1, contents[0], scratch, catalog)  # warm up (imports, caches)
        comparator_work(-1, contents[0], scratch)
        figures = {
            "dqm-daemon's work": measure(
                count, lambda i: daemon_work(i, contents[i % 4], scratch, catalog)),
            "the comparator's work": measure(
                count, lambda i: comparator_work(i, contents[i % 4], scratch)),
        }
        stored = sorted((scratch / "data").iterdir())
        figures["the structure check alone"] = measure(
            count, lambda i: inspect_file(stored[i % len(stored)]))
        figures["uproot's top-level listing alone"] = measure(
            count, lambda i: uproot.open(stored[i % len(stored)]).classnames(
                recursive=False, cycle=False))
    print("| per small file, one loop, no HTTP | CPU ms | wall ms |")
    print("|---|---|---|")
    for label, (cpu_ms, wall_ms) in figures.items():
        print(f"| {label} | {cpu_ms:.2f} | {wall_ms:.2f} |")


if __name__ == "__main__":
    main()
