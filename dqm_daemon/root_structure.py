"""The structure of a ROOT file, read straight from its bytes: the file header, every directory's
list of keys, and a check that every object's payload lies in the file and is framed as declared.

This is the check an upload waits for, so it does no interpretation of the objects (that is the
analysis, done later with uproot): a file of 200 histograms takes a few milliseconds here,
against a quarter of a second for reading every histogram. Every offset and count comes from an
untrusted file, so each is checked against the file's size before it is used.

Layout (big-endian throughout), from ROOT's TFile, TDirectory and TKey streamers:
  file header:  "root", fVersion, fBEGIN, then fEND ... (64-bit seeks when fVersion > 1000000)
  TKey header:  fNbytes i32, fVersion i16, fObjLen i32, fDatime u32, fKeyLen i16, fCycle i16,
                fSeekKey, fSeekPdir (i32, or i64 when fVersion > 1000), class, name, title
  TDirectory:   fVersion i16, fDatimeC, fDatimeM, fNbytesKeys i32, fNbytesName i32,
                fSeekDir, fSeekParent, fSeekKeys (i32, or i64 when fVersion > 1000)
  key list:     a TKey header, then nkeys i32 and nkeys TKey headers
  payload:      fObjLen bytes, stored as is when fNbytes - fKeyLen == fObjLen, otherwise in blocks
                of a 9-byte header ("ZL"/"XZ"/"L4"/"ZS", method, compressed and uncompressed sizes
                as 24-bit little-endian integers) and the compressed bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import xxhash  # as uproot checks LZ4 blocks

DIRECTORY_CLASSES = frozenset({"TDirectory", "TDirectoryFile"})
# Deeper nesting than this is taken for a loop in a hostile file.
MAX_DIRECTORY_DEPTH = 64
BLOCK_HEADER_BYTES = 9
LZ4_CHECKSUM_BYTES = 8
# zlib, lzma, lz4, zstd, and ROOT's own old algorithm.
COMPRESSION_ALGORITHMS = frozenset({b"ZL", b"XZ", b"L4", b"ZS", b"CS"})


class StructureError(Exception):
    """The file is not sound ROOT; the message is the short reason kept in the catalog."""


@dataclass
class Entry:
    path: str
    class_name: str
    title: str
    top_level: bool  # in the file's top directory (a name may hold '/': the path cannot tell)


@dataclass
class Structure:
    entries: list[Entry] = field(default_factory=list)
    truncated: bool = False  # more objects than the listing limits
    listed_chars: int = 0  # of the entries' paths, classes and titles (titles cut as listed)


@dataclass
class _Key:
    nbytes: int
    obj_len: int
    key_len: int
    cycle: int
    seek_key: int
    class_name: str
    name: str
    title: str


class _Record:
    """Bounds-checked big-endian reads from one region of the file."""

    def __init__(self, data: memoryview, file_offset: int) -> None:
        self.data = data
        self.file_offset = file_offset  # where `data` starts in the file, for messages

    def unpack(self, layout: struct.Struct, offset: int) -> tuple:
        if offset < 0 or offset + layout.size > len(self.data):
            raise StructureError(
                f"a record at byte {self.file_offset + offset} runs past its end")
        return layout.unpack_from(self.data, offset)

    def string(self, offset: int) -> tuple[str, int]:
        """A ROOT TString at `offset`; returns it and the offset after it."""
        data = self.data
        if offset >= len(data):
            raise StructureError(
                f"a record at byte {self.file_offset + offset} runs past its end")
        length = data[offset]
        offset += 1
        if length == 255:
            (length,) = self.unpack(_I32, offset)
            offset += 4
        end = offset + length
        if length < 0 or end > len(data):
            raise StructureError(f"a name at byte {self.file_offset + offset} runs past its end")
        return str(data[offset:end], "utf-8", "replace"), end


class _File:
    """Positioned reads of an open file, never past its end: only the records the walk needs
    are read, so a file of any size is checked in bounded memory (a file of up to
    WHOLE_FILE_BYTES is read at once, and its records are views of that copy: one read instead
    of one per key). A sound file's records do not overlap, so reading much more than the file
    holds means a hostile file points many records at the same bytes: that stops the check."""

    def __init__(self, descriptor: int, size: int) -> None:
        self.descriptor, self.size = descriptor, size
        self._read_budget = 2 * size + READ_BUDGET_SLACK_BYTES
        self._whole: memoryview | None = None
        if size <= WHOLE_FILE_BYTES:
            data = os.pread(descriptor, size, 0)
            if len(data) != size:
                raise StructureError("the file could not be read whole")
            self._whole = memoryview(data)

    def record(self, offset: int, length: int) -> _Record:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StructureError(f"a record at byte {offset} lies past the end of the file")
        self._read_budget -= length
        if self._read_budget < 0:
            raise StructureError("records overlap: more bytes read than the file holds")
        if self._whole is not None:
            return _Record(self._whole[offset:offset + length], offset)
        data = os.pread(self.descriptor, length, offset)
        if len(data) != length:
            raise StructureError(f"a record at byte {offset} could not be read whole")
        return _Record(memoryview(data), offset)

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of a record, as `record` checks and counts them."""
        return bytes(self.record(offset, length).data)

    def head(self, offset: int, length: int) -> _Record:
        """Up to `length` bytes at `offset`, fewer near the end of the file."""
        return self.record(offset, max(0, min(length, self.size - offset)))


