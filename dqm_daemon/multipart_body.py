"""A sans-IO streaming parser of `multipart/form-data` bodies (RFC 7578, RFC 2046) that extracts one
field's content without copying it.

Feed it the body in pieces; it returns memoryviews into each piece that hold the wanted field's
content. The search is one `bytes.find` per piece (plus O(1) Python work), so large uploads stream
at memory speed; everything but the wanted part's content is skipped in bounded memory."""

from __future__ import annotations

import re
import warnings

from aiohttp.multipart import (
    BadContentDispositionHeader,
    BadContentDispositionParam,
    parse_content_disposition,
)

# aiohttp warns about a malformed part header: under the default filter each distinct one is
# printed raw to stderr (client bytes in the log) and remembered for ever (memory any client
# can grow). A malformed part header is the client's fault and is answered as such.
warnings.filterwarnings("ignore", category=BadContentDispositionHeader)
warnings.filterwarnings("ignore", category=BadContentDispositionParam)

MAX_BOUNDARY_LENGTH = 70  # RFC 2046, section 5.1.1

# One `; name=value` parameter of a Content-Type header value; the value is quoted or a bare token.
_PARAMETER = re.compile(r';\s*([^\s;=]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_QUOTED_PAIR = re.compile(r"\\(.)")

_BODY, _HEAD, _EPILOGUE = "body", "head", "epilogue"


class MalformedMultipart(ValueError):
    """The body is not the multipart/form-data it claims to be; str(exc) is a short reason for a client."""


def boundary_from_content_type(content_type: str) -> bytes:
    """The boundary parameter of a `multipart/...` Content-Type header value, as bytes."""
    media_type, _, parameters = content_type.partition(";")
    if not media_type.strip().lower().startswith("multipart/"):
        raise MalformedMultipart("the Content-Type is not multipart")
    for match in _PARAMETER.finditer(";" + parameters):
        if match.group(1).lower() != "boundary":
            continue
        value = match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
        if not value:
            raise MalformedMultipart("the multipart boundary is empty")
        if len(value) > MAX_BOUNDARY_LENGTH:
            raise MalformedMultipart("the multipart boundary is longer than 70 characters")
        if not (value.isascii() and value.isprintable()):
            raise MalformedMultipart("the multipart boundary is not printable ASCII")
        return value.encode("ascii")
    raise MalformedMultipart("the Content-Type has no multipart boundary")


class MultipartField:
    """The state of one body being parsed: where we are (preamble or part content, a part's header
    block, epilogue), the few bytes carried between pieces, and whether the wanted part was seen."""

    def __init__(self, boundary: bytes, field_name: str = "file", max_header_bytes: int = 16 * 1024) -> None:
        if not boundary or len(boundary) > MAX_BOUNDARY_LENGTH or b"\r" in boundary or b"\n" in boundary:
            raise MalformedMultipart("invalid multipart boundary")
        self._delimiter = b"\r\n--" + bytes(boundary)  # it has no CR but its first byte
        self._field_name = field_name
        self._max_header_bytes = max_header_bytes
        self._state = _BODY
        # The bytes at the end of the last piece that may start a delimiter. The body may start with
        # `--boundary` directly: starting with a CRLF makes every delimiter `\r\n--boundary`.
        self._carry = b"\r\n"
        self._head = bytearray()  # after a delimiter: padding, CRLF, header block, blank line
        self._head_start: int | None = None  # where in _head the CRLF that ends the delimiter line is
        self._wanted = False  # the current part's content is the field's
        self._found = False

    @property
    def found(self) -> bool:
        """True once the wanted field's part header has been seen."""
        return self._found

    @property
    def complete(self) -> bool:
        """True once the closing delimiter `--boundary--` has been seen."""
        return self._state is _EPILOGUE

    def feed(self, data: bytes | bytearray, end: int | None = None) -> list[memoryview]:
        """Parse data[:end]; return the pieces of the wanted field's content in it, as memoryviews into
        `data` (or, for a few bytes carried over from the previous piece, into a small bytes)."""
        stop = len(data) if end is None else end
        if not 0 <= stop <= len(data):
            raise ValueError(f"end {end} is outside the data (length {len(data)})")
        pieces: list[memoryview] = []
        view = memoryview(data)
        pos = 0
        try:
            while pos < stop and self._state is not _EPILOGUE:
                if self._state is _BODY:
                    pos = self._feed_content(data, view, pos, stop, pieces)
                else:
                    pos = self._feed_head(view, pos, stop)
        except BaseException:
            for piece in pieces:  # the traceback must not keep the caller's buffer exported
                piece.release()
            view.release()
            raise
        return pieces

    def finish(self) -> None:
        """End of the body: raise MalformedMultipart unless the closing delimiter was seen."""
        if self._state is not _EPILOGUE:
            raise MalformedMultipart("unterminated multipart body: no closing boundary delimiter")

    def _feed_content(
        self, data: bytes | bytearray, view: memoryview, pos: int, stop: int, pieces: list[memoryview]
    ) -> int:
        """Consume content (or preamble) from data[pos:stop] up to the next delimiter; return the new pos."""
        delimiter = self._delimiter
        carry = self._carry
        if carry:
            # A delimiter that starts in the carry ends within the next len(delimiter) - 1 bytes.
            joined = carry + bytes(view[pos : min(stop, pos + len(delimiter) - 1)])
            found = joined.find(delimiter)
            if 0 <= found < len(carry):
                self._emit(pieces, memoryview(carry)[:found])
                self._carry = b""
                self._state = _HEAD
                return pos + found + len(delimiter) - len(carry)
            kept = len(joined) - self._partial_delimiter(joined, 0, len(joined))
            if kept < len(carry):  # a delimiter may start in the carry, and the piece is all used
                self._emit(pieces, memoryview(joined)[:kept])
                self._carry = joined[kept:]
                return stop
            self._emit(pieces, memoryview(carry))
            self._carry = b""
        found = data.find(delimiter, pos, stop)
        if found >= 0:
            self._emit(pieces, view[pos:found])
            self._state = _HEAD
            return found + len(delimiter)
        kept = stop - self._partial_delimiter(data, pos, stop)
        self._emit(pieces, view[pos:kept])
        self._carry = bytes(view[kept:stop])
        return stop

    def _partial_delimiter(self, data: bytes | bytearray, pos: int, stop: int) -> int:
        """The length of the longest end of data[pos:stop] that is a proper start of the delimiter.
        Only the delimiter's first byte is a CR, so that end starts at the last CR."""
        cr = data.rfind(b"\r", max(pos, stop - len(self._delimiter) + 1), stop)
        if cr >= 0 and data[cr:stop] == self._delimiter[: stop - cr]:
            return stop - cr
        return 0

    def _emit(self, pieces: list[memoryview], piece: memoryview) -> None:
        if self._wanted and piece.nbytes:
            pieces.append(piece)

    def _feed_head(self, view: memoryview, pos: int, stop: int) -> int:
        """Consume the rest of a delimiter line and a part's header block; return the new pos."""
        head = self._head
        before = len(head)
        limit = self._max_header_bytes + 4
        head += view[pos : pos + min(stop - pos, limit - before)]  # at most the limit is copied
        if self._head_start is None:
            if head.startswith(b"--"):
                self._state = _EPILOGUE  # the closing delimiter: the rest is the epilogue
                return stop
            padding = len(head) - len(head.lstrip(b" \t"))
            line_end = head[padding : padding + 2]
            if line_end == b"\r\n":
                self._head_start = padding
            elif line_end not in (b"", b"\r") and head != b"-":
                raise MalformedMultipart("unexpected bytes after a multipart boundary delimiter")
        if self._head_start is not None:
            blank = head.find(b"\r\n\r\n", max(self._head_start, before - 3))
            if blank >= 0:
                self._start_part(bytes(head[self._head_start + 2 : blank]))
                head.clear()
                self._head_start = None
                self._state = _BODY
                return pos + blank + 4 - before
        if len(head) >= limit:
            raise MalformedMultipart("multipart part header block too large")
        return stop

    def _start_part(self, header_block: bytes) -> None:
        """Parse a part's header lines and decide whether its content is the wanted field's."""
        disposition = None
        for line in header_block.split(b"\r\n") if header_block else ():
            name, colon, value = line.partition(b":")
            if not colon or not name.strip():
                raise MalformedMultipart("multipart part header line without a colon")
            if disposition is None and name.strip().lower() == b"content-disposition":
                # aiohttp warns about (and ignores) a trailing semicolon, as browsers never send one
                disposition = value.strip(b" \t;").decode("utf-8", "surrogateescape")
        try:
            disptype, params = parse_content_disposition(disposition)
        except (BadContentDispositionHeader, BadContentDispositionParam):  # when warnings are errors
            disptype, params = None, {}
        self._wanted = not self._found and disptype == "form-data" and params.get("name") == self._field_name
        self._found = self._found or self._wanted
