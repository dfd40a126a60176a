"""The streaming multipart/form-data parser: exact field content whatever the split of the body,
agreement with aiohttp's own MultipartReader, rejection of malformed bodies."""

from __future__ import annotations

import asyncio
import io
import os
import random
import string
import warnings
from collections.abc import Iterable
from unittest import mock

import aiohttp
import pytest
from multidict import CIMultiDict

from dqm_daemon.multipart_body import (
    MalformedMultipart,
    MultipartField,
    boundary_from_content_type,
)

BOUNDARY = "----dqmBoundary7MA4YWxkTrZu0gW"
# A field is (name, content, filename or None); str content is sent as a text/plain field.
Field = tuple[str, "bytes | str", "str | None"]


def form_body(fields: Iterable[Field], boundary: str = BOUNDARY) -> bytes:
    """The body aiohttp's MultipartWriter makes of these fields."""
    writer = aiohttp.MultipartWriter("form-data", boundary=boundary)
    for name, content, filename in fields:
        large = isinstance(content, bytes) and len(content) > 1024 * 1024  # aiohttp warns otherwise
        part = writer.append(io.BytesIO(content) if large else content)
        if filename is None:
            part.set_content_disposition("form-data", name=name)
        else:
            part.set_content_disposition("form-data", name=name, filename=filename)
    return asyncio.run(writer.as_bytes())


def tricky(boundary: str = BOUNDARY) -> bytes:
    """Content full of bytes that look almost like a delimiter, without ever being one."""
    b = boundary.encode()
    delimiter = b"\r\n--" + b
    content = b"".join(
        [
            b"x--" + b + b"\r\n",  # the boundary without the CRLF before it
            delimiter[:-1] + b"\x00",  # all but the last byte of the delimiter
            b"\r\n--",
            delimiter[:5] + b"\r",
            b"\r\r\n-\r\n--\n--" + b + b"--",
            b"\r--" + b + b"\n--" + b,
            b"\r\n\r\n\r\n-- " + b,
            b"\r\n-",
        ]
    )
    assert delimiter not in content
    return content


def feed_pieces(parser: MultipartField, pieces: Iterable[bytes]) -> bytes:
    """Feed the pieces, copying out the views as they come back; return the field's content."""
    out = bytearray()
    for piece in pieces:
        for view in parser.feed(piece):
            out += view
    return bytes(out)


def extract(body: bytes, pieces: Iterable[bytes] | None = None, field: str = "file") -> bytes:
    """The field's content, with the whole body checked to be complete."""
    parser = MultipartField(BOUNDARY.encode(), field)
    content = feed_pieces(parser, [body] if pieces is None else pieces)
    parser.finish()
    assert parser.complete and parser.found
    return content


def random_pieces(body: bytes, rng: random.Random, largest: int) -> list[bytes]:
    """The body cut at random points, in pieces of 1 to `largest` bytes (small ones often)."""
    pieces, pos = [], 0
    while pos < len(body):
        size = rng.choice([1, 2, 3, rng.randint(1, 80), rng.randint(1, largest)])
        pieces.append(body[pos : pos + size])
        pos += size
    return pieces