_U8, _I32 = struct.Struct(">B"), struct.Struct(">i")
# magic, fVersion, fBEGIN, fEND, fSeekFree, fNbytesFree, nfree, fNbytesName
_FILE_SMALL = struct.Struct(">4siiiiiii")
_FILE_LARGE = struct.Struct(">4siiqqiii")
_KEY_START = struct.Struct(">ihiIhh")  # fNbytes, fVersion, fObjLen, fDatime, fKeyLen, fCycle
# The same with fSeekKey and fSeekPdir, 32-bit (fVersion <= 1000) and 64-bit.
_KEY_SMALL, _KEY_LARGE = struct.Struct(">ihiIhhii"), struct.Struct(">ihiIhhqq")
_DIR_START = struct.Struct(">hIIii")  # fVersion, fDatimeC, fDatimeM, fNbytesKeys, fNbytesName
_DIR_SEEKS_SMALL, _DIR_SEEKS_LARGE = struct.Struct(">iii"), struct.Struct(">qqq")
# Enough for any key header's fixed part and a directory record.
RECORD_HEAD_BYTES = 64
# Reads allowed beyond twice the file's size (small files' headers overlap a little).
READ_BUDGET_SLACK_BYTES = 1024 * 1024
# A title counts this much at most against the listing's size (the listing cuts it so).
LISTED_TITLE_CHARS = 300
# Files up to this size are read whole before the walk (most DQM files are far smaller).
WHOLE_FILE_BYTES = 4 * 1024 * 1024


def read_structure(path: Path, max_entries: int, max_listed_chars: int) -> Structure:
    """Every key of the file in the order uproot lists them (highest cycle of each name,
    directories depth first; the first `max_entries`, as long as their paths, classes and
    titles hold no more than `max_listed_chars`: deep directories of long names make a small
    file list gigabytes), each payload's framing checked (all of them). Raises
    StructureError."""
    with open(path, "rb") as stored:
        root_file = _File(stored.fileno(), os.fstat(stored.fileno()).st_size)
        header = root_file.head(0, _FILE_LARGE.size)
        if bytes(header.data[:4]) != b"root":
            raise StructureError("not a ROOT file: it does not start with 'root'")
        (version,) = header.unpack(_I32, 4)
        fields = header.unpack(_FILE_LARGE if version > 1_000_000 else _FILE_SMALL, 0)
        begin, declared_end, nbytes_name = fields[2], fields[3], fields[7]
        if declared_end > root_file.size:
            raise StructureError(
                f"truncated: {root_file.size} bytes of the {declared_end} declared")
        structure = Structure()
        # The top directory's record follows the file's own key and name at fBEGIN.
        limits = (max_entries, max_listed_chars)
        _walk_directory(root_file, begin + nbytes_name, "", structure, limits, depth=0,
                        visited=set())
    return structure


def _read_key(record: _Record, offset: int) -> _Key:
    data = record.data
    if offset < 0 or offset + _KEY_SMALL.size > len(data):
        raise StructureError(f"a record at byte {record.file_offset + offset} runs past its end")
    fields = _KEY_SMALL.unpack_from(data, offset)
    layout = _KEY_SMALL
    if fields[1] > 1000:  # fVersion: 64-bit seeks
        layout = _KEY_LARGE
        fields = record.unpack(_KEY_LARGE, offset)
    nbytes, _, obj_len, _, key_len, cycle, seek_key, _ = fields
    class_name, position = record.string(offset + layout.size)
    name, position = record.string(position)
    title, position = record.string(position)
    if nbytes < key_len or key_len < _KEY_START.size or obj_len < 0:
        raise StructureError(f"key {name!r} declares impossible sizes")
    if position - offset != key_len:  # ROOT and uproot step over the strings, not fKeylen
        raise StructureError(f"key {name!r}: its header holds {position - offset} bytes, "
                             f"not the {key_len} it declares")
    return _Key(nbytes, obj_len, key_len, cycle, seek_key, class_name, name, title)


