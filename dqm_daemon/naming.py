"""The DQM headers an agent sends, and the file name they give (as the Overwatch receiver named files)."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import re
import zoneinfo
from collections.abc import Mapping

import pendulum
from aiohttp import web

NAME_TIMEZONE = "Europe/Zurich"
_NAME_ZONEINFO = zoneinfo.ZoneInfo(NAME_TIMEZONE)  # loaded once: each load reads the tz database
DEFAULT_AGENT = "DQM"
# Letters, digits, '_', '-' and '.', starting with a letter, digit or '_': never a path
# separator, never '..', never a space or control character, never a file name that reads as
# an option ('-…') or a hidden file ('.…') to the tools that handle the files later.
_AGENT_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# {agent}histos_{run}_DQM_{YYYY_MM_DD_HH_mm_ss}[.vN].root
_FILENAME_PATTERN = re.compile(
    r"(?P<agent>.+?)histos_(?P<run>\d+)_DQM_"
    r"(?P<time>\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2})(?:\.v\d+)?\.root"
)


@dataclasses.dataclass(frozen=True)
class DQMHeaders:
    run_number: int
    timestamp: int
    agent: str
    data_status: int

    @functools.cached_property
    def filename(self) -> str:
        return dqm_filename(self.agent, self.run_number, self.timestamp)


def dqm_filename(agent: str, run_number: int, timestamp: int) -> str:
    # The standard library, not pendulum, on this path (once per upload): 4 µs instead of 28.
    local_time = datetime.datetime.fromtimestamp(timestamp, _NAME_ZONEINFO)
    return f"{agent}histos_{run_number}_DQM_{local_time:%Y_%m_%d_%H_%M_%S}.root"


def variant_filename(filename: str, variant: int) -> str:
    """The name a different file with the same DQM name is kept under: `X.root` → `X.v2.root`."""
    if variant == 1:
        return filename
    stem = filename.removesuffix(".root")
    return f"{stem}.v{variant}.root"


# Upper bounds (inclusive): what SQLite stores and a file name can show (up to the year 9999).
MAX_RUN_NUMBER = 2**63 - 1
# 9999-12-31 23:59:59 in Zurich (UTC+1 then): one second later the name's year has 5 digits.
MAX_TIMESTAMP = 253402297199
# dataStatus is 0, 1 or 2 from AMORE agents; any 32-bit integer is taken, as the Overwatch
# receiver took any integer (its own default was -1).
MIN_DATA_STATUS, MAX_DATA_STATUS = -(2**31), 2**31 - 1


_ASCII_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
# More significant digits than any bound here has: out of range without converting (int()
# refuses over 4,300 digits, and converting many thousands costs quadratic time).
MAX_SIGNIFICANT_DIGITS = 40


def bounded_integer(raw: str, what: str, maximum: int, minimum: int = 0) -> int:
    """An integer from a header or query parameter; 400 naming it (`what`) and the value.
    ASCII digits only: int() also takes '9_9' and other scripts' digits, which would quietly
    make another run number."""
    text = raw.strip()
    if not _ASCII_INTEGER.fullmatch(text):
        raise web.HTTPBadRequest(text=f"{what} must be an integer, got {_quoted(raw)}")
    negative, significant = text.startswith("-"), text.lstrip("+-").lstrip("0") or "0"
    if len(significant) > MAX_SIGNIFICANT_DIGITS:
        value = minimum - 1 if negative else maximum + 1
    else:
        value = -int(significant, 10) if negative else int(significant, 10)
    if value < minimum:
        qualifier = "negative" if minimum == 0 else f"below {minimum}"
        raise web.HTTPBadRequest(text=f"{what} must not be {qualifier}, got {_quoted(raw)}")
    if value > maximum:
        raise web.HTTPBadRequest(text=f"{what} must be at most {maximum}, got {_quoted(raw)}")
    return value


def _quoted(raw: str, limit: int = 60) -> str:
    """A client's value quoted in an answer; a long one is not quoted at all (an answer need
    not echo kilobytes, and a part of it could be part of a token, past redaction)."""
    return repr(raw) if len(raw) <= limit else f"a value of {len(raw)} characters"


def _integer_header(headers: Mapping[str, str], name: str, default: int | None,
                    maximum: int, minimum: int = 0) -> int:
    raw = headers.get(name)
    if raw is None:
        if default is None:
            raise web.HTTPBadRequest(text=f"Missing required header {name}")
        return default
    return bounded_integer(raw, f"Header {name}", maximum, minimum)


def parse_dqm_headers(headers: Mapping[str, str]) -> DQMHeaders:
    """Validate the upload headers; a bad one raises 400 naming the header and the value."""
    run_number = _integer_header(headers, "runNumber", None, MAX_RUN_NUMBER)
    timestamp = _integer_header(headers, "timeStamp", None, MAX_TIMESTAMP)
    data_status = _integer_header(headers, "dataStatus", 0, MAX_DATA_STATUS, MIN_DATA_STATUS)
    agent = headers.get("amoreAgent", DEFAULT_AGENT)
    if not _AGENT_PATTERN.fullmatch(agent) or ".." in agent:
        raise web.HTTPBadRequest(
            text=f"Header amoreAgent {agent!r} is not a valid agent name "
            "(1-64 letters, digits, '_', '-' or '.', not starting with '-' or '.'; no '..')"
        )
    return DQMHeaders(run_number, timestamp, agent, data_status)


def headers_from_filename(filename: str) -> DQMHeaders | None:
    """Recover agent, run and time from a stored name (for files adopted at start-up)."""
    match = _FILENAME_PATTERN.fullmatch(filename)
    if match is None:
        return None
    local_time = pendulum.from_format(match["time"], "YYYY_MM_DD_HH_mm_ss", tz=NAME_TIMEZONE)
    return DQMHeaders(
        run_number=int(match["run"]),
        timestamp=int(local_time.timestamp()),
        agent=match["agent"],
        data_status=0,
    )
