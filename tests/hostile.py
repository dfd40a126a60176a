"""Hostile ROOT files: seeded mutations of valid files, aimed at the places a parser trusts.

Bit flips, truncations, swapped and huge lengths in key headers, absurd key counts, and
compression headers that promise enormous payloads.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from pathlib import Path

import uproot

KEY_NBYTES, KEY_OBJLEN = 0, 6  # offsets inside a TKey header: fNbytes (int32), fObjlen (int32)


@dataclass(frozen=True)
class Layout:
    """Where the sensitive fields of a valid file are."""

    content: bytes
    key_offsets: list[int]
    keys_list_offset: int  # the directory's list of keys: TKey header, then the key count
    keys_list_keylen: int
    compressed_blocks: list[int]


def layout_of(path: Path) -> Layout:
    content = path.read_bytes()
    with uproot.open(path) as root_file:
        keys = [root_file.key(name) for name in root_file.keys(recursive=False, cycle=True)]
        key_offsets = [key.fSeekKey for key in keys]
        keys_list_offset = root_file.fSeekKeys
    keylen = struct.unpack(">h", content[keys_list_offset + 14:keys_list_offset + 16])[0]
    blocks = [index for index in range(len(content) - 9)
              if content[index:index + 2] in (b"ZL", b"XZ", b"L4", b"ZS")]
    return Layout(content, key_offsets, keys_list_offset, keylen, blocks)


def _put_int(data: bytearray, offset: int, value: int) -> None:
    if 0 <= offset <= len(data) - 4:
        data[offset:offset + 4] = struct.pack(">i", value)


def mutate(layout: Layout, rng: random.Random) -> tuple[str, bytes]:
    """One hostile variant of the file: (kind of mutation, bytes)."""
    data = bytearray(layout.content)
    kind = rng.choice(["bit_flips", "truncation", "swapped_lengths", "huge_objlen",
                       "huge_nbytes", "absurd_key_count", "compression_bomb_header",
                       "garbage_block", "zero_run"])
    if kind == "bit_flips":
        for _ in range(rng.randint(1, 64)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncation":
        del data[rng.randrange(4, len(data)):]
    elif kind == "swapped_lengths":
        offset = rng.choice(layout.key_offsets)
        nbytes = data[offset + KEY_NBYTES:offset + KEY_NBYTES + 4]
        data[offset + KEY_NBYTES:offset + KEY_NBYTES + 4] = data[offset + KEY_OBJLEN:
                                                                 offset + KEY_OBJLEN + 4]
        data[offset + KEY_OBJLEN:offset + KEY_OBJLEN + 4] = nbytes
    elif kind == "huge_objlen":
        _put_int(data, rng.choice(layout.key_offsets) + KEY_OBJLEN,
                 rng.choice([0x7FFFFFFF, 0x40000000, -1]))
    elif kind == "huge_nbytes":
        _put_int(data, rng.choice(layout.key_offsets) + KEY_NBYTES,
                 rng.choice([0x7FFFFFFF, 0x10000000, -5]))
    elif kind == "absurd_key_count":
        _put_int(data, layout.keys_list_offset + layout.keys_list_keylen,
                 rng.choice([0x7FFFFFFF, 10_000_000, -1]))
    elif kind == "compression_bomb_header" and layout.compressed_blocks:
        block = rng.choice(layout.compressed_blocks)
        data[block + 6:block + 9] = b"\xff\xff\xff"  # promises 16 MiB per block
    elif kind == "garbage_block" and layout.compressed_blocks:
        block = rng.choice(layout.compressed_blocks)
        for offset in range(block + 9, min(block + 200, len(data))):
            data[offset] = rng.randrange(256)
    else:  # zero_run (and the compression kinds on an uncompressed file)
        start = rng.randrange(len(data))
        data[start:start + rng.randint(8, 512)] = bytes(min(len(data) - start, 512))
    return kind, bytes(data)
