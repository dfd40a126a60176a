"""dqm-daemon: a receiver for data-quality-monitoring ROOT files."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dqm-daemon")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
