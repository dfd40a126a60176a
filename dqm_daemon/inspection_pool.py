"""Inspection child processes, seen from the daemon: one per worker, started on first use,
killed and replaced when it overruns its time limit or dies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import structlog

from .inspection import INVALID
from .inspection_child import LISTING_FOLLOWS
from .settings import TOKEN_ENV_VAR

log = structlog.get_logger(__name__)

CHILD_COMMAND = (sys.executable, "-m", "dqm_daemon.inspection_child")
# A result line holds at most MAX_LISTED_OBJECTS entries; this bounds what the daemon buffers.
RESULT_LINE_LIMIT = 256 * 1024 * 1024
START_TIMEOUT_SECONDS = 60.0
LARGE_RESULT_BYTES = 256 * 1024
# A child that closed its output is given this long to exit before it is killed.
EXIT_GRACE_SECONDS = 5.0


def _line_text(line: bytes) -> str:
    return line.rstrip(b"\n").decode()


class ChildStartFailed(RuntimeError):
    """The child could not start: a fault of the daemon's machine, not of any file."""


def describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class _ChildCrashed(Exception):
    """The child ended during a job (its exit, described, is the message)."""


class InspectorProcess:
    def __init__(self, memory_cap_bytes: int, time_limit_seconds: float,
                 command: tuple[str, ...] = CHILD_COMMAND, niceness: int = 0) -> None:
        self._memory_cap_bytes = memory_cap_bytes
        self._time_limit_seconds = time_limit_seconds
        self._command = command
        self._niceness = niceness
        self._process: asyncio.subprocess.Process | None = None
        # One job at a time per child: a second caller waits its turn.
        self._turn = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def _start(self) -> asyncio.subprocess.Process:
        # One BLAS thread: the child needs no parallel linear algebra, and idle BLAS threads
        # reserve address space that would count against the memory cap.
        environment = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        # The child parses untrusted files: it gets no secret it does not need (nor where
        # systemd keeps the daemon's credentials).
        environment.pop(TOKEN_ENV_VAR, None)
        environment.pop("CREDENTIALS_DIRECTORY", None)
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command, "--memory-cap", str(self._memory_cap_bytes),
                "--nice", str(self._niceness),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=environment, limit=RESULT_LINE_LIMIT,
                start_new_session=True,  # out of the terminal's group: Ctrl-C is the daemon's
            )
        except OSError as exc:  # no interpreter (an upgrade under way), no processes, no fds
            raise ChildStartFailed(f"inspection child cannot be started: {exc}") from None
        try:
            ready = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_SECONDS)
        except TimeoutError:
            ready = b""
        except BaseException:  # cancelled (a shutdown during its start): it must not outlive us
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        if not ready.startswith(b'{"ready"'):
            await self._reap(process)
            raise ChildStartFailed(f"inspection child did not start ({describe_exit(process.returncode)})")
        log.info("inspection_child_started", pid=process.pid)
        return process

    async def inspect(self, path: Path) -> dict[str, Any]:
        """The child's check of `path` (a sound file's listing as JSON text in `objects_json`,
        with `object_count`); an overrun or a crash is an invalid result, and the child is
        replaced on the next call."""
        return await self.run_job({"path": str(path)})

    async def analyse(self, path: Path) -> dict[str, Any]:
        """Every object of `path` read and summarised (an overrun or a crash: state invalid)."""
        return await self.run_job({"path": str(path), "analyse": True})

    async def previews(self, path: Path, object_paths: list[str], max_bins: int) -> dict[str, Any]:
        """Bin contents of the named histograms, for drawing (same isolation as inspection)."""
        return await self.run_job(
            {"path": str(path), "previews": object_paths, "max_bins": max_bins}
        )

    async def warm_up(self) -> None:
        """Start the child now rather than at the first file (it takes a moment to import)."""
        async with self._turn:
            if not self.alive:
                try:
                    self._process = await self._start()
                except ChildStartFailed as exc:
                    log.error("inspection_child_failed_to_start", error=str(exc))

    async def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        """The child's answer to `job`. A crash is retried once in a fresh child: the child may
        have died before the job (killed while idle, before asyncio noticed, or from outside),
        and a sound file must not pay for that. A file that crashes two children is invalid."""
        async with self._turn:
            try:
                return await self._exchange(job)
            except _ChildCrashed as crash:
                log.warning("inspection_child_crashed", file=job["path"], exit=str(crash))
            try:
                return await self._exchange(job)
            except _ChildCrashed as crash:
                return {"state": INVALID, "reason": f"inspection crashed ({crash})"}

    async def _exchange(self, job: dict[str, Any]) -> dict[str, Any]:
        if not self.alive:
            self._process = await self._start()
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(json.dumps(job).encode() + b"\n")
            await process.stdin.drain()
            async with asyncio.timeout(self._time_limit_seconds):  # unlike wait_for, no extra task
                return await self._read_result(process.stdout)
        except TimeoutError:
            await self._kill(process)
            return {"state": INVALID,
                    "reason": f"inspection took longer than the limit of {self._time_limit_seconds:g} s"}
        except (ConnectionError, ValueError):  # broken pipe, an over-long line, or no answer
            await self._reap(process)
            raise _ChildCrashed(describe_exit(process.returncode)) from None

    @staticmethod
    async def _read_result(output: asyncio.StreamReader) -> dict[str, Any]:
        line = await output.readline()
        if not line.endswith(b"\n"):  # nothing, or a line cut short: the child died writing it
            raise ConnectionError("the child closed its output")
        if len(line) > LARGE_RESULT_BYTES:  # parsing megabytes would stall the event loop
            result = await asyncio.to_thread(json.loads, line)
        else:
            result = json.loads(line)
        if result.pop(LISTING_FOLLOWS, False):
            # A sound file's listing, as JSON text on a line of its own: stored as it is.
            listing = await output.readline()
            if not listing.endswith(b"\n"):
                raise ConnectionError("the child closed its output")
            result["objects_json"] = (await asyncio.to_thread(_line_text, listing)
                                      if len(listing) > LARGE_RESULT_BYTES
                                      else _line_text(listing))
        return result

    @staticmethod
    async def _reap(process: asyncio.subprocess.Process) -> None:
        """Collect the exit status of a child that closed its output. Not kill() first: that
        polls (and so reaps) the child itself, and the real status would be lost."""
        try:
            await asyncio.wait_for(process.wait(), EXIT_GRACE_SECONDS)
        except TimeoutError:
            await InspectorProcess._kill(process)

    @staticmethod
    async def _kill(process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()

    async def close(self) -> None:
        """Stop the child: it finishes nothing more (its job stays pending in the catalog)."""
        if self._process is not None:
            await self._kill(self._process)
            self._process = None
