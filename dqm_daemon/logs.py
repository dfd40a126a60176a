"""structlog set-up: JSON lines when stdout is not a terminal (journald), console output on one.

Records of the standard library's `logging` (aiohttp, asyncio) go through the same renderer, so
every line on stdout has the same shape; a malformed request aiohttp refuses is logged as what
went wrong, never with the bytes that were sent (a token may be among them).
"""

from __future__ import annotations

import logging
import sys

import structlog
import structlog.tracebacks
from aiohttp.http_exceptions import HttpProcessingError

# Never with local variables: they could hold a token or file contents.
_exception_as_dict = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


class _RefusedRequestsWithoutTheirBytes(logging.Filter):
    """aiohttp logs a request its parser refuses (a control character in a header, a line too
    long) as an error with a traceback quoting the offending bytes. It is the client's fault,
    not the daemon's: a warning naming the error, the status and the client, nothing sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        refused = record.exc_info[1] if record.exc_info else None
        if isinstance(refused, HttpProcessingError):
            record.refused_request = {
                "error": type(refused).__name__,
                "status": refused.code,
                "remote": str(record.args[0]) if isinstance(record.args, tuple) and record.args
                else None,
            }
            record.msg, record.args = "http_request_refused", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure_logging(level: int = logging.INFO) -> None:
    renderers: list[structlog.typing.Processor] = (
        [structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)]
        if sys.stdout.isatty()
        else [_exception_as_dict, structlog.processors.JSONRenderer()]
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            *renderers,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # On the logger, not the handler: the record is rewritten before any handler sees it.
    refusals = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _RefusedRequestsWithoutTheirBytes) for f in refusals.filters):
        refusals.addFilter(_RefusedRequestsWithoutTheirBytes())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(allow=["refused_request"]),
            structlog.processors.add_log_level,
            stamp,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # libraries' warnings and errors; their chatter stays out
    # aiohttp's own access log would duplicate our request lines.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
