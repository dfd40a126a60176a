"""Resumable uploads (tus 1.0): partial files in `.resumable/` of the data directory, each with a
small JSON sidecar, so an upload survives a dropped link and a daemon restart. A partial file is
never visible under a DQM name; when complete it is committed exactly like a POSTed file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from .naming import DQMHeaders
from .storage import fsync_directory, sha256_of_file

log = structlog.get_logger(__name__)

PART_SUFFIX, STATE_SUFFIX = ".part", ".json"
# A finished upload leaves this marker (the file it was stored as): a client that lost the last
# PATCH's answer learns it from HEAD, also after a restart, until the upload's expiry.
FINISHED_SUFFIX = ".finished"
# A second link to a complete upload's part file, which its commit consumes.
COMMIT_LINK_SUFFIX = ".commit"
# Touched at every sweep while the daemon runs: at the next start its age is how long the
# daemon was down, which is not its clients' inactivity.
ALIVE_FILE = ".alive"
FINISHED_KEPT = 1000


@dataclasses.dataclass
class ResumableUpload:
    upload_id: str
    length: int
    offset: int
    dqm: DQMHeaders
    uploader: str
    expected_sha256: bytes | None  # from Repr-Digest at creation, checked at completion
    last_activity: float  # unix seconds
    path: Path
    # The running hash of the bytes so far; lost on restart (recomputed at completion then).
    hasher: Any = None
    # Where a chunk whose Upload-Checksum is not yet verified began: bytes past it are dropped
    # if the daemon dies before the check (what a checksum does not vouch for is not kept).
    unverified_from: int | None = None
    # Upload-Metadata as the client sent it at creation: HEAD answers it back (tus requires).
    metadata: str | None = None
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    @property
    def remaining(self) -> int:
        return self.length - self.offset

    def state(self) -> dict[str, Any]:
        return {"length": self.length, "offset": self.offset, "uploader": self.uploader,
                "dqm": dataclasses.asdict(self.dqm), "last_activity": self.last_activity,
                "expected_sha256": self.expected_sha256.hex() if self.expected_sha256 else None,
                "unverified_from": self.unverified_from, "metadata": self.metadata}


@dataclasses.dataclass(frozen=True)
class FinishedAnswer:
    """What HEAD says of a finished upload: the file it was stored as (its name then, and its
    headers and bytes, which find it if that name went to another file since)."""

    name: str
    length: int
    finished_at: float  # unix seconds
    sha256: str
    agent: str
    run: int
    timestamp: int
    metadata: str | None  # Upload-Metadata as the client sent it at creation

    @classmethod
    def from_json(cls, text: str) -> FinishedAnswer:
        """Raises ValueError, KeyError or TypeError for a marker that is not whole."""
        fields = json.loads(text)
        metadata = fields["metadata"]
        return cls(str(fields["name"]), int(fields["length"]), float(fields["finished_at"]),
                   str(fields["sha256"]), str(fields["agent"]), int(fields["run"]),
                   int(fields["timestamp"]), None if metadata is None else str(metadata))


class TooManyUnfinished(Exception):
    """As many unfinished uploads as allowed exist already."""


class FinishedUpload:
    """A complete resumable upload, shaped like an IncomingFile for `Ingest.commit`. Its `path`
    is a second link to the part file, which the commit consumes (links into place or
    discards); the part file and the state stay until the upload's marker is written
    (`record_finished`), so a crash in between finds the upload complete and commits it again,
    as the same file."""

    def __init__(self, path: Path, size: int, sha256: str) -> None:
        self.path, self.size, self.sha256 = path, size, sha256

    async def discard(self) -> None:
        await asyncio.to_thread(self.path.unlink, missing_ok=True)


class ResumableUploads:
    def __init__(self, directory: Path, expiry_seconds: float,
                 unstarted_expiry_seconds: float | None = None,
                 max_unfinished: int = 1000) -> None:
        self.directory = directory
        self.max_unfinished = max_unfinished
        self.expiry_seconds = expiry_seconds
        self.unstarted_expiry_seconds = min(expiry_seconds,
                                            unstarted_expiry_seconds or expiry_seconds)
        self._uploads: dict[str, ResumableUpload] = {}
        # Recently finished uploads (oldest first), for a client that lost the last answer.
        self._finished: OrderedDict[str, FinishedAnswer] = OrderedDict()

    async def record_finished(self, upload: ResumableUpload, name: str, sha256: str) -> None:
        """A committed upload (stored as `name`): its marker replaces its state and part file.
        Until the marker is on disk a restart finds the upload complete and commits it again
        (as the same file: a duplicate)."""
        answer = FinishedAnswer(name, upload.length, time.time(), sha256, upload.dqm.agent,
                                upload.dqm.run_number, upload.dqm.timestamp, upload.metadata)
        marker = self.directory / f"{upload.upload_id}{FINISHED_SUFFIX}"

        def write_marker() -> None:
            temporary = marker.with_name(f"{marker.name}.tmp")
            try:
                with open(temporary, "w", encoding="utf-8") as marker_file:
                    marker_file.write(json.dumps(dataclasses.asdict(answer)))
                    marker_file.flush()
                    os.fsync(marker_file.fileno())
                os.replace(temporary, marker)
                fsync_directory(self.directory)
            except OSError as exc:  # a full disk: HEAD says it until a restart only
                temporary.unlink(missing_ok=True)
                log.warning("resumable_finished_marker_not_saved", upload_id=upload.upload_id,
                            error=exc.strerror or type(exc).__name__)
            self._remove_files_sync(upload.upload_id)
            fsync_directory(self.directory)

        self._finished.pop(upload.upload_id, None)  # a second commit (after a crash): newest
        self._finished[upload.upload_id] = answer
        await asyncio.to_thread(write_marker)

    def finished_answer(self, upload_id: str) -> FinishedAnswer | None:
        return self._finished.get(upload_id)

    def _drop_old_answers(self, now: float) -> list[Path]:
        """Forget the finished answers past the expiry, and the oldest beyond FINISHED_KEPT;
        returns their markers, to be removed."""
        markers = []
        while self._finished:
            upload_id, answer = next(iter(self._finished.items()))
            if (answer.finished_at + self.expiry_seconds > now
                    and len(self._finished) <= FINISHED_KEPT):
                break
            del self._finished[upload_id]
            markers.append(self.directory / f"{upload_id}{FINISHED_SUFFIX}")
        return markers

    def expires_at(self, upload: ResumableUpload) -> float:
        """When an upload left as it is may be removed (unix seconds): its expiry after its last
        PATCH, or the shorter one after its creation if no byte came."""
        limit = self.expiry_seconds if upload.offset else self.unstarted_expiry_seconds
        return upload.last_activity + limit

    def reserved_bytes(self) -> int:
        """Bytes promised to unfinished uploads: they count against the free-disk reserve."""
        return sum(upload.remaining for upload in self._uploads.values())

    def __len__(self) -> int:
        return len(self._uploads)

    def get(self, upload_id: str) -> ResumableUpload | None:
        return self._uploads.get(upload_id)

    def _state_path(self, upload_id: str) -> Path:
        return self.directory / f"{upload_id}{STATE_SUFFIX}"

    def load(self) -> int:
        """At start-up: take back the unfinished uploads a previous run left. Their idle time
        goes on from where it stood when the daemon stopped (the daemon's downtime is not their
        clients' inactivity)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        try:
            downtime = max(now - (self.directory / ALIVE_FILE).stat().st_mtime, 0.0)
        except FileNotFoundError:  # a first start, or a data directory from before
            downtime = 0.0
        for state_path in self.directory.glob(f"*{STATE_SUFFIX}"):
            upload_id = state_path.stem
            part = self.directory / f"{upload_id}{PART_SUFFIX}"
            try:
                state = json.loads(state_path.read_text())
                offset = part.stat().st_size  # the bytes really on disk decide
                unverified_from = state.get("unverified_from")
                # A part linked elsewhere is a stored file's bytes (a commit was cut short):
                # verified, and never to be cut.
                if (unverified_from is not None and offset > unverified_from
                        and part.stat().st_nlink == 1):
                    # The daemon died before checking a chunk's Upload-Checksum.
                    with open(part, "r+b") as part_file:
                        part_file.truncate(unverified_from)
                        os.fsync(part_file.fileno())
                    offset = unverified_from
                expected = state["expected_sha256"]
                upload = ResumableUpload(
                    upload_id=upload_id, length=state["length"],
                    offset=min(offset, state["length"]), dqm=DQMHeaders(**state["dqm"]),
                    uploader=state["uploader"],
                    expected_sha256=bytes.fromhex(expected) if expected else None,
                    last_activity=min(state["last_activity"] + downtime, now), path=part,
                    metadata=state.get("metadata"))
                if unverified_from is not None:
                    self._save(upload)  # bytes appended from here on are not in doubt
                self._uploads[upload_id] = upload
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("resumable_upload_unreadable", upload_id=upload_id)
                state_path.unlink(missing_ok=True)
                part.unlink(missing_ok=True)
        answers = []
        for marker in self.directory.glob(f"*{FINISHED_SUFFIX}"):
            try:
                answer = FinishedAnswer.from_json(marker.read_text())
            except (OSError, ValueError, KeyError, TypeError):
                marker.unlink(missing_ok=True)
                continue
            # As for unfinished uploads, the daemon's downtime does not count.
            answer = dataclasses.replace(answer, finished_at=min(answer.finished_at + downtime,
                                                                 now))
            answers.append((marker.stem, answer))
        for upload_id, answer in sorted(answers, key=lambda item: item[1].finished_at):
            self._finished[upload_id] = answer
        _remove_all(self._drop_old_answers(now))
        # Parts without state, half-written states and markers, commit links of commits cut.
        for leftover in self.directory.iterdir():
            keep = (leftover.stem in self._uploads or leftover.name == ALIVE_FILE
                    or (leftover.suffix == FINISHED_SUFFIX and leftover.stem in self._finished))
            if not keep:
                leftover.unlink(missing_ok=True)
        self.mark_alive()
        return len(self._uploads)

    def mark_alive(self) -> None:
        (self.directory / ALIVE_FILE).touch()

    def _save(self, upload: ResumableUpload) -> None:
        temporary = self._state_path(upload.upload_id).with_suffix(".tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as state_file:
                state_file.write(json.dumps(upload.state()))
                state_file.flush()
                os.fsync(state_file.fileno())
            os.replace(temporary, self._state_path(upload.upload_id))
        except BaseException:  # a full disk: the saved state stays as it was, whole
            temporary.unlink(missing_ok=True)
            raise

    async def create(self, length: int, dqm: DQMHeaders, uploader: str,
                     expected_sha256: bytes | None, metadata: str | None = None,
                     ) -> ResumableUpload:
        """A new unfinished upload. It counts (in `reserved_bytes` and against the limit) from
        this call on, before its files exist: creations running at once each see the others'."""
        if len(self._uploads) >= self.max_unfinished:
            raise TooManyUnfinished(self.max_unfinished)
        upload_id = uuid.uuid4().hex
        upload = ResumableUpload(upload_id=upload_id, length=length, offset=0, dqm=dqm,
                                 uploader=uploader, expected_sha256=expected_sha256,
                                 last_activity=time.time(),
                                 path=self.directory / f"{upload_id}{PART_SUFFIX}",
                                 hasher=hashlib.sha256(), metadata=metadata)

        def create_files() -> None:
            upload.path.touch(exist_ok=False)
            self._save(upload)
            fsync_directory(self.directory)

        self._uploads[upload_id] = upload
        try:
            await asyncio.to_thread(create_files)
        except BaseException:
            self._uploads.pop(upload_id, None)
            raise
        return upload

    def complete(self) -> list[ResumableUpload]:
        """Unfinished uploads holding all their bytes: after a restart, those whose last PATCH
        the daemon died answering; while it runs, those whose last PATCH failed after its last
        byte was written (the client gone before the end of its body, a full disk)."""
        return [upload for upload in self._uploads.values() if upload.offset == upload.length]

    async def begin_checksummed_chunk(self, upload: ResumableUpload) -> None:
        """Before a chunk with an Upload-Checksum is written: until it is verified, a restart
        drops it."""
        upload.unverified_from = upload.offset
        try:
            await asyncio.to_thread(self._save, upload)
        except BaseException:
            # Not marked on disk: bytes appended later (and acknowledged) must not be dropped
            # at the next start for a mark that stayed in memory.
            upload.unverified_from = None
            raise

    async def record_progress(self, upload: ResumableUpload) -> None:
        upload.last_activity = time.time()
        await asyncio.to_thread(self._save, upload)

    async def finish(self, upload: ResumableUpload, chunk_bytes: int,
                     stop: threading.Event | None = None) -> FinishedUpload:
        """The complete file, fsynced, with its SHA-256; no longer an unfinished upload.
        Hashing it (after a restart) stops with HashingStopped once `stop` is set."""

        def finish_sync() -> str:
            with open(upload.path, "rb+") as part:
                os.fsync(part.fileno())
            # Saved before the bytes share their inode with a stored file: a state still
            # marking a chunk unverified (its save failed) would have the next start truncate
            # the part, and the stored file with it.
            self._save(upload)
            link = self._commit_link(upload.upload_id)
            link.unlink(missing_ok=True)  # left by a commit that failed
            os.link(upload.path, link)
            if upload.hasher is not None:
                return upload.hasher.hexdigest()
            return sha256_of_file(upload.path, chunk_bytes, stop)  # after a restart

        sha256 = await asyncio.to_thread(finish_sync)
        return FinishedUpload(self._commit_link(upload.upload_id), upload.length, sha256)

    def _commit_link(self, upload_id: str) -> Path:
        return self.directory / f"{upload_id}{PART_SUFFIX}{COMMIT_LINK_SUFFIX}"

    def _remove_files_sync(self, upload_id: str) -> None:
        """An upload's part file, state and commit link (its marker stays)."""
        for path in (self.directory / f"{upload_id}{PART_SUFFIX}", self._state_path(upload_id),
                     self._commit_link(upload_id)):
            path.unlink(missing_ok=True)

    def forget(self, upload: ResumableUpload) -> None:
        """Finished (its answer remembered) or failed: no longer an unfinished upload. Until
        then a HEAD finds it at its full offset, still locked by the PATCH committing it."""
        self._uploads.pop(upload.upload_id, None)

    async def terminate(self, upload: ResumableUpload) -> None:
        self._uploads.pop(upload.upload_id, None)
        await asyncio.to_thread(self._remove_files_sync, upload.upload_id)

    async def sweep_expired(self) -> int:
        """Remove the unfinished uploads idle beyond their expiry; never a complete one (its
        client took it as done: it is committed, see `run_sweeper`). Finished uploads' answers
        go after the same time."""
        if old_markers := self._drop_old_answers(time.time()):
            await asyncio.to_thread(_remove_all, old_markers)
        expired = 0
        for upload in list(self._uploads.values()):
            # Checked right before each removal: a PATCH may have started meanwhile.
            if (time.time() <= self.expires_at(upload) or upload.lock.locked()
                    or upload.offset == upload.length):
                continue
            await self.terminate(upload)
            expired += 1
            log.info("resumable_upload_expired", upload_id=upload.upload_id,
                     offset=upload.offset, length=upload.length)
        return expired

    async def run_sweeper(self, interval_seconds: float,
                          commit_complete: Callable[[], Awaitable[int]]) -> None:
        """Every `interval_seconds`: commit the complete uploads (`commit_complete`), then
        remove the expired ones."""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await asyncio.to_thread(self.mark_alive)
                if committed := await commit_complete():
                    log.info("resumable_uploads_committed", count=committed)
                await self.sweep_expired()
            except Exception:
                log.exception("resumable_sweep_failed")


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