def _walk_directory(root_file: _File, record_offset: int, prefix: str, structure: Structure,
                    limits: tuple[int, int], depth: int, visited: set[int]) -> None:
    where = prefix or "/"
    if depth > MAX_DIRECTORY_DEPTH:
        raise StructureError(f"{where}: directories nested deeper than {MAX_DIRECTORY_DEPTH}")
    directory = root_file.head(record_offset, RECORD_HEAD_BYTES)
    version, _, _, nbytes_keys, _ = directory.unpack(_DIR_START, 0)
    seeks = _DIR_SEEKS_LARGE if version > 1000 else _DIR_SEEKS_SMALL
    _, _, seek_keys = directory.unpack(seeks, _DIR_START.size)
    if seek_keys == 0:
        return  # a directory that was never written to
    if seek_keys in visited:
        raise StructureError(f"{where}: a directory contains itself")
    visited.add(seek_keys)
    # The key list is one record: a key header, the number of keys, then their headers.
    (list_bytes,) = root_file.head(seek_keys, 4).unpack(_I32, 0)
    if list_bytes != nbytes_keys:  # ROOT and uproot read fNbytesKeys bytes of it
        raise StructureError(f"{where}: the key list holds {list_bytes} bytes, its directory "
                             f"says {nbytes_keys}")
    key_list = root_file.record(seek_keys, list_bytes)
    list_key = _read_key(key_list, 0)
    (count,) = key_list.unpack(_I32, list_key.key_len)
    # Each key header takes at least 26 bytes: a larger count is a lie.
    if count < 0 or count > len(key_list.data) // 26:
        raise StructureError(f"{where}: the key list declares {count} keys")
    newest: dict[str, _Key] = {}
    position = list_key.key_len + 4
    for _ in range(count):
        key = _read_key(key_list, position)
        position += key.key_len
        # The newest cycle as uproot (and so the analysis and previews) picks it.
        if key.name not in newest or abs(key.cycle) > abs(newest[key.name].cycle):
            newest[key.name] = key
    for name, key in newest.items():
        path = f"{prefix}{name}"
        # Past the listing's limits every key is still checked, only no longer listed.
        if not structure.truncated:
            listed_chars = (structure.listed_chars + len(path) + len(key.class_name)
                            + min(len(key.title), LISTED_TITLE_CHARS))
            if len(structure.entries) < limits[0] and listed_chars <= limits[1]:
                structure.entries.append(Entry(path, key.class_name, key.title, depth == 0))
                structure.listed_chars = listed_chars
            else:
                structure.truncated = True
        payload_offset = key.seek_key + key.key_len
        if key.class_name in DIRECTORY_CLASSES:
            _walk_directory(root_file, payload_offset, f"{path}/", structure, limits,
                            depth + 1, visited)
        else:
            _check_payload(root_file, key, payload_offset, path)


def _check_payload(root_file: _File, key: _Key, file_offset: int, path: str) -> None:
    """The payload lies inside the file, and its compressed blocks are framed as declared:
    known algorithms, sizes that add up to the stored and the uncompressed lengths exactly, and
    LZ4's checksums. Inflating every block is left to the analysis: on a file of large
    histograms it would cost ten times the rest of the check."""
    stored = key.nbytes - key.key_len
    if file_offset < 0 or file_offset + stored > root_file.size:
        raise StructureError(f"{path}: its payload lies past the end of the file")
    if stored == key.obj_len:
        return  # stored uncompressed
    offset, produced = 0, 0
    while offset < stored:  # each block: its 9-byte header only (all of it for LZ4)
        if offset + BLOCK_HEADER_BYTES > stored:
            raise StructureError(f"{path}: a compressed block header is cut short")
        header = root_file.read(file_offset + offset, BLOCK_HEADER_BYTES)
        algorithm = header[:2]
        compressed = int.from_bytes(header[3:6], "little")
        uncompressed = int.from_bytes(header[6:9], "little")
        produced += uncompressed
        start, offset = offset + BLOCK_HEADER_BYTES, offset + BLOCK_HEADER_BYTES + compressed
        if algorithm not in COMPRESSION_ALGORITHMS:
            raise StructureError(f"{path}: unknown compression {algorithm!r}")
        if compressed == 0 or uncompressed == 0 or offset > stored or produced > key.obj_len:
            raise StructureError(f"{path}: compressed block sizes do not add up")
        if algorithm == b"L4":  # an xxhash64 of the compressed bytes, then the LZ4 block
            block = root_file.record(file_offset + start, compressed).data
            if xxhash.xxh64(block[LZ4_CHECKSUM_BYTES:]).digest() != bytes(
                    block[:LZ4_CHECKSUM_BYTES]):
                raise StructureError(f"{path}: an LZ4 block fails its checksum")
    if produced != key.obj_len:
        raise StructureError(f"{path}: compressed blocks hold {produced} bytes of the "
                             f"{key.obj_len} declared")
