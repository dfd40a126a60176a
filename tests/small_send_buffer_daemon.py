"""The real daemon (`python -m dqm_daemon ...`), its accepted connections given a small fixed
send buffer, as a slow WAN link has early on (on loopback Linux grows it to megabytes, which
hides a loop blocked in send())."""

import socket
import sys

from dqm_daemon import cli

SEND_BUFFER_BYTES = 16384
_accept = socket.socket.accept


def accept_with_a_small_send_buffer(self):
    connection, address = _accept(self)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    return connection, address


socket.socket.accept = accept_with_a_small_send_buffer

if __name__ == "__main__":
    sys.exit(cli.main())
