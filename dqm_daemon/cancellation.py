"""Work a cancelled request (a shutdown past its grace period) must not cut half-way."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _nothing() -> None:
    pass


async def run_to_the_end(work: Awaitable[T], abort: Callable[[], None] = _nothing) -> T:
    """Await `work`; when cancelled, call `abort` (to stop it sooner where it can be) and wait
    until it has really ended before passing the cancellation on: a file being written is not
    removed under its writer, and a commit is not left half done."""
    running = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        abort()
        with contextlib.suppress(Exception):  # its outcome no longer matters
            await asyncio.shield(running)
        raise
