"""Request middlewares: log context, errors as JSON, token check. Outermost first.

Also the answer to requests no middleware sees: those aiohttp's parser refuses."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from http import HTTPStatus

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler

from .appkeys import SETTINGS
from .storage import HashingStopped

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TOKEN_HEADER = "token"
UPLOADER = web.RequestKey("uploader", str)
# Paths under this prefix need a token; /healthz and the pages do not.
PROTECTED_PREFIX = "/rest/api/"
# Open to monitoring (systemd, load balancers, Prometheus) even when the pages need a password.
OPERATIONS_PATHS = ("/healthz", "/metrics")
# Tokens this long or longer are taken out of any text quoting what a client sent.
REDACTED_TOKEN_CHARS, REDACTED = 8, "[redacted]"
# A client that went away mid-request: nothing to answer, nothing to log as an error.
CLIENT_GONE = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def is_token_probe(request: web.BaseRequest) -> bool:
    """A request to `/` carrying a token, or any POST there: the Overwatch receiver answered
    those past its token check ("Not implemented"), a way to test a token that scripts use."""
    return request.path == "/" and (request.method == "POST" or TOKEN_HEADER in request.headers)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


# A file's answer not sent yet when its handler returned: when it began, and its log context.
_UNSENT_FILE_ANSWER = web.RequestKey("unsent_file_answer", tuple)


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id to every log line of the request and log one line when it ends."""
    structlog.contextvars.clear_contextvars()
    request_id = new_request_id()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status, cut, logged_later = 500, {}, False
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = request_id
        if isinstance(response, LoggedFileResponse) and not response.prepared:
            # Its status (206, 304, …) is decided as it is sent: logged then, with this
            # request's context (see LoggedFileResponse).
            request[_UNSENT_FILE_ANSWER] = (started, structlog.contextvars.get_contextvars())
            logged_later = True
        return response
    except asyncio.CancelledError:
        # Cut by the shutdown once its grace ran out: the client's connection is closed with
        # no answer; not a failure of the daemon's (no 5xx alert on every restart).
        status, cut = 503, CUT_BY_SHUTDOWN
        raise
    finally:
        if not logged_later:
            _log_request(request, status, started, **cut)
        structlog.contextvars.clear_contextvars()


CUT_BY_SHUTDOWN = {"cut_by_shutdown": True}


class LoggedFileResponse(web.FileResponse):
    """aiohttp's FileResponse, whose request log line `request_context` leaves until the
    status is known: written as the answer is prepared (`log_file_answer`), or, if preparing
    fails before that (a shutdown cutting it, a fault), with the failure's status."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(request)
        except asyncio.CancelledError:
            _log_unsent_file_answer(request, 503, **CUT_BY_SHUTDOWN)
            raise
        except BaseException:
            _log_unsent_file_answer(request, 500)
            raise


async def log_file_answer(request: web.Request, response: web.StreamResponse) -> None:
    """On response prepare: the request log line of a file's answer, with its real status."""
    _log_unsent_file_answer(request, response.status)


def _log_unsent_file_answer(request: web.BaseRequest, status: int, **extra: object) -> None:
    unsent = request.get(_UNSENT_FILE_ANSWER)
    if unsent is None:  # not a file's answer, or logged already
        return
    del request[_UNSENT_FILE_ANSWER]
    started, context = unsent
    with structlog.contextvars.bound_contextvars(**context):
        _log_request(request, status, started, **extra)


def _log_request(request: web.BaseRequest, status: int, started: float, **extra: object) -> None:
    log.info(
        "request",
        method=request.method,
        path=redact_tokens(request.path, request.app[SETTINGS].tokens),
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
        **extra,
    )


def redact_tokens(text: str, tokens: Iterable[str]) -> str:
    """`text` without any configured token of REDACTED_TOKEN_CHARS or more: a client that sent
    its token elsewhere than the `token` header (another header, the path, a query) never finds
    it quoted in an answer or a log line. (A shorter one would mangle run numbers.)"""
    for token in tokens:
        if len(token) < REDACTED_TOKEN_CHARS:
            continue
        # As a message quotes it (repr: a backslash or a quote escaped), then as sent: the
        # longer first, so no escape character is left before the mark.
        for form in sorted({token, repr(token)[1:-1]}, key=len, reverse=True):
            if form in text:
                text = text.replace(form, REDACTED)
    return text


def error_response(exc: web.HTTPException, extra: Mapping[str, object] | None = None,
                   tokens: Iterable[str] = ()) -> web.Response:
    """The one JSON shape of every error: {"status": code, "message": text}, and `extra`
    fields where an answer needs them; `tokens` are redacted from the message."""
    headers = {
        key: value
        for key, value in exc.headers.items()
        if key.lower() not in ("content-type", "content-length")
    }
    message = redact_tokens(exc.text or exc.reason, tokens)
    return web.json_response(
        {"status": exc.status, "message": message, **(extra or {})},
        status=exc.status,
        headers=headers,
    )


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into JSON with a `message`; no traceback ever reaches a client."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are answers, not errors
        return error_response(exc, tokens=request.app[SETTINGS].tokens)
    except HashingStopped:  # shutting down in the middle of the upload's commit
        return error_response(web.HTTPServiceUnavailable(
            text="The receiver is shutting down; retry later",
            headers={"Retry-After": str(request.app[SETTINGS].retry_after_seconds)}))
    except CLIENT_GONE:
        log.info("client_disconnected")
        return error_response(web.HTTPBadRequest(text="Connection lost during the request"))
    except (HttpProcessingError, web.RequestPayloadError) as exc:
        # A body aiohttp could not parse or decode (bad chunking, not the Content-Encoding
        # it claims)
        log.info("malformed_request", error=type(exc).__name__)
        response = error_response(
            web.HTTPBadRequest(text=f"Malformed request body: {type(exc).__name__}"))
        # The body cannot be read on: the connection ends with the answer, and the rest of
        # the body is not read either (aiohttp would, and log its failure as an error).
        response.force_close()
        request.content.feed_eof()
        return response
    except Exception:
        log.exception("unhandled_error")
        return error_response(web.HTTPInternalServerError(text="Internal server error"))


