"""The `dqm-daemon` command.

    dqm-daemon serve [--config PATH] [--host HOST] [--port PORT] [--data-dir DIR]
    dqm-daemon check-config [--config PATH] [--tokens PATH]
    dqm-daemon upload FILE... --url URL --run N [--agent NAME] [--timestamp T] [--data-status S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from . import __version__
from .client import EXIT_INTERRUPTED, EXIT_USAGE, UploadOptions, upload_all
from .logs import configure_logging
from .service import serve
from .settings import TOKEN_ENV_VAR, Settings, SettingsError, load_settings

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
    check.add_argument("--tokens", type=Path, metavar="PATH",
                       help="also check a tokens file, as the unit's LoadCredential= gives it")
    upload = commands.add_parser(
        "upload", help="upload DQM files to a receiver (token from $DQM_DAEMON_TOKEN or "
        "--token-file, never from the command line)")
    upload.add_argument("files", nargs="+", type=Path, metavar="FILE")
    upload.add_argument("--url", required=True, help="the receiver, e.g. http://host:8080")
    upload.add_argument("--run", type=int, required=True, help="runNumber")
    upload.add_argument("--agent", default="DQM", help="amoreAgent (default DQM)")
    upload.add_argument("--timestamp", type=int,
                        help="timeStamp, unix seconds (default: each file's modification time)")
    upload.add_argument("--data-status", type=int, default=0,
                        help="dataStatus: 1 start of data, 2 end, 0 middle (default)")
    upload.add_argument("--token-file", type=Path, help="a file whose first line is the token")
    upload.add_argument("--retries", type=int, default=5, help="attempts after the first")
    upload.add_argument("--resume-above", type=int, default=64 * 1024 * 1024, metavar="BYTES",
                        help="files this large are sent resumably (default 64 MiB)")
    upload.add_argument("--json", action="store_true", help="one JSON line per file")
    run.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="TCP port (default 8080)")
    run.add_argument("--data-dir", help="files and catalog (default ./dqm-data)")
    return parser


def _settings(arguments: argparse.Namespace) -> Settings:
    overrides = {key: getattr(arguments, key, None) for key in ("host", "port", "data_dir")}
    settings = load_settings(arguments.config, tokens_path=getattr(arguments, "tokens", None),
                             **overrides)
    if arguments.command == "serve":
        settings.require_tokens()
    return settings


def _upload(arguments: argparse.Namespace) -> int:
    token = os.environ.get(TOKEN_ENV_VAR, "").strip()
    if arguments.token_file is not None:
        try:
            token = arguments.token_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError, ValueError) as exc:  # ValueError: not UTF-8
            print(f"dqm-daemon: cannot read a token from {arguments.token_file}: {exc}",
                  file=sys.stderr)
            return EXIT_USAGE
    if not token:
        print(f"dqm-daemon: no token: set {TOKEN_ENV_VAR} or pass --token-file",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        url = urlsplit(arguments.url)
        url.port  # noqa: B018 (raises ValueError for a port that is not a port)
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.hostname:
        print(f"dqm-daemon: --url must be http://host:port or https://host:port, got "
              f"{arguments.url!r}", file=sys.stderr)
        return EXIT_USAGE
    # A header value cannot hold control characters: no attempt could ever send it.
    if _has_control_characters(token):
        print("dqm-daemon: the token holds a control character", file=sys.stderr)
        return EXIT_USAGE
    if _has_control_characters(arguments.agent):
        print(f"dqm-daemon: --agent holds a control character: {arguments.agent!r}",
              file=sys.stderr)
        return EXIT_USAGE
    if arguments.retries < 0:
        print("dqm-daemon: --retries must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    missing = [str(path) for path in arguments.files if not path.is_file()]
    if missing:
        print(f"dqm-daemon: not a file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    options = UploadOptions(url=arguments.url, token=token, run=arguments.run,
                            agent=arguments.agent, timestamp=arguments.timestamp,
                            data_status=arguments.data_status, retries=arguments.retries,
                            resumable_threshold=arguments.resume_above)
    try:
        return asyncio.run(upload_all(arguments.files, options, arguments.json))
    except KeyboardInterrupt:
        print("dqm-daemon: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _has_control_characters(text: str) -> bool:
    return any(ord(character) < 32 or ord(character) == 127 for character in text)


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if arguments.command == "upload":
        return _upload(arguments)
    try:
        settings = _settings(arguments)
    except SettingsError as exc:
        print(f"dqm-daemon: {exc}", file=sys.stderr)
        return 2
    if arguments.command == "check-config":
        if not settings.tokens:  # under systemd they come from LoadCredential= at start
            print("dqm-daemon: note: no token here (config, --tokens, $CREDENTIALS_DIRECTORY "
                  "or DQM_DAEMON_TOKEN); `serve` refuses to start without one", file=sys.stderr)
        print(json.dumps(settings.redacted(), indent=2, default=str))
        return 0
    configure_logging()
    log.info("starting", version=__version__, **settings.redacted())
    return asyncio.run(serve(settings, os.environ))


if __name__ == "__main__":
    sys.exit(main())
