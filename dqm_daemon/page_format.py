"""How the pages show values: sizes, times in Europe/Zurich, "3 min ago", durations, previews.
Registered as Jinja2 filters; the JSON twins keep the raw values."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from markupsafe import Markup, escape

from .naming import NAME_TIMEZONE
from .svg import draw

STATE_MARKS = {"ok": ("✔", "tag-ok"), "pending": ("…", ""), "invalid": ("✖", "tag-bad")}


def unknown(value: Any) -> Any:
    """A count the catalog could not give, as a dash."""
    return "—" if value is None else value


def human_bytes(size: float | None) -> str:
    if size is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


ZURICH = ZoneInfo(NAME_TIMEZONE)


def _moment(value: str | float) -> datetime:
    # The standard library, not pendulum: pages format thousands of times per render.
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, UTC)
    return datetime.fromisoformat(value)


def zurich_time(value: str | float | None) -> str:
    """An ISO time or unix seconds as local time at CERN."""
    if value is None:
        return "—"
    return _moment(value).astimezone(ZURICH).strftime("%Y-%m-%d %H:%M:%S")


def ago(value: str | float | None) -> str:
    """"12 s ago", "3 min ago", "2 h 5 min ago", "4 days ago"."""
    if value is None:
        return "—"
    seconds = (datetime.now(UTC) - _moment(value)).total_seconds()
    if seconds >= 2 * 86400:
        return f"{seconds // 86400:.0f} days ago"
    return f"{duration(seconds)} ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60)} min"


def number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.4g}"


def state_tag(state: str) -> Markup:
    mark, css_class = STATE_MARKS.get(state, ("?", ""))
    return Markup(f'<span class="tag {css_class}">{mark} {escape(state)}</span>')


def preview_svg(preview: dict[str, Any]) -> Markup:
    """The preview drawn; a short note instead if its numbers cannot be drawn (one hostile
    histogram must not take its file's page down)."""
    try:
        return draw(preview)
    except (ArithmeticError, ValueError, TypeError, KeyError, IndexError):
        return Markup('<p class="quiet">this histogram cannot be drawn</p>')


FILTERS = {
    "bytes": human_bytes,
    "zurich": zurich_time,
    "ago": ago,
    "duration": duration,
    "number": number,
    "state_tag": state_tag,
    "svg": preview_svg,
    "unknown": unknown,
}
