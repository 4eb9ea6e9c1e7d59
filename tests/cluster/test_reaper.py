"""The job reaper: whatever a driver started is stopped when the driver ends, however it ends, and
nothing else is. The driver here is a small program that starts what Ray and SGLang start: a daemon
in its own session that ignores SIGTERM, and one whose environment no longer shows the job's marker
(as after Ray's agents rename themselves). The real job: tests/test_faults.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.cluster.reaper import JOB_MARKER, SCAN_INTERVAL_S, descendants, marked_pids, process_table, stop

REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent(
    """
    import subprocess, sys, time
    from pipeline.cluster.reaper import own_processes

    own_processes()
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env={}, start_new_session=True)
    print("started", flush=True)
    time.sleep(float(sys.argv[1]))
    """
)


def start_driver(seconds: float) -> tuple[subprocess.Popen, dict[int, int]]:
    """The driver, once it has started its daemons, and pid -> start time of all below it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(seconds)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout.readline().strip() == b"started"
    deadline = time.monotonic() + 30
    while True:  # the reaper and the two daemons
        table = process_table()
        below = {p: table[p][1] for p in descendants([proc.pid], table)}
        if len(below) >= 3 or time.monotonic() > deadline:
            break
    cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in below]
    assert sum(b"pipeline.cluster.reaper" in c for c in cmdlines) == 1, cmdlines
    time.sleep(2 * SCAN_INTERVAL_S)  # the reaper has noted the unmarked one in the tree
    return proc, below


def running(noted: dict[int, int]) -> list[int]:
    table = process_table()
    return [p for p, t in noted.items() if p in table and table[p][1] == t and table[p][2] != "Z"]


def wait_gone(noted: dict[int, int], within_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while running(noted) and time.monotonic() < deadline:
        time.sleep(0.2)
    return running(noted)


@pytest.mark.parametrize("how", ["sigkill", "normal exit"])
def test_everything_the_driver_started_is_stopped_when_it_ends(how):
    proc, below = start_driver(600 if how == "sigkill" else 3 * SCAN_INTERVAL_S)
    try:
        assert len(below) == 3, below
        unmarked = [p for p in below if not Path(f"/proc/{p}/environ").read_bytes()]
        assert len(unmarked) == 1  # found by the tree alone
        if how == "sigkill":
            proc.kill()
        assert proc.wait(30) == (-signal.SIGKILL if how == "sigkill" else 0)
        left = wait_gone(below)
        assert not left, left
        assert b"stopped 2 process(es)" in proc.stderr.read()
    finally:
        stop(lambda table: set(running(below)), grace_s=0.5)


def test_the_reaper_stops_nothing_that_is_not_the_jobs():
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        proc, below = start_driver(600)
        proc.kill()
        proc.wait()
        assert not wait_gone(below)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_the_marker_reaches_the_processes_the_driver_starts():
    script = (
        "import os, subprocess, sys; from pipeline.cluster.reaper import JOB_MARKER, own_processes;"
        "job = own_processes();"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "from pipeline.cluster.reaper import marked_pids; import time; time.sleep(0.5);"
        "print(job, os.environ[JOB_MARKER] == job, marked_pids(JOB_MARKER, job) == [child.pid]); child.kill()"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
        check=True,
    )
    job, in_env, found = out.stdout.decode().split()
    assert len(job) == 32 and in_env == "True" and found == "True", out
    assert not marked_pids(JOB_MARKER, job)  # the reaper carries none: it is not the job's
