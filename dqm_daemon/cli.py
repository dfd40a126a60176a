"""The `dqm-daemon` command.

    dqm-daemon serve [--config PATH] [--host HOST] [--port PORT] [--data-dir DIR]
    dqm-daemon check-config [--config PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import structlog

from . import __version__
from .logs import configure_logging
from .service import serve
from .settings import Settings, SettingsError, load_settings

log = structlog.get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqm-daemon", description="A receiver for DQM files.")
    parser.add_argument("--version", action="version", version=f"dqm-daemon {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the receiver")
    check = commands.add_parser("check-config",
                                help="validate a config and print the effective settings")
    for command in (run, check):
        command.add_argument("--config", type=Path, help="TOML config file (see README)")
    run.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="TCP port (default 8080)")
    run.add_argument("--data-dir", type=Path, help="files and catalog (default ./dqm-data)")
    return parser


def _settings(arguments: argparse.Namespace) -> Settings:
    overrides = {key: getattr(arguments, key, None) for key in ("host", "port", "data_dir")}
    settings = load_settings(arguments.config, **overrides)
    if arguments.command == "serve":
        settings.require_tokens()
    return settings


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        settings = _settings(arguments)
    except SettingsError as exc:
        print(f"dqm-daemon: {exc}", file=sys.stderr)
        return 2
    if arguments.command == "check-config":
        if not settings.tokens:  # under systemd they come from LoadCredential= at start
            print("dqm-daemon: note: no token here (config, $CREDENTIALS_DIRECTORY or "
                  "DQM_DAEMON_TOKEN); `serve` refuses to start without one", file=sys.stderr)
        print(json.dumps(settings.redacted(), indent=2, default=str))
        return 0
    configure_logging()
    log.info("starting", version=__version__, **settings.redacted())
    return asyncio.run(serve(settings, os.environ))


if __name__ == "__main__":
    sys.exit(main())
