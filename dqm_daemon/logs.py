"""structlog set-up: JSON lines when stdout is not a terminal (journald), console output on one."""

from __future__ import annotations

import logging
import sys

import structlog
import structlog.tracebacks

# Never with local variables: they could hold a token or file contents.
_exception_as_dict = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def configure_logging(level: int = logging.INFO) -> None:
    renderers: list[structlog.typing.Processor] = (
        [structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)]
        if sys.stdout.isatty()
        else [_exception_as_dict, structlog.processors.JSONRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # aiohttp's own access log would duplicate our request lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
