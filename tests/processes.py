"""Find and stop every process a test started, by a marker variable in its environment.

A test that launches a program which itself starts daemons (Ray's GCS and raylet, Slurm job steps)
sets `NAME=value` in that program's environment; every descendant inherits it, so afterwards the
test stops exactly those processes by id, even when the program was killed before cleaning up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def marked_pids(name: str, value: str) -> list[int]:
    """Processes whose environment carries `name=value` (this process excluded)."""
    me, found = os.getpid(), []
    needle = f"{name}={value}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def stop_marked(name: str, value: str, grace_s: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL, every marked process; returns the ids that were still running."""
    first = marked_pids(name, value)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked_pids(name, value)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if pids:
            time.sleep(grace_s)
    return first
