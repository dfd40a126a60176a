"""Settings: embedded defaults, TOML file, environment, command line, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dqm_daemon import cli
from dqm_daemon.naming import dqm_filename, headers_from_filename
from dqm_daemon.settings import (
    ENV_TOKEN_UPLOADER,
    Settings,
    SettingsError,
    load_settings,
)


def test_embedded_defaults_serve_locally():
    """With nothing configured the daemon listens on 127.0.0.1:8080 under ./dqm-data."""
    settings = load_settings(None, environ={"DQM_DAEMON_TOKEN": "t"})
    assert (settings.host, settings.port, settings.data_dir) == ("127.0.0.1", 8080, Path("dqm-data"))
    assert settings.tokens == {"t": ENV_TOKEN_UPLOADER}


def test_file_then_environment_then_command_line(tmp_path):
    """Each layer overrides the one before it; the config file names uploaders."""
    config = tmp_path / "config.toml"
    config.write_text(
        'port = 9000\nhost = "0.0.0.0"\nmax_upload_bytes = 1000\nread_timeout_seconds = 5\n'
        '[tokens]\nemc = "secret-a"\ntpc = "secret-b"\n'
    )
    settings = load_settings(config, environ={"DQM_DAEMON_TOKEN": "secret-c"}, port=9100)
    assert settings.port == 9100
    assert settings.host == "0.0.0.0"
    assert settings.max_upload_bytes == 1000
    assert settings.read_timeout_seconds == 5.0
    assert settings.tokens == {"secret-a": "emc", "secret-b": "tpc", "secret-c": ENV_TOKEN_UPLOADER}


def test_redacted_settings_never_show_tokens():
    """What is logged at start-up names the uploaders, never their tokens."""
    settings = Settings(tokens={"very-secret": "emc"})
    assert "very-secret" not in repr(settings)
    assert "very-secret" not in str(settings.redacted())
    assert settings.redacted()["tokens"] == ["emc"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("colour = 'blue'\n", "colour: unknown setting"),
        ("port = 'eighty'\n", "port: expected an integer"),
        ("port = 70000\n", "port: 70000 is not a TCP port"),
        ("chunk_bytes = 0\n", "chunk_bytes: 0 must be a finite number greater than zero"),
        ("read_timeout_seconds = nan\n", "read_timeout_seconds: expected a finite number"),
        ("shutdown_grace_seconds = inf\n", "shutdown_grace_seconds: expected a finite number"),
        ("resumable_expiry_seconds = -inf\n", "resumable_expiry_seconds: expected a finite"),
        ("[tokens]\na = 'same'\nb = 'same'\n", "tokens.b: same token as tokens.a"),
        ("[tokens]\na = ''\n", "tokens.a: expected a non-empty token"),
        ("port = \n", "is not valid UTF-8 TOML"),
        ("[tokens]\na = 'emc-secret '\n", "tokens.a: a token must be printable ASCII, without"),
        ("[tokens]\na = 'caf\u00e9'\n", "tokens.a: a token must be printable ASCII"),
        ("pages_basic_auth = ['shift:hunter2']\n", "pages_basic_auth: expected a string$"),
        ("data_dir = ''\n", "data_dir: expected a path string"),  # not the working directory
        ("disk_reserve_bytes = -1\n", "^disk_reserve_bytes: -1 must not be negative$"),
        ("inspection_memory_cap_bytes = 104857600\n", "below the minimum of 268435456"),
        ("inspection_workers = 1000\n", "inspection_workers: 1000 is above the maximum of 64"),
        ("quarantine_retention_days = -1\n", "quarantine_retention_days: -1.0 must not be"),
        ("quarantine_retention_days = 3000000\n", "above the maximum of 36500"),
        ("[tokens]\nemc = 'replace-with-a-long-random-token'\n",
         "tokens.emc: still the example's placeholder"),
    ],
)
def test_bad_config_is_refused_naming_the_key(tmp_path, text, fragment):
    """A bad config is refused with a message that names the key and the problem."""
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=fragment):
        load_settings(config, environ={})


def test_a_config_that_is_not_utf8_is_refused_cleanly(tmp_path):
    """A config saved in Latin-1 (a `ü` in a comment) is refused with a message, as bad TOML
    is. A token variable a header cannot carry (not ASCII) is refused: it could never match."""
    config = tmp_path / "config.toml"
    config.write_bytes("# Z\u00fcrich\nport = 8080\n".encode("latin-1"))
    with pytest.raises(SettingsError, match="is not valid UTF-8 TOML"):
        load_settings(config, environ={})
    with pytest.raises(SettingsError, match="DQM_DAEMON_TOKEN: a token must be printable"):
        load_settings(None, environ={"DQM_DAEMON_TOKEN": "\u00e9t\u00e9"})


def test_no_token_is_refused():
    """The daemon never runs without a token."""
    with pytest.raises(SettingsError, match="no token configured"):
        load_settings(None, environ={}).require_tokens()


@pytest.mark.parametrize(
    ("agent", "run", "timestamp", "expected"),
    [
        ("EMC", 123456, 140844, "EMChistos_123456_DQM_1970_01_02_16_07_24.root"),
        ("TPC", 1, 1688212800, "TPChistos_1_DQM_2023_07_01_14_00_00.root"),  # summer time
        ("TPC", 1, 1703980800, "TPChistos_1_DQM_2023_12_31_01_00_00.root"),  # winter time
        ("TPC", 1, 253402297199, "TPChistos_1_DQM_9999_12_31_23_59_59.root"),  # the last one
    ],
)
def test_overwatch_file_names(agent, run, timestamp, expected):
    """Names follow the Overwatch receiver: agent, run and Europe/Zurich local time."""
    assert dqm_filename(agent, run, timestamp) == expected
    recovered = headers_from_filename(expected)
    assert (recovered.agent, recovered.run_number, recovered.timestamp) == (agent, run, timestamp)


def test_the_example_tokens_file_is_refused_and_a_real_one_checked(tmp_path, capsys):
    """`check-config --tokens` reads a tokens file as the unit's LoadCredential= gives it: the
    example's placeholders are refused (anyone could send them), a real one is named."""
    example = Path(__file__).parents[1] / "systemd" / "tokens.example.toml"
    assert cli.main(["check-config", "--tokens", str(example)]) == 2
    assert "still the example's placeholder" in capsys.readouterr().err
    real = tmp_path / "tokens.toml"
    real.write_text('emc-agent = "9f2c4e1a7b3d5f60"\n')
    assert cli.main(["check-config", "--tokens", str(real)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tokens"] == ["emc-agent"]
    assert "9f2c4e1a7b3d5f60" not in captured.out + captured.err
    assert cli.main(["check-config", "--tokens", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_empty_data_dir_on_the_command_line_is_refused(capsys):
    """`--data-dir ''` is no way to say the working directory."""
    assert cli.main(["serve", "--data-dir", ""]) == 2
    assert "data_dir: expected a path, got an empty one" in capsys.readouterr().err
