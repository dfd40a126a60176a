"""Files on disk: uploads stream into `.incoming/`, are fsynced, then linked into the data directory.

A stored file is never partial (it only appears under its name once complete and fsynced) and
never overwritten (linking fails if the name is taken). Every disk call here runs off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import structlog

from .catalog import IN_DATA_DIR, IN_QUARANTINE
from .settings import Settings

log = structlog.get_logger(__name__)

# A file name adopted from the data directory: what uploads are named with (and `+`, `,`, `=`).
ADOPTABLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,+=-]*", re.ASCII)

INCOMING_SUFFIX = ".part"
# Held locked (flock) by the daemon using the data directory, for its whole life.
LOCK_FILE = ".lock"
# A file being written is handed to the disk every this many bytes (see `start_writeback`).
WRITEBACK_BYTES = 8 * 1024 * 1024
WRITE_PROBE_SECONDS = 5.0


def fsync_directory(directory: Path) -> None:
    """Make a rename or link in `directory` durable."""
    _fsync_path(directory, os.O_DIRECTORY)


def fsync_file_and_directory(path: Path) -> None:
    """Make a file found on disk (not a symlink) and its name in its directory durable."""
    _fsync_path(path, os.O_NOFOLLOW)
    fsync_directory(path.parent)


def _fsync_path(path: Path, flags: int) -> None:
    descriptor = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def start_writeback(descriptor: int, start: int, end: int) -> None:
    """Start writing bytes [start, end) of a file to the disk now, without waiting for it.

    Left alone, a long upload piles up gigabytes of dirty pages: the kernel throttles the
    writer, and the final fsync writes what is left while the agent waits. On Linux,
    FADV_DONTNEED on freshly written pages starts their writeback at once, so the disk works
    while the body streams and the fsync finds little to do (on this machine a 2 GiB write
    plus fsync took half the time)."""
    with contextlib.suppress(OSError, AttributeError):  # advice only; not on every system
        os.posix_fadvise(descriptor, start, end - start, os.POSIX_FADV_DONTNEED)


class IncomingFile:
    """One upload being written: a temporary file, its size so far and its running SHA-256.

    The file is created, written and fsynced by the thread that reads the upload's body, so
    receiving a body costs one hand-off to a thread rather than one per step."""

    def __init__(self, path: Path, with_md5: bool = False) -> None:
        self.path = path
        self.size = 0
        self.fsync_seconds = 0.0
        self._sha256 = hashlib.sha256()
        # Only when the agent sent Content-MD5: a second hash is not free.
        self._md5 = hashlib.md5(usedforsecurity=False) if with_md5 else None
        self._file: BinaryIO | None = None  # created by the first write
        self._written_back = 0  # bytes already handed to the disk by `start_writeback`

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    @property
    def md5(self) -> bytes | None:
        return self._md5.digest() if self._md5 is not None else None

    def write_now(self, chunk: bytes | bytearray | memoryview) -> None:
        """Hash and write a chunk in the calling thread (an upload's own, never the loop's)."""
        if self._file is None:
            self._file = open(self.path, "xb", buffering=0)  # noqa: SIM115 - closed below
        # Each call releases the GIL for large buffers: other uploads go on meanwhile.
        self._sha256.update(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)
        view = memoryview(chunk)
        self.size += view.nbytes
        while view:  # an unbuffered file may write less than asked
            view = view[self._file.write(view):]
        if self.size - self._written_back >= WRITEBACK_BYTES:
            start_writeback(self._file.fileno(), self._written_back, self.size)
            self._written_back = self.size

    def finish_now(self) -> None:
        """Flush the bytes to stable storage, in the writing thread; afterwards the file may
        be committed. Nothing written (an empty upload): nothing to flush."""
        if self._file is None:
            return
        started = time.perf_counter()
        os.fsync(self._file.fileno())
        self._file.close()
        self.fsync_seconds = time.perf_counter() - started

    def _discard_sync(self) -> None:
        if self._file is not None:
            self._file.close()
        self.path.unlink(missing_ok=True)

    async def discard(self) -> None:
        await asyncio.to_thread(self._discard_sync)


class DataDirectoryInUse(OSError):
    """Another process holds the data directory (see `Storage.prepare`)."""


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.data_dir = settings.data_dir
        self.incoming_dir = settings.incoming_dir
        self.quarantine_dir = settings.quarantine_dir
        self._write_probe: tuple[float, bool] | None = None  # (when, result)
        self._lock_descriptor: int | None = None

    def prepare(self) -> int:
        """Take the data directory for this process, create the directories and remove
        temporaries left by a previous run; return how many.

        A second daemon started on the same directory (by hand, a second unit) would empty
        `.incoming/` under the first one's uploads and commit, adopt and sweep beside it with
        naming locks it does not share: it stops here (DataDirectoryInUse), before touching
        anything. The lock is the kernel's (flock): it goes with the process, even killed."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_data_directory()
        try:
            for directory in (self.incoming_dir, self.quarantine_dir):
                directory.mkdir(parents=True, exist_ok=True)
            leftovers = 0
            for leftover in self.incoming_dir.iterdir():
                if stat.S_ISDIR(leftover.lstat().st_mode):  # not the daemon's: left alone
                    log.warning("incoming_directory_left", name=repr(leftover.name)[1:-1][:200])
                    continue
                leftover.unlink(missing_ok=True)
                leftovers += 1
            if leftovers:
                fsync_directory(self.incoming_dir)
        except BaseException:
            self.release()
            raise
        return leftovers

    def _take_data_directory(self) -> None:
        descriptor = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                             0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(descriptor)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DataDirectoryInUse(
                    errno.EBUSY, f"the data directory {self.data_dir} is in use by another "
                    "dqm-daemon") from None
            raise
        self._lock_descriptor = descriptor

    def release(self) -> None:
        """Give the data directory up (the daemon stops)."""
        if self._lock_descriptor is not None:
            os.close(self._lock_descriptor)
            self._lock_descriptor = None

    async def writable(self) -> bool:
        """`can_write`, probed at most every WRITE_PROBE_SECONDS: health checks come often, and
        under heavy writes even creating an empty file can take a while."""
        now = time.monotonic()
        if self._write_probe is None or now - self._write_probe[0] > WRITE_PROBE_SECONDS:
            self._write_probe = (now, await asyncio.to_thread(self.can_write))
        return self._write_probe[1]

    def can_write(self) -> bool:
        """Really create (and remove) a file where uploads land: permissions, a read-only
        mount, a full disk or a missing directory all show."""
        probe = self.incoming_dir / f"health-{uuid.uuid4().hex}{INCOMING_SUFFIX}"
        try:
            descriptor = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError:
            return False
        os.close(descriptor)
        probe.unlink(missing_ok=True)
        return True

    def free_bytes(self) -> int:
        """Free space in the data directory; 0 when it cannot be known (the directory is gone
        or unreadable): no room is promised then, and the write probe says why."""
        try:
            stats = os.statvfs(self.data_dir)
        except OSError:
            return 0
        return stats.f_bavail * stats.f_frsize

    def path_of(self, name: str, location: str) -> Path:
        """The path of a cataloged file. `name` comes from the catalog, never from a request."""
        return (self.quarantine_dir if location == IN_QUARANTINE else self.data_dir) / name

    def incoming_file(self, with_md5: bool = False) -> IncomingFile:
        """A new upload's temporary file in `.incoming/` (created by its first write)."""
        return IncomingFile(self.incoming_dir / f"{uuid.uuid4().hex}{INCOMING_SUFFIX}", with_md5)

    def _link_sync(self, incoming: IncomingFile, name: str) -> bool:
        target = self.data_dir / name
        try:
            os.link(incoming.path, target)  # fails if the name is taken: never overwrites
        except FileExistsError:
            return False
        incoming.path.unlink()
        fsync_directory(self.data_dir)
        return True

    async def link_into_place(self, incoming: IncomingFile, name: str) -> bool:
        """Give a finished upload its name in the data directory; False if the name is taken."""
        return await asyncio.to_thread(self._link_sync, incoming, name)

    def _remove_placed_sync(self, name: str) -> None:
        (self.data_dir / name).unlink(missing_ok=True)
        fsync_directory(self.data_dir)

    async def remove_placed(self, name: str) -> None:
        """Undo `link_into_place` for a file that could not be cataloged."""
        await asyncio.to_thread(self._remove_placed_sync, name)

    def current_location(self, name: str, location: str) -> str:
        """Where a cataloged file really is: a crash between moving a file to quarantine and
        recording it leaves the catalog one step behind."""
        if location == IN_DATA_DIR and not (self.data_dir / name).exists() and (
            self.quarantine_dir / name
        ).exists():
            return IN_QUARANTINE
        return location

    def _quarantine_sync(self, name: str) -> None:
        source = self.data_dir / name
        if not source.exists():
            return  # already moved by an earlier, interrupted run
        target = self.quarantine_dir / name
        if target.exists():
            # Something uncataloged already has that name: keep it, beside, never overwrite.
            os.rename(target, target.with_name(f"{name}.stray-{uuid.uuid4().hex[:8]}"))
        os.rename(source, target)
        fsync_directory(self.quarantine_dir)
        fsync_directory(self.data_dir)

    def taken(self, name: str) -> bool:
        """A file of that name in the data directory or in quarantine."""
        return (self.data_dir / name).exists() or (self.quarantine_dir / name).exists()

    def _rename_quarantined_sync(self, name: str, new_name: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # moved by an earlier, interrupted run
            os.rename(self.quarantine_dir / name, self.quarantine_dir / new_name)
            fsync_directory(self.quarantine_dir)

    def _remove_quarantined_sync(self, name: str) -> None:
        (self.quarantine_dir / name).unlink(missing_ok=True)
        fsync_directory(self.quarantine_dir)

    async def remove_quarantined(self, name: str) -> None:
        await asyncio.to_thread(self._remove_quarantined_sync, name)

    def quarantined_file_names(self) -> list[str]:
        """The regular files in the quarantine, by name."""
        names = []
        with os.scandir(self.quarantine_dir) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    names.append(entry.name)
        return names

    def remove_untracked_quarantined(self, name: str, modified_before: float) -> bool:
        """Remove a regular file of the quarantine last modified before `modified_before`."""
        path = self.quarantine_dir / name
        try:
            status = path.lstat()
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(status.st_mode) or status.st_mtime >= modified_before:
            return False
        path.unlink(missing_ok=True)
        fsync_directory(self.quarantine_dir)
        log.info("untracked_quarantined_file_removed", file=repr(name)[1:-1][:200])
        return True

    async def rename_quarantined(self, name: str, new_name: str) -> None:
        await asyncio.to_thread(self._rename_quarantined_sync, name, new_name)

    async def quarantine(self, name: str) -> None:
        """Move an invalid file out of the data directory, kept for experts."""
        await asyncio.to_thread(self._quarantine_sync, name)

    def unknown_dqm_files(self, known_names: set[str]) -> Iterator[Path]:
        """DQM files in the data directory that the catalog does not know (to adopt at start-up).
        Only regular files under names an upload could have (letters, digits and `_.+-`): a
        symlink would serve a file from elsewhere, and a name with quotes or control characters
        cannot go into a download's header. Those are left alone, with a warning."""
        for path in sorted(self.data_dir.glob("*DQM*.root")):
            if path.name in known_names:
                continue
            try:
                regular = stat.S_ISREG(path.lstat().st_mode)
            except OSError:
                continue  # removed meanwhile
            if regular and ADOPTABLE_NAME.fullmatch(path.name):
                yield path
            else:
                log.warning("file_not_adopted", file=repr(path.name)[1:-1][:200],
                            reason="not a regular file" if not regular else "unsafe name")


class HashingStopped(Exception):
    """`sha256_of_file` was told to stop (the daemon is shutting down)."""


def sha256_of_regular_file(path: Path, chunk_bytes: int,
                           stop: threading.Event | None = None) -> str | None:
    """`sha256_of_file` of a regular file; None for anything else at `path` (a symlink, a
    FIFO that would block the read for ever, a directory), which is never taken as a file."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a FIFO or socket
            return None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # a directory, a device
        os.close(descriptor)
        return None
    with open(descriptor, "rb") as opened:
        return _sha256_of_open_file(opened, chunk_bytes, stop, path)


def sha256_of_file(path: Path, chunk_bytes: int, stop: threading.Event | None = None) -> str:
    """The file's SHA-256; with `stop`, given up (HashingStopped) as soon as it is set: a
    thread cannot be cancelled, and one hashing tens of GiB would hold up the daemon's exit."""
    with open(path, "rb") as stored:
        return _sha256_of_open_file(stored, chunk_bytes, stop, path)


def _sha256_of_open_file(stored: BinaryIO, chunk_bytes: int, stop: threading.Event | None,
                         path: Path) -> str:
    digest = hashlib.sha256()
    while chunk := stored.read(chunk_bytes):
        if stop is not None and stop.is_set():
            raise HashingStopped(str(path))
        digest.update(chunk)
    return digest.hexdigest()
