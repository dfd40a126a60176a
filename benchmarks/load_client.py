"""Upload load for the benchmarks, run as its own process so it never shares a core's GIL with
the receiver under test. Prints one JSON line: seconds, bytes, statuses, per-upload seconds.

    python benchmarks/load_client.py MODE PORT --count N --concurrency C --size BYTES
        [--prefix ROOT_FILE] [--files ROOT_FILE...] [--token T] [--run-base R]

MODE: raw (the baseline receiver), http (dqm-daemon, raw body), multipart (dqm-daemon or the
FastAPI comparator, multipart field `file`). With --files, each upload sends one of those files
whole (small-file mode) instead of a --size body.
"""

import argparse
import json
import os
import socket
import threading
import time

PAD_CHUNK = os.urandom(4 * 1024 * 1024)
BOUNDARY = b"dqm-benchmark-boundary"


def body_chunks(prefix: bytes, size: int):
    yield prefix
    remaining = size - len(prefix)
    while remaining > 0:
        piece = PAD_CHUNK if remaining >= len(PAD_CHUNK) else PAD_CHUNK[:remaining]
        remaining -= len(piece)
        yield piece


def read_status(connection: socket.socket) -> int:
    answer = b""
    while b"\r\n" not in answer and b"\n" not in answer:
        data = connection.recv(65536)
        if not data:
            break
        answer += data
    if answer.startswith(b"HTTP/"):
        status = int(answer.split(b" ")[1])
        # read the rest so the server is not cut off mid-answer
        connection.shutdown(socket.SHUT_WR)
        while connection.recv(65536):
            pass
        return status
    return 200 if len(answer.strip()) == 64 else 0


def upload(mode: str, port: int, content_parts, size: int, run: int, token: str) -> int:
    with socket.create_connection(("127.0.0.1", port)) as connection:
        if mode == "raw":
            connection.sendall(f"{size}\n".encode())
            for part in content_parts:
                connection.sendall(part)
            return read_status(connection)
        head_fields = (f"token: {token}\r\nrunNumber: {run}\r\ntimeStamp: {1700000000 + run}\r\n"
                       f"amoreAgent: BENCH\r\nConnection: close\r\n")
        if mode == "multipart":
            preamble = (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"file\"; "
                        b"filename=\"f.root\"\r\nContent-Type: application/octet-stream\r\n\r\n")
            closing = b"\r\n--" + BOUNDARY + b"--\r\n"
            length = len(preamble) + size + len(closing)
            connection.sendall(
                (f"POST /rest/api/files HTTP/1.1\r\nHost: x\r\n{head_fields}"
                 f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n"
                 f"Content-Length: {length}\r\n\r\n").encode() + preamble)
            for part in content_parts:
                connection.sendall(part)
            connection.sendall(closing)
        else:
            connection.sendall(
                (f"POST /rest/api/files HTTP/1.1\r\nHost: x\r\n{head_fields}"
                 f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
                 ).encode())
            for part in content_parts:
                connection.sendall(part)
        return read_status(connection)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["raw", "http", "multipart"])
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--prefix", help="a ROOT file sent first (the rest is padding)")
    parser.add_argument("--files", nargs="*", default=[])
    parser.add_argument("--token", default="benchmark-token")
    parser.add_argument("--run-base", type=int, default=0)
    arguments = parser.parse_args()
    prefix = open(arguments.prefix, "rb").read() if arguments.prefix else b""
    small_files = [open(path, "rb").read() for path in arguments.files]
    next_index = iter(range(arguments.count))
    lock = threading.Lock()
    statuses, durations, sent = [], [], [0]

    def worker() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            if small_files:
                content = small_files[index % len(small_files)]
                parts, size = [content], len(content)
            else:
                parts, size = body_chunks(prefix, arguments.size), arguments.size
            started = time.perf_counter()
            try:
                status = upload(arguments.mode, arguments.port, parts, size,
                                arguments.run_base + index, arguments.token)
            except OSError:  # refused or reset: counted, not hidden
                status = -1
            with lock:
                statuses.append(status)
                durations.append(time.perf_counter() - started)
                sent[0] += size

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(arguments.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"seconds": time.perf_counter() - started, "bytes": sent[0],
                      "statuses": statuses, "durations": durations}))


if __name__ == "__main__":
    main()
