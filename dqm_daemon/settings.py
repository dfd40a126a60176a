"""Settings: one frozen dataclass, built once from TOML file → environment → command line.

Nothing else in the package reads the environment or the config file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB

TOKEN_ENV_VAR = "DQM_DAEMON_TOKEN"
# The start of systemd/tokens.example.toml's placeholder tokens: never accepted.
PLACEHOLDER_TOKEN_PREFIX = "replace-with"
# Below this address-space cap an inspection child cannot run uproot (its threads' stacks).
MIN_INSPECTION_MEMORY_CAP = 256 * 1024 * 1024
# A century: more is a typo (and past what dates can count back to).
MAX_RETENTION_DAYS = 36500
# Each check worker is a process: more than this is a typo, not a machine.
MAX_INSPECTION_WORKERS = 64
# The credential (systemd LoadCredential=) holding tokens, in $CREDENTIALS_DIRECTORY.
CREDENTIAL_NAME = "tokens"
# The uploader name shown for the token given through the environment.
ENV_TOKEN_UPLOADER = "env-token"


class SettingsError(ValueError):
    """A setting is missing, unknown or has a bad value; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Holds the DQM files, the catalog, the quarantine and the temporary uploads.
    data_dir: Path = Path("dqm-data")
    # Accepted tokens, each mapped to the uploader name that logs and pages show instead.
    tokens: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False)
    # Bytes read from the socket and written to disk at a time.
    chunk_bytes: int = 1 * MiB
    # An upload larger than this is answered 413 and nothing is kept.
    max_upload_bytes: int = 64 * GiB
    # Uploads are refused (507) while free space in the data directory is below this.
    disk_reserve_bytes: int = 1 * GiB
    # Uploads streaming at once; one more is answered 503 with Retry-After.
    max_concurrent_uploads: int = 32
    # Seconds the Retry-After header of a 503 asks clients to wait.
    retry_after_seconds: int = 5
    # A client that sends nothing for this long has its upload dropped.
    read_timeout_seconds: float = 60.0
    # Seconds a POST waits for its file's inspection before it answers.
    inspection_budget_seconds: float = 30.0
    # Jobs the inspection queue holds before uploads wait for room.
    inspection_queue_length: int = 1000
    # Inspection child processes working at once.
    inspection_workers: int = 2
    # An inspection running longer is stopped (its child killed and replaced); the file is invalid.
    inspection_time_limit_seconds: float = 120.0
    # Address-space cap (RLIMIT_AS) of each inspection child.
    inspection_memory_cap_bytes: int = 2 * GiB
    # How often files left pending (queue full, child failed to start) are queued again.
    inspection_sweep_seconds: float = 30.0
    # The status banner warns when more files than this wait for inspection.
    inspection_backlog_warning: int = 100
    # An agent in a run is silent after this many of its usual intervals without a file.
    silent_after_intervals: float = 3.0
    # ... but never before this many seconds (retries make some intervals tiny).
    silent_minimum_seconds: float = 120.0
    # The usual interval assumed for an agent that has sent only one file so far.
    default_agent_interval_seconds: float = 300.0
    # An unfinished resumable upload untouched this long is removed.
    resumable_expiry_seconds: float = 86400.0
    # ... and one that never received a byte (its creation's answer lost, or a client gone),
    # which holds its whole length against the disk reserve, this long (if shorter).
    resumable_unstarted_expiry_seconds: float = 3600.0
    # Unfinished resumable uploads at most; one more creation is answered 503 with Retry-After.
    max_unfinished_resumable_uploads: int = 1000
    # How often expired resumable uploads are looked for.
    resumable_sweep_seconds: float = 60.0
    # Quarantined (invalid) files and their catalog rows are removed this many days after they
    # arrived; 0 keeps them for ever.
    quarantine_retention_days: float = 30.0
    # On SIGTERM, uploads in flight get this long to finish (systemd's TimeoutStopSec is longer).
    shutdown_grace_seconds: float = 30.0
    # Pages reload themselves this often.
    page_refresh_seconds: int = 5
    # "user:password" to require HTTP basic auth on the pages; empty: pages are open.
    pages_basic_auth: str = dataclasses.field(default="", repr=False)

    def __post_init__(self) -> None:
        _check_positive(self, "port", "chunk_bytes", "max_upload_bytes", "max_concurrent_uploads",
                        "read_timeout_seconds", "inspection_budget_seconds",
                        "inspection_queue_length", "inspection_workers",
                        "inspection_time_limit_seconds", "inspection_memory_cap_bytes",
                        "inspection_backlog_warning", "silent_after_intervals",
                        "inspection_sweep_seconds", "silent_minimum_seconds",
                        "shutdown_grace_seconds", "resumable_expiry_seconds",
                        "resumable_unstarted_expiry_seconds", "resumable_sweep_seconds",
                        "max_unfinished_resumable_uploads",
                        "default_agent_interval_seconds", "page_refresh_seconds")
        if self.pages_basic_auth and ":" not in self.pages_basic_auth:
            raise SettingsError("pages_basic_auth: expected \"user:password\"")
        if self.port > 65535:
            raise SettingsError(f"port: {self.port} is not a TCP port (1-65535)")
        for name in ("disk_reserve_bytes", "retry_after_seconds", "quarantine_retention_days"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name}: {getattr(self, name)!r} must not be negative")
        if self.inspection_memory_cap_bytes < MIN_INSPECTION_MEMORY_CAP:
            raise SettingsError(
                f"inspection_memory_cap_bytes: {self.inspection_memory_cap_bytes} is below the "
                f"minimum of {MIN_INSPECTION_MEMORY_CAP} (an inspection child needs that much "
                "address space to start uproot)")
        if self.quarantine_retention_days > MAX_RETENTION_DAYS:
            raise SettingsError(f"quarantine_retention_days: {self.quarantine_retention_days} "
                                f"is above the maximum of {MAX_RETENTION_DAYS} (0 keeps for ever)")
        if self.inspection_workers > MAX_INSPECTION_WORKERS:
            raise SettingsError(f"inspection_workers: {self.inspection_workers} is above the "
                                f"maximum of {MAX_INSPECTION_WORKERS}")
        if self.chunk_bytes < 4096:
            raise SettingsError(f"chunk_bytes: {self.chunk_bytes} is below the minimum of 4096")

    def require_tokens(self) -> None:
        """The daemon never runs open to anyone: at least one token must be configured."""
        if not self.tokens:
            raise SettingsError(
                f"no token configured: set the environment variable {TOKEN_ENV_VAR} "
                "or add a [tokens] table to the config file"
            )

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.sqlite3"

    @property
    def incoming_dir(self) -> Path:
        """Uploads in progress: same filesystem as the data directory, so commit is a rename."""
        return self.data_dir / ".incoming"

    @property
    def resumable_dir(self) -> Path:
        """Unfinished resumable uploads: never under a DQM name, never listed."""
        return self.data_dir / ".resumable"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    def redacted(self) -> dict[str, Any]:
        """The effective settings for display: uploader names only, never a token."""
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["tokens"] = sorted(self.tokens.values())
        shown["pages_basic_auth"] = "(set)" if self.pages_basic_auth else ""
        shown["data_dir"] = str(self.data_dir)
        return shown


