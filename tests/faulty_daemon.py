"""The real daemon (`python -m dqm_daemon ...`), its inspection children those of
faulty_child.py, which misbehave on purpose by the file's agent name (HANG…, CRASH…). With
DQM_TEST_KILL_BEFORE_FINISHED_MARKER set, it dies (SIGKILL) as a finished resumable upload is
committed, before its marker is written."""

import os
import signal
import sys
from pathlib import Path

from dqm_daemon import app, cli, resumable

FAULTY_CHILD = (sys.executable, str(Path(__file__).with_name("faulty_child.py")))

app.create_app.__kwdefaults__["inspection_command"] = FAULTY_CHILD

if os.environ.get("DQM_TEST_KILL_BEFORE_FINISHED_MARKER"):
    async def _die(*_: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    resumable.ResumableUploads.record_finished = _die

if __name__ == "__main__":
    sys.exit(cli.main())
