"""Status page benchmark: render times with a large catalog (100,000 files by default).

    python benchmarks/status_page.py [--files 100000] [--requests 50] [--json results.json]

Fills a catalog with files of 20 agents over many runs (a few invalid, a few pending), then
times the pages through the real application on a real socket: median and p99 per page
(target: the status page renders in under 50 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pendulum
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dqm_daemon import activity  # noqa: E402
from dqm_daemon.app import create_app  # noqa: E402
from dqm_daemon.catalog import Catalog  # noqa: E402
from dqm_daemon.logs import configure_logging  # noqa: E402
from dqm_daemon.naming import dqm_filename  # noqa: E402
from dqm_daemon.settings import Settings  # noqa: E402

AGENTS = [f"DET{index:02d}" for index in range(20)]
FILES_PER_AGENT_RUN = 40


async def fill_catalog(data_dir: Path, total_files: int) -> tuple[str, int]:
    """Create the catalog (through the real schema) and bulk-insert `total_files` rows."""
    data_dir.mkdir(parents=True)
    catalog = Catalog(data_dir / "catalog.sqlite3")
    await catalog.open()
    await catalog.close()
    connection = sqlite3.connect(data_dir / "catalog.sqlite3", isolation_level=None)
    connection.row_factory = sqlite3.Row
    start = pendulum.now("UTC").subtract(days=30)
    connection.execute("BEGIN")
    rows = []
    for number in range(total_files):
        agent = AGENTS[number % len(AGENTS)]
        run = 500_000 + number // (len(AGENTS) * FILES_PER_AGENT_RUN)
        in_run = (number // len(AGENTS)) % FILES_PER_AGENT_RUN
        timestamp = int(start.timestamp()) + number * 3
        received_at = pendulum.from_timestamp(timestamp + 2, tz="UTC").to_iso8601_string()
        name = dqm_filename(agent, run, timestamp)
        state = "invalid" if number % 997 == 0 else "pending" if number > total_files - 5 else "ok"
        data_status = 1 if in_run == 0 else 2 if in_run == FILES_PER_AGENT_RUN - 1 else 0
        rows.append((name, "data", 100_000, "0" * 64, agent, run, timestamp, data_status,
                     received_at, agent.lower(), state, None, "{}", None, 120,
                     json.dumps([{"kind": "objects_appeared", "count": 1}] if number % 50 == 0
                                else []), received_at, 500.0))
        activity.record_upload(connection, agent, run, name, received_at, "")
        if state == "ok":
            activity.record_data_status(connection, agent, run, data_status, received_at,
                                        timestamp)
    connection.executemany(
        "INSERT INTO files (name, location, size, sha256, agent, run, timestamp, data_status,"
        " received_at, uploader, state, reason, received_json, objects_json, object_count,"
        " findings_json, inspected_at, inspection_ms) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    connection.execute("COMMIT")
    connection.close()
    return rows[-1][0], rows[-1][5]


async def time_pages(data_dir: Path, paths: list[str], requests: int) -> dict[str, dict]:
    settings = Settings(data_dir=data_dir, tokens={"benchmark-token": "benchmark"})
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    figures = {}
    try:
        for path in paths:
            durations = []
            for _ in range(requests + 3):
                started = time.perf_counter()
                response = await client.get(path)
                await response.read()
                durations.append(time.perf_counter() - started)
                assert response.status == 200, (path, response.status)
            durations = sorted(durations[3:])  # the first few warm caches up
            figures[path] = {
                "median_ms": statistics.median(durations) * 1000,
                "p99_ms": durations[min(len(durations) - 1, int(len(durations) * 0.99))] * 1000,
            }
    finally:
        await client.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    configure_logging(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="dqm-page-bench-") as scratch:
        data_dir = Path(scratch) / "data"
        started = time.perf_counter()
        _, last_run = asyncio.run(fill_catalog(data_dir, arguments.files))
        print(f"catalog of {arguments.files:,} files built in {time.perf_counter() - started:.1f} s")
        paths = ["/status", "/status.json", f"/runs/{last_run}", f"/runs/{last_run}.json",
                 "/healthz"]
        figures = asyncio.run(time_pages(data_dir, paths, arguments.requests))
    for path, figure in figures.items():
        print(f"{path:24s} median {figure['median_ms']:6.1f} ms   p99 {figure['p99_ms']:6.1f} ms")
    print("target: /status under 50 ms")
    if arguments.json:
        arguments.json.write_text(json.dumps({"files": arguments.files, "pages": figures},
                                             indent=2))


if __name__ == "__main__":
    main()
