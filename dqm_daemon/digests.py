"""End-to-end integrity: the digests an agent may send with its file (`Repr-Digest: sha-256=:…:`,
RFC 9530, or `Content-MD5`), checked against the bytes the daemon wrote.

Both cover the file's bytes, whether sent raw or as the multipart field `file`.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Mapping

from aiohttp import web

# `sha-256=:BASE64:` items of a structured-field dictionary; other algorithms are ignored.
_REPR_DIGEST_ITEM = re.compile(r"\s*([a-z0-9-]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*")


@dataclasses.dataclass(frozen=True)
class ExpectedDigests:
    sha256: bytes | None = None
    md5: bytes | None = None

    @property
    def wants_md5(self) -> bool:
        return self.md5 is not None


def _decode(value: str, header: str, length: int) -> bytes:
    try:
        digest = base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, or not ASCII at all
        raise web.HTTPBadRequest(text=f"Header {header} is not valid base64: {value!r}") from None
    if len(digest) != length:
        raise web.HTTPBadRequest(
            text=f"Header {header} holds {len(digest)} bytes, a digest of {length} was expected"
        )
    return digest


def expected_digests(headers: Mapping[str, str]) -> ExpectedDigests:
    """The digests the request announces; a malformed one is refused before any byte is read."""
    sha256 = md5 = None
    repr_digest = headers.get("Repr-Digest")
    if repr_digest is not None:
        for item in repr_digest.split(","):
            match = _REPR_DIGEST_ITEM.fullmatch(item)
            if match is None:
                raise web.HTTPBadRequest(
                    text=f"Header Repr-Digest is malformed: {repr_digest!r} "
                    "(expected sha-256=:BASE64:)"
                )
            if match[1] == "sha-256":
                sha256 = _decode(match[2], "Repr-Digest sha-256", 32)
    content_md5 = headers.get("Content-MD5")
    if content_md5 is not None:
        md5 = _decode(content_md5.strip(), "Content-MD5", 16)
    return ExpectedDigests(sha256=sha256, md5=md5)


def check_digests(expected: ExpectedDigests, sha256_hex: str, md5: bytes | None) -> None:
    """400 naming both digests when what was written is not what the agent had."""
    received_sha256 = bytes.fromhex(sha256_hex)
    if expected.sha256 is not None and expected.sha256 != received_sha256:
        raise web.HTTPBadRequest(
            text="Repr-Digest mismatch: the agent sent "
            f"sha-256=:{base64.b64encode(expected.sha256).decode()}:, the daemon received "
            f"sha-256=:{base64.b64encode(received_sha256).decode()}:; nothing was kept"
        )
    if expected.md5 is not None and expected.md5 != md5:
        received = base64.b64encode(md5 or b"").decode()
        raise web.HTTPBadRequest(
            text=f"Content-MD5 mismatch: the agent sent {base64.b64encode(expected.md5).decode()}, "
            f"the daemon received {received}; nothing was kept"
        )
