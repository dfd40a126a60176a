"""The machine's own limit for a receiver that proves integrity: the least work any such
receiver must do. Each connection sends `LENGTH\\n` then the bytes; they are hashed with
SHA-256, written to a file and fsynced; the answer is the digest. A thread per connection.

    python benchmarks/baseline_receiver.py PORT DIRECTORY
"""

import hashlib
import os
import socket
import sys
import threading
import uuid

CHUNK = 1024 * 1024


def receive(connection: socket.socket, directory: str) -> None:
    with connection:
        reader = connection.makefile("rb", buffering=0)
        length = int(reader.readline())
        digest = hashlib.sha256()
        path = os.path.join(directory, uuid.uuid4().hex)
        with open(path, "wb", buffering=0) as target:
            remaining = length
            buffer = bytearray(CHUNK)
            view = memoryview(buffer)
            while remaining:
                got = connection.recv_into(view, min(CHUNK, remaining))
                if not got:
                    return
                digest.update(view[:got])
                target.write(view[:got])
                remaining -= got
            os.fsync(target.fileno())
        connection.sendall(digest.hexdigest().encode() + b"\n")


def main() -> None:
    port, directory = int(sys.argv[1]), sys.argv[2]
    listener = socket.create_server(("127.0.0.1", port), backlog=256)
    print("ready", flush=True)
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=receive, args=(connection, directory), daemon=True).start()


if __name__ == "__main__":
    main()
