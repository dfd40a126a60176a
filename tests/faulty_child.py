"""An inspection child that misbehaves on purpose, by the file's agent name:
CRASH… dies of SIGSEGV, HANG… never answers, SLOW… takes two seconds, LATE… answers two
seconds after its check (what it read is then two seconds old), ENVCHECK… reports
whether the token variable reached it, HALF… exits between a sound file's result and its
listing, CUT… exits half-way through writing the listing. Others inspect normally.
It runs the real child's loop, so the daemon's handling of it is the real one."""

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from dqm_daemon import inspection, inspection_child

real_inspect_file = inspection.inspect_file
exit_before_the_listing = False


def dumps_then_exit_before_the_listing(value, *args, **kwargs):
    if exit_before_the_listing and isinstance(value, list):  # the listing's line
        sys.exit(3)  # the result line before it is flushed as the child exits
    return json.dumps(value, *args, **kwargs)


real_fdopen = os.fdopen
cut_the_listing = False


class CuttingResults:
    """The child's results stream; in CUT mode, the listing's line is cut half-way by the
    child's exit."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        if cut_the_listing and text.startswith("["):
            self._stream.write(text[:len(text) // 2])
            self._stream.flush()
            os._exit(3)
        return self._stream.write(text)

    def flush(self):
        self._stream.flush()


def fdopen_cutting(*arguments, **options):
    return CuttingResults(real_fdopen(*arguments, **options))


def misbehaving_inspect_file(path):
    name = Path(path).name
    if name.startswith("CRASH"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("HANG"):
        time.sleep(3600)
    if name.startswith("SLOW"):
        time.sleep(2)
    if name.startswith("HALF"):
        global exit_before_the_listing
        exit_before_the_listing = True
    if name.startswith("CUT"):
        global cut_the_listing
        cut_the_listing = True
    if name.startswith("LATE"):
        result = real_inspect_file(path)
        time.sleep(2)
        return result
    if name.startswith("ENVCHECK"):
        present = "DQM_DAEMON_TOKEN" in os.environ
        return {"state": "invalid", "reason": f"token in environment: {present}"}
    return real_inspect_file(path)


inspection.inspect_file = misbehaving_inspect_file
os.fdopen = fdopen_cutting  # the child opens its results stream with it
inspection_child.json = SimpleNamespace(loads=json.loads,
                                        dumps=dumps_then_exit_before_the_listing)

if __name__ == "__main__":
    sys.exit(inspection_child.main())