def feed_via_buffer(parser: MultipartField, body: bytes, rng: random.Random, largest: int) -> bytes:
    """Feed the body as a socket reader does: into one reused bytearray, with `end`. The buffer
    starts full of delimiters, so a parser reading past `end` sees garbage."""
    delimiter = b"\r\n--" + BOUNDARY.encode()
    buffer = bytearray((delimiter * (largest // len(delimiter) + 1))[:largest])
    out = bytearray()
    pos = 0
    while pos < len(body):
        size = min(rng.choice([1, 7, rng.randint(1, largest)]), len(body) - pos)
        buffer[:size] = body[pos : pos + size]
        for view in parser.feed(buffer, size):
            assert view.obj is buffer or view.nbytes <= len(delimiter) + 2
            out += view  # written out before the buffer is reused
        pos += size
    return bytes(out)


# --- Field extraction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b"x", b"ROOT\x00\x01\x02", b"\r\n", b"--", b"\r\n\r\n", b"line1\r\nline2\r\n", b"\r\n--"],
)
def test_field_alone(content: bytes) -> None:
    body = form_body([("file", content, "run.root")])
    assert extract(body) == content


def test_field_among_other_fields() -> None:
    content = os.urandom(5000)
    before = [("agent", "EMC", None), ("other", b"another file" * 100, "other.root")]
    after = [("note", "hello\r\n--world", None), ("last", os.urandom(300), "x.bin")]
    assert extract(form_body(before + [("file", content, "a.root")])) == content
    assert extract(form_body([("file", content, "a.root")] + after)) == content
    assert extract(form_body(before + [("file", content, "a.root")] + after)) == content


def test_tricky_content_is_not_cut() -> None:
    content = tricky()
    body = form_body([("a", tricky(), None), ("file", content, "t.root"), ("b", tricky(), "b.root")])
    assert extract(body) == content
    assert extract(body, [body[i : i + 1] for i in range(len(body))]) == content


@pytest.mark.parametrize("size", [0, 1, 100 * 1024, 3 * 1024 * 1024])
def test_binary_content(size: int) -> None:
    content = random.Random(size).randbytes(size)
    body = form_body([("text", "some text", None), ("file", content, "big.root"), ("z", b"zz", "z")])
    assert extract(body) == content
    assert extract(body, random_pieces(body, random.Random(1), 256 * 1024)) == content
    parser = MultipartField(BOUNDARY.encode())
    assert feed_via_buffer(parser, body, random.Random(2), 1024 * 1024) == content
    parser.finish()


def test_content_is_not_copied() -> None:
    content = os.urandom(1024 * 1024)
    body = form_body([("file", content, "a.root")])
    views = MultipartField(BOUNDARY.encode()).feed(body)
    assert len(views) == 1 and views[0].obj is body and views[0] == content
    buffer = bytearray(body)
    views = MultipartField(BOUNDARY.encode()).feed(buffer, len(buffer))
    assert len(views) == 1 and views[0].obj is buffer and views[0] == content


def test_empty_field_is_found() -> None:
    parser = MultipartField(BOUNDARY.encode())
    assert feed_pieces(parser, [form_body([("a", "1", None), ("file", b"", "e.root")])]) == b""
    assert parser.found and parser.complete


def test_first_form_data_part_with_the_name_wins() -> None:
    b = BOUNDARY
    body = (
        f"--{b}\r\nContent-Disposition: attachment; name=\"file\"\r\n\r\nattachment\r\n"
        f"--{b}\r\nContent-Disposition: form-data; name=\"File\"\r\n\r\nother case\r\n"
        f"--{b}\r\nContent-Disposition: form-data; name=\"files\"\r\n\r\nother name\r\n"
        f"--{b}\r\nX-Other: 1\r\n\r\nno disposition\r\n"
        f"--{b}\r\n\r\nno headers at all\r\n"
        f"--{b}\r\ncontent-DISPOSITION:Form-Data;name=file\r\n\r\nthe one\r\n"
        f"--{b}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nsecond\r\n"
        f"--{b}--\r\n"
    ).encode()
    assert extract(body) == b"the one"
    assert extract(body, field="files") == b"other name"


def test_malformed_disposition_of_another_part_is_skipped() -> None:
    b = BOUNDARY
    body = (
        f"--{b}\r\nContent-Disposition: form-data; name=\"a\"; oops\r\n\r\nbad\r\n"
        f"--{b}\r\nContent-Disposition: form-data; name=\"file\";\r\n\r\ngood\r\n"
        f"--{b}--\r\n"
    ).encode()
    assert extract(body) == b"good"  # aiohttp's warning is an error here (filterwarnings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert extract(body) == b"good"


def test_preamble_epilogue_and_transport_padding() -> None:
    b = BOUNDARY
    body = (
        f"preamble --{b} not a delimiter\r\n--{b[:-1]}x neither\r\n"
        f"--{b} \t \r\nContent-Disposition: form-data; name=\"file\"\r\n\r\ncontent\r\n"
        f"--{b}\t\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nx\r\n"
        f"--{b}--  epilogue\r\n--{b}\r\ngarbage without colon\r\n--{b}--"
    ).encode()
    for pieces in ([body], [body[i : i + 1] for i in range(len(body))]):
        parser = MultipartField(b.encode())
        assert feed_pieces(parser, pieces) == b"content"
        assert parser.complete
        parser.finish()
        assert parser.feed(b"\r\n--" + b.encode() + b"\r\nmore epilogue") == []


def test_no_file_field() -> None:
    parser = MultipartField(BOUNDARY.encode())
    assert feed_pieces(parser, [form_body([("agent", "EMC", None), ("data", b"x", "x.root")])]) == b""
    parser.finish()
    assert parser.complete and not parser.found


def test_end_argument_is_checked() -> None:
    with pytest.raises(ValueError):
        MultipartField(b"b").feed(b"abc", 4)
    with pytest.raises(ValueError):
        MultipartField(b"b").feed(b"abc", -1)


# --- Every split -------------------------------------------------------------------------------


def small_body() -> tuple[bytes, bytes]:
    content = b"a\r\n--" + BOUNDARY.encode()[:-1] + b"\r\r\n-" + b"--" + BOUNDARY.encode() + b"\r"
    fields = [("x", "1\r\n", None), ("file", content, "f"), ("y", b"\r\n--", "y")]
    return form_body(fields), content


def test_every_two_piece_split() -> None:
    body, content = small_body()
    for i in range(len(body) + 1):
        assert extract(body, [body[:i], body[i:]]) == content, i


def test_one_byte_at_a_time() -> None:
    body, content = small_body()
    assert extract(body, [body[i : i + 1] for i in range(len(body))]) == content
    body = form_body([("file", b"", "empty")])
    assert extract(body, [body[i : i + 1] for i in range(len(body))]) == b""


def test_every_three_piece_split_around_the_delimiters() -> None:
    b = BOUNDARY.encode()
    content = b"\r\n-\r" + b"\r\n--" + b[:3]
    body = b"--" + b + b'\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + content + b"\r\n--" + b + b"--"
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1):
            assert extract(body, [body[:i], body[i:j], body[j:]]) == content, (i, j)


def test_random_pieces_and_reused_buffer() -> None:
    rng = random.Random(20240601)
    for _ in range(30):
        content = rng.choice([tricky(), rng.randbytes(rng.randint(0, 20000))]) * rng.randint(1, 3)
        fields = [("other", tricky(), "o"), ("file", content, "f.root"), ("t", "text", None)]
        body = form_body(rng.sample(fields, len(fields)))
        assert extract(body, random_pieces(body, rng, 4096)) == content
        parser = MultipartField(BOUNDARY.encode())
        assert feed_via_buffer(parser, body, rng, 5000) == content
        parser.finish()
        assert parser.complete


# --- Agreement with aiohttp's MultipartReader -----------------------------------------------------


async def reference_field(body: bytes, content_type: str, name: str = "file") -> bytes | None:
    """The named field's content as aiohttp's own MultipartReader reads it (None when absent)."""
    stream = aiohttp.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    stream.feed_data(body)
    stream.feed_eof()
    reader = aiohttp.MultipartReader(CIMultiDict({"Content-Type": content_type}), stream)
    async for part in reader:
        assert isinstance(part, aiohttp.BodyPartReader)
        if part.name == name:
            return bytes(await part.read())
        await part.release()
    return None


def random_boundary(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "'()+_,-./:=? "
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 70))).strip() or "b"


