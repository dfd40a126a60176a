"""Inspection benchmark: prints figures against the targets of the inspection pipeline.

    python benchmarks/inspection.py [--repeats 5] [--big-mib 512] [--json results.json]

- a file of 1,000 histograms in nested directories, checked and analysed through a real
  inspection child: median seconds of each (target < 2 s);
- a large file (512 MiB of TTree baskets by default): seconds of its check and analysis and the
  child's peak RSS (target < 256 MiB: the file is never read whole);
- the daemon's event loop, probed every 5 ms while the real daemon (in this process) receives
  and inspects those files sent by a client in another process: worst stall (target < 50 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import uproot
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dqm_daemon.app import create_app  # noqa: E402
from dqm_daemon.inspection_pool import InspectorProcess  # noqa: E402
from dqm_daemon.logs import configure_logging  # noqa: E402
from dqm_daemon.settings import GiB, MiB, Settings  # noqa: E402
from tests.rootfiles import write_many_histograms_file  # noqa: E402

TOKEN = "benchmark-token"


def write_big_tree_file(path: Path, size_mib: int) -> Path:
    """A file holding `size_mib` MiB of uncompressed TTree baskets (random doubles)."""
    rng = np.random.default_rng(1)
    chunk_values = 8 * MiB // 8
    with uproot.recreate(path, compression=None) as root_file:
        tree = root_file.mktree("events", {"energy": np.float64})
        for _ in range(size_mib // 8):
            tree.extend({"energy": rng.random(chunk_values)})
        root_file["summary"] = (np.arange(10.0), np.arange(11.0))
    return path


async def time_inspections(path: Path, repeats: int) -> dict[str, tuple[list[float], dict]]:
    """Seconds of each run of the check and of the analysis of `path`, and their last result."""
    inspector = InspectorProcess(2 * GiB, 600.0)
    timings: dict[str, tuple[list[float], dict]] = {}
    await inspector.warm_up()  # its start (importing uproot) is not part of any figure
    try:
        for kind, job in (("check", inspector.inspect), ("analysis", inspector.analyse)):
            durations, result = [], {}
            for _ in range(repeats):
                started = time.perf_counter()
                result = await job(path)
                durations.append(time.perf_counter() - started)
                assert result["state"] == "ok", result
            timings[kind] = durations, result
    finally:
        await inspector.close()
    return timings


UPLOAD_CLIENT = r"""
import sys, urllib.request
url, token, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
for run, path in enumerate(paths):
    with open(path, "rb") as body:
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "token": token, "runNumber": str(run), "timeStamp": str(1700000000 + run),
            "Content-Type": "application/octet-stream",
            "Content-Length": str(__import__("os").path.getsize(path))})
        with urllib.request.urlopen(request, timeout=600) as answer:
            answer.read()
"""


async def probe_loop_while_serving(paths: list[Path], data_dir: Path) -> dict:
    settings = Settings(data_dir=data_dir, tokens={TOKEN: "benchmark"})
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the bound port
    stalls: list[float] = []
    period = 0.005

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(period)
            stalls.append(loop.time() - before - period)

    probe_task = asyncio.create_task(probe())
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", UPLOAD_CLIENT, f"http://127.0.0.1:{port}/rest/api/files", TOKEN,
        *map(str, paths))
    returncode = await client.wait()
    probe_task.cancel()
    await runner.cleanup()
    assert returncode == 0, "upload client failed"
    return {"probes": len(stalls), "max_stall_ms": max(stalls) * 1000,
            "p99_stall_ms": float(np.percentile(stalls, 99)) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--big-mib", type=int, default=512)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()
    configure_logging(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="dqm-bench-") as scratch:
        scratch_dir = Path(scratch)
        many = write_many_histograms_file(scratch_dir / "many.root", 1000)
        big = write_big_tree_file(scratch_dir / "big.root", arguments.big_mib)
        many_timings = asyncio.run(time_inspections(many, arguments.repeats))
        big_timings = asyncio.run(time_inspections(big, 1))
        big_size_mib = os.path.getsize(big) / MiB
        loop_figures = asyncio.run(
            probe_loop_while_serving([many, big, many, many], scratch_dir / "data"))
    figures = {
        "histograms_1000": {
            kind: {"objects": result.get("object_count", len(result.get("objects", []))),
                   "median_seconds": statistics.median(durations), "runs_seconds": durations}
            for kind, (durations, result) in many_timings.items()
        } | {"target_seconds": 2.0},
        "big_file": {
            kind: {"seconds": durations[0],
                   "child_peak_rss_mib": result["peak_rss_kib"] / 1024}
            for kind, (durations, result) in big_timings.items()
        } | {"size_mib": big_size_mib, "target_peak_rss_mib": 256},
        "event_loop": {**loop_figures, "target_max_stall_ms": 50},
    }
    many_figures, big_figures = figures["histograms_1000"], figures["big_file"]
    print(f"1,000 histograms: check median {many_figures['check']['median_seconds']:.3f} s, "
          f"analysis median {many_figures['analysis']['median_seconds']:.2f} s over "
          f"{arguments.repeats} runs (target < 2 s)")
    print(f"{arguments.big_mib} MiB file: check {big_figures['check']['seconds']:.2f} s, "
          f"analysis {big_figures['analysis']['seconds']:.2f} s, child peak RSS "
          f"{max(big_figures[kind]['child_peak_rss_mib'] for kind in ('check', 'analysis')):.0f}"
          " MiB (target < 256 MiB)")
    print(f"event loop while serving: worst stall {loop_figures['max_stall_ms']:.1f} ms, "
          f"p99 {loop_figures['p99_stall_ms']:.1f} ms over {loop_figures['probes']} probes "
          "(target < 50 ms)")
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
