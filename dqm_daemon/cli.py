"""The `dqm-daemon` command: `dqm-daemon serve [--host] [--port] [--data-dir] [--config]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import structlog
from aiohttp import web

from . import __version__
from .app import create_app
from .logs import configure_logging
from .settings import SettingsError, load_settings

log = structlog.get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqm-daemon", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dqm-daemon {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the receiver")
    serve.add_argument("--config", type=Path, help="TOML config file (see README)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8080)")
    serve.add_argument("--data-dir", type=Path, help="where files and catalog live (default ./dqm-data)")
    return parser


def serve(arguments: argparse.Namespace) -> int:
    try:
        settings = load_settings(
            arguments.config,
            host=arguments.host,
            port=arguments.port,
            data_dir=arguments.data_dir,
        )
        settings.require_tokens()
    except SettingsError as exc:
        print(f"dqm-daemon: {exc}", file=sys.stderr)
        return 2
    configure_logging()
    log.info("starting", version=__version__, **settings.redacted())
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        print=lambda message: log.info("listening", host=settings.host, port=settings.port),
        access_log=None,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.command == "serve":
        return serve(arguments)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