def random_content(rng: random.Random, boundary: str) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        content = rng.randbytes(rng.choice([0, 1, rng.randint(0, 100_000)]))
    elif kind == 1:
        content = tricky(boundary) * rng.randint(1, 5)
    elif kind == 2:
        content = bytes(rng.choice(b"\r\n-" + boundary.encode()) for _ in range(rng.randint(0, 2000)))
    else:
        content = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 500))).encode()
    if b"\r\n--" + boundary.encode() in content or content.startswith(b"--" + boundary.encode()):
        return b"no"
    return content


async def test_agrees_with_aiohttp_multipart_reader() -> None:
    rng = random.Random(7)
    for index in range(40):
        boundary = random_boundary(rng)
        writer = aiohttp.MultipartWriter("form-data", boundary=boundary)
        names = [f"field{i}" for i in range(rng.randint(0, 4))] + (["file"] if index % 8 else [])
        rng.shuffle(names)
        for name in names:
            part = writer.append(random_content(rng, boundary))
            part.set_content_disposition("form-data", name=name, filename=f"{name}.root")
        body = await writer.as_bytes()
        content_type = writer.headers["Content-Type"]

        parser = MultipartField(boundary_from_content_type(content_type))
        content = feed_pieces(parser, random_pieces(body, rng, 50_000))
        parser.finish()
        expected = await reference_field(body, content_type)
        assert parser.found == (expected is not None)
        assert content == (expected or b"")


