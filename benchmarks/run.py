"""dqm-daemon end to end, against the machine's own limit, side by side in one run.

    python benchmarks/run.py [--quick] [--json results.json]

Every figure starts the real daemon (a subprocess) and drives it from client processes:
  1. one 2 GiB upload: throughput, taken in turns with the baseline (loopback socket → SHA-256 →
     file with fsync; benchmarks/baseline_receiver.py), and the daemon's peak RSS above idle;
  2. 16 concurrent 128 MiB uploads: aggregate throughput, in turns with the baseline;
  3. small files (200 histograms, 100 KiB to 2 MB) back to back from 8 clients, including
     inspection: files per second, in turns with the FastAPI + uvicorn comparator and with the
     floor (the leanest aiohttp receiver doing the daemon's promised work, or the comparator's:
     benchmarks/aiohttp_floor.py);
  4. /status and /healthz latency while 8 large uploads and inspections run;
  5. scaling with file size (64 MiB → 2 GiB) and concurrency (1 → 64): seconds per GiB and RSS.
--quick divides the sizes by 8 for a fast look (the targets are for the full run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import uproot  # noqa: E402

from tests.rootfiles import histogram, write_one_histogram_file  # noqa: E402

TOKEN = "benchmark-token"
MiB, GiB = 1024 * 1024, 1024 * 1024 * 1024
PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Server:
    """A receiver under test in its own process, on a fresh data directory."""

    def __init__(self, kind: str, scratch: Path, config: str = "") -> None:
        self.kind = kind
        self.port = free_port()
        self.data_dir = scratch / f"{kind}-{self.port}"
        self.data_dir.mkdir(parents=True)
        environment = dict(os.environ, DQM_DAEMON_TOKEN=TOKEN,
                           COMPARATOR_DATA_DIR=str(self.data_dir))
        if kind == "daemon":
            config_path = self.data_dir.with_suffix(".toml")
            config_path.write_text(config)
            command = [PYTHON, "-m", "dqm_daemon", "serve", "--port", str(self.port),
                       "--data-dir", str(self.data_dir), "--config", str(config_path)]
        elif kind.startswith("floor-"):  # the leanest aiohttp receiver: floor-promised, ...
            command = [PYTHON, str(HERE / "aiohttp_floor.py"), str(self.port),
                       str(self.data_dir), "--work", kind.removeprefix("floor-")]
        elif kind == "baseline":
            command = [PYTHON, str(HERE / "baseline_receiver.py"), str(self.port),
                       str(self.data_dir)]
        else:  # the FastAPI comparator
            command = [PYTHON, "-m", "uvicorn", "--workers", "2", "--app-dir", str(HERE),
                       "--port", str(self.port), "--log-level", "warning",
                       "fastapi_receiver:app"]
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, cwd=self.data_dir)
        wait_port(self.port)

    def cpu_seconds(self) -> float:
        """User and system CPU time so far of the receiver and every process under it
        (inspection children, uvicorn's workers), from /proc."""
        children: dict[int, list[int]] = {}
        times: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            fields = stat[stat.rindex(")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            # Its own time and that of its children already gone (reaped).
            times[int(entry.name)] = sum(map(int, fields[11:15])) / CLOCK_TICKS
        total, stack = 0.0, [self.process.pid]
        while stack:
            pid = stack.pop()
            total += times.get(pid, 0.0)
            stack.extend(children.get(pid, []))
        return total

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def client(mode: str, port: int, **options) -> dict:
    command = [PYTHON, str(HERE / "load_client.py"), mode, str(port)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        command += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(finished.stdout)


class RssSampler:
    """The daemon's resident memory, sampled every 20 ms while a measurement runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, rss_kib(self.pid, "VmHWM"))


def throughput_in_turns(scratch: Path, prefix: Path, size: int, count: int, turns: int,
                        config: str) -> dict:
    """Baseline and daemon alternately; MB/s medians, their ratio, the daemon's RSS growth."""
    figures = {"baseline": [], "daemon": [], "rss_growth_mib": []}
    for _ in range(turns):
        baseline = Server("baseline", scratch)
        result = client("raw", baseline.port, count=count, concurrency=count, size=size)
        baseline.stop()
        assert set(result["statuses"]) == {200}, result["statuses"]
        figures["baseline"].append(result["bytes"] / result["seconds"] / 1e6)
        daemon = Server("daemon", scratch, config)
        client("multipart", daemon.port, count=1, size=prefix.stat().st_size * 4,
               prefix=prefix, run_base=10_000)  # warm every code path before measuring idle
        idle_kib = rss_kib(daemon.process.pid)
        with RssSampler(daemon.process.pid) as sampler:
            result = client("multipart", daemon.port, count=count, concurrency=count, size=size,
                            prefix=prefix)
        daemon.stop()
        assert set(result["statuses"]) == {200}, result["statuses"]
        figures["daemon"].append(result["bytes"] / result["seconds"] / 1e6)
        figures["rss_growth_mib"].append((sampler.peak_kib - idle_kib) / 1024)
    summary = {
        "baseline_mb_s": statistics.median(figures["baseline"]),
        "daemon_mb_s": statistics.median(figures["daemon"]),
        "rss_growth_mib": max(figures["rss_growth_mib"]),
        "turns": figures,
    }
    summary["ratio"] = summary["daemon_mb_s"] / summary["baseline_mb_s"]
    return summary


def write_small_files(directory: Path) -> list[Path]:
    """ROOT files of 200 histograms from about 100 KiB to 2 MB."""
    rng = np.random.default_rng(3)
    paths = []
    for bins in (60, 400, 2400, 9000):
        path = directory / f"small-{bins}.root"
        with uproot.recreate(path) as root_file:
            for index in range(200):
                root_file[f"det{index % 8}/h{index}"] = histogram(
                    f"h{index}", f"histogram {index}", [rng.random(bins * 4)], bins=bins,
                    dtype=np.float32)
        paths.append(path)
    return paths


SMALL_FILE_RECEIVERS = ("daemon", "fastapi", "floor-promised", "floor-comparator")


def small_files_in_turns(scratch: Path, files: list[Path], uploads: int, turns: int,
                         config: str) -> dict:
    """Files per second, and the receiver's CPU time per file (all its processes, user and
    system): on two shared cores, the CPU a file costs bounds the rate. Beside the daemon and
    the comparator, the floor (benchmarks/aiohttp_floor.py) with the daemon's promised work and
    with the comparator's: what the daemon's promises cost any aiohttp receiver."""
    rates: dict[str, list[float]] = {kind: [] for kind in SMALL_FILE_RECEIVERS}
    cpu_ms: dict[str, list[float]] = {kind: [] for kind in SMALL_FILE_RECEIVERS}
    for turn in range(turns):
        # Each turn starts with the next receiver: none always runs first, right after the
        # large uploads' writeback, or always after the same neighbour.
        shift = turn % len(SMALL_FILE_RECEIVERS)
        for kind in SMALL_FILE_RECEIVERS[shift:] + SMALL_FILE_RECEIVERS[:shift]:
            server = Server(kind, scratch, config)
            client("multipart", server.port, count=8, concurrency=8, files=[str(files[0])],
                   run_base=50_000)  # warm up (imports, first inspection child)
            cpu_before = server.cpu_seconds()
            result = client("multipart", server.port, count=uploads, concurrency=8,
                            files=[str(path) for path in files])
            cpu_used = server.cpu_seconds() - cpu_before
            server.stop()
            assert set(result["statuses"]) == {200}, (kind, set(result["statuses"]))
            rates[kind].append(len(result["statuses"]) / result["seconds"])
            cpu_ms[kind].append(cpu_used / len(result["statuses"]) * 1000)
    figures: dict = {}
    for kind in SMALL_FILE_RECEIVERS:
        key = kind.replace("-", "_")
        figures[f"{key}_files_s"] = statistics.median(rates[kind])
        figures[f"{key}_cpu_ms_per_file"] = statistics.median(cpu_ms[kind])
    return {**figures, "sizes_kib": [round(path.stat().st_size / 1024) for path in files],
            "turns": rates, "cpu_ms_per_file_turns": cpu_ms}


def latency_under_load(scratch: Path, prefix: Path, files: list[Path], size: int,
                       config: str) -> dict:
    daemon = Server("daemon", scratch, config)
    # Steady state, as on a service up for days: children started, first pages served.
    client("multipart", daemon.port, count=2, files=[str(files[0])], run_base=80_000)
    for path in ("/status", "/healthz"):
        urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}{path}").read()
    latencies: dict[str, list[float]] = {"/status": [], "/healthz": []}
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            for path, samples in latencies.items():
                started = time.perf_counter()
                with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}{path}") as answer:
                    answer.read()
                samples.append(time.perf_counter() - started)
            time.sleep(0.02)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    loads = [threading.Thread(target=client, args=("multipart", daemon.port),
                              kwargs=dict(count=16, concurrency=8, size=size, prefix=prefix)),
             threading.Thread(target=client, args=("multipart", daemon.port),
                              kwargs=dict(count=40, concurrency=2, files=[str(p) for p in files],
                                          run_base=90_000))]
    for load in loads:
        load.start()
    for load in loads:
        load.join()
    stop.set()
    prober.join()
    daemon.stop()
    return {path: {"p50_ms": float(np.percentile(samples, 50)) * 1000,
                   "p99_ms": float(np.percentile(samples, 99)) * 1000,
                   "samples": len(samples)} for path, samples in latencies.items()}


def scaling(scratch: Path, prefix: Path, sizes: list[int], concurrencies: list[int],
            unit: int, config: str) -> list[dict]:
    rows = []
    for size, concurrency in [(size, 1) for size in sizes] + [(unit, c) for c in concurrencies]:
        daemon = Server("daemon", scratch, config)
        client("multipart", daemon.port, count=1, size=prefix.stat().st_size * 4,
               prefix=prefix, run_base=10_000)  # steady state: inspection children started
        idle_kib = rss_kib(daemon.process.pid)
        with RssSampler(daemon.process.pid) as sampler:
            result = client("multipart", daemon.port, count=concurrency,
                            concurrency=concurrency, size=size, prefix=prefix)
        daemon.stop()
        assert set(result["statuses"]) == {200}, set(result["statuses"])
        rows.append({"size_mib": size // MiB, "concurrency": concurrency,
                     "mb_s": result["bytes"] / result["seconds"] / 1e6,
                     "seconds_per_gib": result["seconds"] / (result["bytes"] / GiB),
                     "rss_growth_mib": (sampler.peak_kib - idle_kib) / 1024})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--scratch", type=Path, help="where files are written (default: a "
                        "temporary directory on the same disk as the working directory)")
    arguments = parser.parse_args()
    scale = 8 if arguments.quick else 1
    config = "max_concurrent_uploads = 64\n"
    with tempfile.TemporaryDirectory(prefix="dqm-bench-", dir=arguments.scratch or ".") as tmp:
        scratch = Path(tmp).resolve()
        prefix = write_one_histogram_file(scratch / "prefix.root")
        small = write_small_files(scratch)
        results = {
            "one_2gib_upload": throughput_in_turns(scratch, prefix, 2 * GiB // scale, 1, 3,
                                                   config),
            "sixteen_128mib_uploads": throughput_in_turns(scratch, prefix, 128 * MiB // scale,
                                                          16, 3, config),
            "small_files": small_files_in_turns(scratch, small, 240 // scale, 3, config),
            "latency_under_load": latency_under_load(scratch, prefix, small, 256 * MiB // scale,
                                                     config),
            "scaling": scaling(scratch, prefix,
                               [size // scale for size in (64 * MiB, 256 * MiB, GiB, 2 * GiB)],
                               [1, 4, 16, 64], 64 * MiB // scale, config),
        }
    report(results)
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))


def report(results: dict) -> None:
    one, many = results["one_2gib_upload"], results["sixteen_128mib_uploads"]
    small, latency = results["small_files"], results["latency_under_load"]
    print("| figure | dqm-daemon | reference | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| one 2 GiB upload | {one['daemon_mb_s']:.0f} MB/s | baseline "
          f"{one['baseline_mb_s']:.0f} MB/s | {one['ratio']:.0%} | ≥ 80% |")
    print(f"| daemon peak RSS above idle during it | {one['rss_growth_mib']:.1f} MiB | | | "
          "< 64 MiB |")
    print(f"| 16 × 128 MiB concurrent | {many['daemon_mb_s']:.0f} MB/s | baseline "
          f"{many['baseline_mb_s']:.0f} MB/s | {many['ratio']:.0%} | ≥ 80% |")
    print(f"| small files (200 histograms), 8 clients, inspected | "
          f"{small['daemon_files_s']:.1f} files/s | FastAPI {small['fastapi_files_s']:.1f} "
          f"files/s | {small['daemon_files_s'] / small['fastapi_files_s']:.0%} | ≥ 100/s, ahead |")
    print(f"| CPU per small file (receiver, all its processes) | "
          f"{small['daemon_cpu_ms_per_file']:.1f} ms | FastAPI "
          f"{small['fastapi_cpu_ms_per_file']:.1f} ms | | |")
    for work, what in (("promised", "the daemon's promised work"),
                       ("comparator", "the comparator's work")):
        rate, cpu = small[f"floor_{work}_files_s"], small[f"floor_{work}_cpu_ms_per_file"]
        print(f"| floor: lean aiohttp, {what} | {rate:.1f} files/s, {cpu:.1f} ms per file | "
              f"FastAPI {small['fastapi_files_s']:.1f} files/s | "
              f"{rate / small['fastapi_files_s']:.0%} | (a bound, no target) |")
    for path in ("/status", "/healthz"):
        print(f"| {path} under load, p50 / p99 | {latency[path]['p50_ms']:.1f} / "
              f"{latency[path]['p99_ms']:.1f} ms | | | p99 < 100 ms |")
    print()
    print("| size | concurrency | MB/s | s per GiB | RSS growth |")
    print("|---|---|---|---|---|")
    for row in results["scaling"]:
        print(f"| {row['size_mib']} MiB | {row['concurrency']} | {row['mb_s']:.0f} | "
              f"{row['seconds_per_gib']:.2f} | {row['rss_growth_mib']:.1f} MiB |")


if __name__ == "__main__":
    main()
