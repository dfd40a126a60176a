"""A floor for the small-file figure: the leanest aiohttp receiver, with nothing of the daemon
but its promised work, to tell what any aiohttp receiver keeping those promises can reach on
this machine. A measuring tool, not a receiver: no logs, metrics, limits, names or recovery.

    python benchmarks/aiohttp_floor.py PORT DATA_DIR --work promised|comparator

Two pre-forked worker processes share one listening socket (as uvicorn --workers 2 does). Each
upload's multipart field `file` is streamed with aiohttp's reader into a temporary file, then,
in one hand-off to a thread:
- `promised`: what dqm-daemon promises for every file before its answer: SHA-256 of the bytes
  (while they stream), fsync, the structure check (`root_structure`, every key and payload
  framing, the full listing), a link under a new name and the directory's fsync, and one
  durable SQLite row (WAL, synchronous=FULL) holding the listing;
- `comparator`: what the FastAPI comparator does: fsync, uproot's top-level key listing, and a
  rename under a new name.
Token checked as the daemon's (DQM_DAEMON_TOKEN); answers `received` as the daemon does.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import sqlite3
import sys
import threading
import uuid
from pathlib import Path

import uproot
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dqm_daemon.root_structure import read_structure  # noqa: E402

WORKERS = 2
CHUNK_BYTES = 1024 * 1024


class Receiver:
    def __init__(self, data_dir: Path, work: str, token: str) -> None:
        self.data_dir, self.work, self.token = data_dir, work, token
        self.catalog_path = data_dir / "catalog.sqlite"
        self.connections = threading.local()  # one SQLite connection per thread

    def create_catalog(self) -> None:
        with sqlite3.connect(self.catalog_path) as catalog:
            catalog.execute("PRAGMA journal_mode=WAL")
            catalog.execute("CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, "
                            "sha256 TEXT, size INTEGER, objects TEXT)")

    async def post(self, request: web.Request) -> web.Response:
        if request.headers.get("token") != self.token:
            return web.json_response({"message": "bad token"}, status=401)
        prefix = f"{request.headers['amoreAgent']}histos_{int(request.headers['runNumber'])}"
        reader = await request.multipart()
        part = await reader.next()
        while part is not None and part.name != "file":
            part = await reader.next()
        if part is None:
            return web.json_response({"message": "no field file"}, status=400)
        digest = hashlib.sha256() if self.work == "promised" else None
        temporary = self.data_dir / f".incoming-{uuid.uuid4().hex}"
        size = 0
        with open(temporary, "wb") as target:
            while chunk := await part.read_chunk(CHUNK_BYTES):
                if digest is not None:
                    digest.update(chunk)
                target.write(chunk)
                size += len(chunk)
        finish = self.keep_promises if digest is not None else self.comparator_work
        name, received = await asyncio.to_thread(finish, temporary, prefix, size,
                                                 digest.hexdigest() if digest else "")
        return web.json_response({"status": 200, "filename": name, "received": received,
                                  "size": size})

    def keep_promises(self, temporary: Path, prefix: str, size: int,
                      sha256: str) -> tuple[str, dict]:
        _fsync(temporary)
        structure = read_structure(temporary, 100_000, 8 * 1024 * 1024)
        listing = json.dumps([{"path": entry.path, "class": entry.class_name,
                               "title": entry.title} for entry in structure.entries])
        received = {entry.path: f"Obj name: {entry.path}, Obj IsA() Name: {entry.class_name}"
                    for entry in structure.entries if entry.top_level}
        name = f"{prefix}_{uuid.uuid4().hex}.root"
        os.link(temporary, self.data_dir / name)
        os.unlink(temporary)
        _fsync(self.data_dir)
        catalog = getattr(self.connections, "catalog", None)
        if catalog is None:
            catalog = self.connections.catalog = sqlite3.connect(self.catalog_path, timeout=30)
            catalog.execute("PRAGMA synchronous=FULL")
        with catalog:
            catalog.execute("INSERT INTO files VALUES (?, ?, ?, ?)", (name, sha256, size, listing))
        return name, received

    def comparator_work(self, temporary: Path, prefix: str, size: int,
                        sha256: str) -> tuple[str, dict]:
        _fsync(temporary)
        with uproot.open(temporary) as root_file:
            classes = root_file.classnames(recursive=False, cycle=False)
        name = f"{prefix}_{uuid.uuid4().hex}.root"
        os.rename(temporary, self.data_dir / name)
        return name, {key: f"Obj name: {key}, Obj IsA() Name: {class_name}"
                      for key, class_name in classes.items()}


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def serve(receiver: Receiver, listening: socket.socket) -> None:
    app = web.Application()
    app.router.add_post("/rest/api/files", receiver.post)

    async def run() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, listening).start()
        await asyncio.Event().wait()

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--work", choices=["promised", "comparator"], required=True)
    arguments = parser.parse_args()
    arguments.data_dir.mkdir(parents=True, exist_ok=True)
    receiver = Receiver(arguments.data_dir, arguments.work, os.environ["DQM_DAEMON_TOKEN"])
    receiver.create_catalog()
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind(("127.0.0.1", arguments.port))
    listening.listen(512)
    listening.setblocking(False)
    workers = []
    for _ in range(WORKERS):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            serve(receiver, listening)
            os._exit(0)
        workers.append(pid)

    def stop(*_: object) -> None:
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    for pid in workers:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
