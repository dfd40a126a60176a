"""An inspection child that misbehaves on purpose, by the file's agent name:
CRASH… dies of SIGSEGV, HANG… never answers, SLOW… takes two seconds, ENVCHECK… reports
whether the token variable reached it. Others inspect normally.
It runs the real child's loop, so the daemon's handling of it is the real one."""

import os
import signal
import sys
import time
from pathlib import Path

from dqm_daemon import inspection, inspection_child

real_inspect_file = inspection.inspect_file


def misbehaving_inspect_file(path):
    name = Path(path).name
    if name.startswith("CRASH"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("HANG"):
        time.sleep(3600)
    if name.startswith("SLOW"):
        time.sleep(2)
    if name.startswith("ENVCHECK"):
        present = "DQM_DAEMON_TOKEN" in os.environ
        return {"state": "invalid", "reason": f"token in environment: {present}"}
    return real_inspect_file(path)


inspection.inspect_file = misbehaving_inspect_file

if __name__ == "__main__":
    sys.exit(inspection_child.main())