def _check_positive(settings: Settings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise SettingsError(f"{name}: {value!r} must be a finite number greater than zero")


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Settings)}


# Settings whose values an error message never repeats.
_SECRET_SETTINGS = frozenset({"pages_basic_auth"})


def _coerce(key: str, value: Any) -> Any:
    """Check a config-file value against the field's declared type."""
    kind = _FIELD_TYPES[key]
    if key in _SECRET_SETTINGS and not isinstance(value, str):
        raise SettingsError(f"{key}: expected a string")
    if kind == "Path":
        if not isinstance(value, str) or not value.strip():
            raise SettingsError(f"{key}: expected a path string, got {value!r}")
        return Path(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise SettingsError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise SettingsError(f"{key}: expected a string, got {value!r}")
        return value
    raise SettingsError(f"{key}: cannot be set here")  # pragma: no cover


def check_token(token: str, where: str) -> None:
    """A token an HTTP header can carry as it is: printable ASCII, no space at either end
    (clients and servers strip those, so such a token could never match); and not the
    example file's placeholder, public for anyone to send."""
    if token != token.strip(" \t") or not all(" " <= character <= "~" for character in token):
        raise SettingsError(f"{where}: a token must be printable ASCII, without spaces at its "
                            "ends (an HTTP header cannot carry it otherwise)")
    if token.startswith(PLACEHOLDER_TOKEN_PREFIX):
        raise SettingsError(f"{where}: still the example's placeholder; put a long random "
                            "token there (e.g. from `openssl rand -hex 24`)")


def _tokens_from_table(table: Any) -> dict[str, str]:
    """`[tokens]` maps an uploader name to its token; return token → name."""
    if not isinstance(table, dict):
        raise SettingsError("tokens: expected a table of `uploader name = \"token\"`")
    tokens: dict[str, str] = {}
    for uploader, token in table.items():
        if not isinstance(token, str) or not token.strip():
            raise SettingsError(f"tokens.{uploader}: expected a non-empty token string")
        check_token(token, f"tokens.{uploader}")
        if token in tokens:
            raise SettingsError(f"tokens.{uploader}: same token as tokens.{tokens[token]}")
        tokens[token] = uploader
    return tokens


def _tokens_from_credentials(path: Path, known: Mapping[str, str],
                             required: bool = False) -> dict[str, str]:
    """systemd's LoadCredential= file: TOML lines `uploader-name = "token"`."""
    if not path.exists():
        if required:
            raise SettingsError(f"tokens file {path} does not exist")
        return {}
    try:
        with open(path, "rb") as credential_file:
            table = tomllib.load(credential_file)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"credential {path} is not readable UTF-8 TOML: {exc}") from exc
    tokens = _tokens_from_table(table)
    for token, uploader in tokens.items():
        if token in known:
            raise SettingsError(f"credential {path}: {uploader} has the token of {known[token]}")
    return tokens