async def continue_or_ignore(request: web.Request) -> None:
    """The `Expect` handler of every route: `100-continue` is answered as aiohttp does, any
    other expectation is ignored (RFC 9110 allows it), so the request gets its usual answer,
    in JSON. aiohttp's own answers those 417 in plain text before any middleware, quoting the
    header's value."""
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not part of the response body


class _JsonRefusals(RequestHandler):
    """aiohttp's connection handler, answering a request its parser refuses (before any
    middleware runs) in the one JSON shape, without quoting what was sent: aiohttp's own answer
    is plain text that echoes the offending bytes, a token among them.

    Also: a client that stops taking its answer (a download, a listing of megabytes) would
    hold its connection, the open file and the answer's memory for ever. The kernel aborts a
    connection whose sent bytes stay unacknowledged for the keep-alive timeout
    (TCP_USER_TIMEOUT, Linux), and that abort is logged as a client gone, not an error."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connection = transport.get_extra_info("socket")
        if connection is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            with contextlib.suppress(OSError):
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                      max(1000, int(self.keepalive_timeout * 1000)))
        super().connection_made(transport)

    def log_exception(self, *args: object, **kwargs: object) -> None:
        error = kwargs.get("exc_info")
        if isinstance(error, (TimeoutError, *CLIENT_GONE)):
            log.info("client_gone", error=type(error).__name__)
            return
        super().log_exception(*args, **kwargs)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; refuses once answering
        if isinstance(exc, LineTooLong):
            text = "A request line or header is too long"
        elif isinstance(exc, BadHttpMethod | BadStatusLine):
            text = "Not an HTTP request"
        elif isinstance(exc, HttpProcessingError):
            text = "Malformed HTTP request"
        else:  # a failure past every middleware: the status says it all, no traceback
            text = _status_phrase(status)
        response = web.json_response({"status": status, "message": text}, status=status)
        response.force_close()
        return response


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # not a status the standard library knows
        return "Request failed"


class _JsonRefusingServer(web.Server):
    """aiohttp's server, its connections handled by `_JsonRefusals`."""

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = _JsonRefusals
        return handler


def refuse_malformed_requests_in_json(runner: web.AppRunner) -> None:
    """Make the runner's connections answer requests aiohttp's parser refuses in JSON. aiohttp
    has no hook for those (aio-libs/aiohttp#3287): its server and connection handler are
    swapped for subclasses that differ only there. Call after `runner.setup()`, before the
    site starts."""
    assert runner.server is not None, "the runner is not set up"
    runner.server.__class__ = _JsonRefusingServer


def uploader_for_token(headers: Mapping[str, str], tokens: Mapping[str, str]) -> str:
    """The uploader name of the request's token; 401 when missing or unknown.

    Every configured token is compared in constant time, so timing tells nothing about them."""
    given = headers.get(TOKEN_HEADER)
    if given is None:
        raise web.HTTPUnauthorized(text="Must pass a token!")
    given_bytes = given.encode("utf-8", "surrogateescape")
    uploader = None
    for token, name in tokens.items():
        if hmac.compare_digest(given_bytes, token.encode("utf-8")):
            uploader = name
    if uploader is None:
        raise web.HTTPUnauthorized(text="Received token, but it is invalid!")
    return uploader


def basic_auth_for_pages(credentials: str) -> Callable[[web.Request, Handler], Awaitable]:
    """With `credentials` ("user:password") set, the pages need HTTP basic auth; the API keeps
    its token and /healthz and /metrics stay open."""
    expected = f"Basic {base64.b64encode(credentials.encode()).decode()}".encode()

    @web.middleware
    async def check_basic_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (credentials and not request.path.startswith((PROTECTED_PREFIX, *OPERATIONS_PATHS))
                and not is_token_probe(request)):
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                raise web.HTTPUnauthorized(
                    text="These pages need a user name and password",
                    headers={"WWW-Authenticate": 'Basic realm="dqm-daemon", charset="UTF-8"'},
                )
        return await handler(request)

    return check_basic_auth


def token_auth(tokens: Mapping[str, str]) -> Callable[[web.Request, Handler], Awaitable]:
    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(PROTECTED_PREFIX) or is_token_probe(request):
            uploader = uploader_for_token(request.headers, tokens)
            request[UPLOADER] = uploader
            structlog.contextvars.bind_contextvars(uploader=uploader)
        return await handler(request)

    return check_token
