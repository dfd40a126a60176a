"""The real daemon (`python -m dqm_daemon ...`), its inspection children those of
faulty_child.py, which misbehave on purpose by the file's agent name (HANG…, CRASH…)."""

import sys
from pathlib import Path

from dqm_daemon import app, cli

FAULTY_CHILD = (sys.executable, str(Path(__file__).with_name("faulty_child.py")))

app.create_app.__kwdefaults__["inspection_command"] = FAULTY_CHILD

if __name__ == "__main__":
    sys.exit(cli.main())