def load_settings(
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    tokens_path: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings: embedded defaults, then the TOML file, then the environment
    (tokens from $CREDENTIALS_DIRECTORY/tokens and DQM_DAEMON_TOKEN), then the command-line
    overrides (entries that are None are ignored). `tokens_path`: a tokens file read as the
    credential is (for `check-config --tokens`)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    tokens: dict[str, str] = {}
    if config_path is not None:
        try:
            with open(config_path, "rb") as config_file:
                document = tomllib.load(config_file)
        except OSError as exc:
            raise SettingsError(f"cannot read config file {config_path}: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"config file {config_path} is not valid UTF-8 TOML: "
                                f"{exc}") from exc
        for key, value in document.items():
            if key == "tokens":
                tokens.update(_tokens_from_table(value))
            elif key in _FIELD_TYPES:
                values[key] = _coerce(key, value)
            else:
                raise SettingsError(f"{key}: unknown setting in {config_path}")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        tokens.update(_tokens_from_credentials(Path(credentials) / CREDENTIAL_NAME, tokens))
    if tokens_path is not None:
        tokens.update(_tokens_from_credentials(tokens_path, tokens, required=True))
    env_token = environ.get(TOKEN_ENV_VAR, "").strip()
    if env_token:
        check_token(env_token, TOKEN_ENV_VAR)
        tokens.setdefault(env_token, ENV_TOKEN_UPLOADER)
    for key, value in overrides.items():
        if value is not None:
            if _FIELD_TYPES[key] == "Path" and not str(value).strip():
                raise SettingsError(f"{key}: expected a path, got an empty one")
            values[key] = Path(value) if _FIELD_TYPES[key] == "Path" else value
    return Settings(tokens=tokens, **values)