# --- Malformed bodies --------------------------------------------------------------------------


def parse(body: bytes, pieces: int = 1) -> MultipartField:
    """Feed the whole body (in `pieces` roughly equal pieces) and finish."""
    parser = MultipartField(BOUNDARY.encode())
    size = max(1, -(-len(body) // pieces))
    for pos in range(0, len(body), size):
        parser.feed(body[pos : pos + size])
    parser.finish()
    return parser


@pytest.mark.parametrize("pieces", [1, 3, 10**6])
def test_missing_closing_delimiter(pieces: int) -> None:
    body = form_body([("file", b"content", "f")])
    truncated = body[: body.rindex(b"\r\n--")]
    with pytest.raises(MalformedMultipart, match="unterminated"):
        parse(truncated, pieces)
    with pytest.raises(MalformedMultipart, match="unterminated"):
        parse(body[:-6], pieces)  # `--boundary-` ... cut in the closing delimiter


def test_no_delimiter_at_all() -> None:
    parser = MultipartField(BOUNDARY.encode())
    assert parser.feed(b"just some bytes\r\n--" + BOUNDARY.encode()[:-1]) == []
    assert not parser.found and not parser.complete
    with pytest.raises(MalformedMultipart, match="unterminated"):
        parser.finish()
    with pytest.raises(MalformedMultipart, match="unterminated"):
        MultipartField(BOUNDARY.encode()).finish()


@pytest.mark.parametrize("after", [b"x\r\n", b" x\r\n", b"\t-\r\n", b"-x", b"\n", b"\r\r\n", b"  \rx"])
@pytest.mark.parametrize("pieces", [1, 10**6])
def test_garbage_after_delimiter(after: bytes, pieces: int) -> None:
    body = form_body([("file", b"content", "f")])
    body = body.replace(b"\r\n--" + BOUNDARY.encode() + b"--", b"\r\n--" + BOUNDARY.encode() + after)
    with pytest.raises(MalformedMultipart, match="after a multipart boundary"):
        parse(body, pieces)


def test_header_line_without_colon() -> None:
    b = BOUNDARY
    body = f"--{b}\r\nContent-Disposition: form-data; name=\"file\"\r\nno colon here\r\n\r\nx\r\n--{b}--".encode()
    with pytest.raises(MalformedMultipart, match="colon"):
        parse(body)
    with pytest.raises(MalformedMultipart, match="colon"):
        parse(f"--{b}\r\n: empty name\r\n\r\nx\r\n--{b}--".encode())


@pytest.mark.parametrize("pieces", [1, 7, 100 * 1024])
def test_header_block_too_large(pieces: int) -> None:
    b = BOUNDARY
    header = "X-Big: " + "y" * (100 * 1024)
    body = f"--{b}\r\n{header}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--{b}--".encode()
    with pytest.raises(MalformedMultipart, match="too large"):
        parse(body, pieces)
    with pytest.raises(MalformedMultipart, match="too large"):
        parse(f"--{b}{' ' * 20000}\r\n\r\nx\r\n--{b}--".encode(), pieces)  # endless padding


def test_header_block_under_the_limit() -> None:
    b = BOUNDARY
    header = "X-Big: " + "y" * (10 * 1024)
    body = f"--{b}\r\n{header}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--{b}--".encode()
    assert parse(body).found
    parser = MultipartField(b.encode(), max_header_bytes=1024)
    with pytest.raises(MalformedMultipart, match="too large"):
        parser.feed(body)


def test_header_block_never_terminated() -> None:
    b = BOUNDARY
    with pytest.raises(MalformedMultipart, match="unterminated"):
        parse(f"--{b}\r\nContent-Disposition: form-data; name=\"file\"\r\n".encode())
    with pytest.raises(MalformedMultipart, match="unterminated"):
        parse(f"--{b}\r\nContent-Disposition: form-data; name=\"file\"\r\n".encode() * 100, 1000)
    with pytest.raises(MalformedMultipart, match="too large"):
        parse(f"--{b}\r\nContent-Disposition: form-data; name=\"file\"\r\n".encode() * 1000, 1000)


def test_invalid_boundary_is_refused() -> None:
    for boundary in [b"", b"a" * 71, b"a\r\nb"]:
        with pytest.raises(MalformedMultipart):
            MultipartField(boundary)


# --- Content-Type ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ("multipart/form-data; boundary=abc", b"abc"),
        ("multipart/form-data;boundary=abc ", b"abc"),
        ("Multipart/Form-Data; BOUNDARY=abc", b"abc"),
        ('multipart/form-data; boundary="a b;c=d"', b"a b;c=d"),
        ('multipart/form-data; boundary="a\\"b"', b'a"b'),
        ('multipart/form-data; charset=utf-8; boundary="x"; other=1', b"x"),
        ('multipart/form-data; name="boundary=no"; boundary=yes', b"yes"),
        ("multipart/mixed; boundary=" + "7" * 70, b"7" * 70),
        ("multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW", b"----WebKitFormBoundary7MA4YWxkTrZu0gW"),
    ],
)
def test_boundary_from_content_type(content_type: str, boundary: bytes) -> None:
    assert boundary_from_content_type(content_type) == boundary


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        ("multipart/form-data", "no multipart boundary"),
        ("multipart/form-data; charset=utf-8", "no multipart boundary"),
        ("multipart/form-data; boundary=", "empty"),
        ('multipart/form-data; boundary=""', "empty"),
        ("multipart/form-data; boundary=" + "7" * 71, "longer than 70"),
        ('multipart/form-data; boundary="' + "7" * 71 + '"', "longer than 70"),
        ("multipart/form-data; boundary=caf\u00e9", "ASCII"),
        ("multipart/form-data; boundary=a\tb", "ASCII"),
        ("application/octet-stream; boundary=abc", "not multipart"),
        ("", "not multipart"),
    ],
)
def test_bad_content_type(content_type: str, reason: str) -> None:
    with pytest.raises(MalformedMultipart, match=reason):
        boundary_from_content_type(content_type)


def test_malformed_body_leaves_the_buffer_resizable() -> None:
    closing = b"\r\n--" + BOUNDARY.encode() + b"--"
    body = form_body([("file", b"content", "f")]).replace(closing, closing[:-2] + b"!")
    buffer = bytearray(body)
    with pytest.raises(MalformedMultipart) as caught:
        MultipartField(BOUNDARY.encode()).feed(buffer, len(buffer))
    assert caught.traceback  # the traceback is still alive, and the buffer is not held by it
    buffer.extend(b"more")
    del buffer[:]
