"""The job reaper: whatever a driver started is stopped when the driver ends, however it ends, and
nothing else is. The driver here is a small program that starts what Ray and SGLang start: a daemon
in its own session that ignores SIGTERM, and one whose environment no longer shows the job's marker
(as after Ray's agents rename themselves). The real job: tests/test_faults.py."""

from __future__ import annotations

import os
import shlex
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


RACE_DRIVER = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from pipeline.cluster.reaper import SCAN_INTERVAL_S, own_processes

    own_processes()
    time.sleep(2 * SCAN_INTERVAL_S)
    # What Ray does at start-up: a daemon (the raylet) starts an agent that renames itself (no
    # marker in /proc), and the daemon dies with the driver, leaving the agent to init; all of
    # it within one scan of the reaper, so only the session can find the agent.
    agent = "import time; time.sleep(600)"
    daemon = f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {agent!r}], env={{}}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)"
    out = subprocess.run([sys.executable, "-c", daemon], capture_output=True, text=True).stdout
    print(out.strip(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_an_orphan_that_renamed_itself_in_the_last_scan_is_stopped_and_a_bystander_in_the_session_is_not():
    """The driver leads nothing: it runs beside a bystander under one shell, as in a terminal or a
    batch script, and dies right after its daemon left an unmarked orphan."""
    script = f"{sys.executable} -c {shlex.quote(RACE_DRIVER)} & sleep {2 * SCAN_INTERVAL_S}; sleep 600 & wait %1; echo done; wait"
    shell = subprocess.Popen(
        ["bash", "-c", script],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        orphan = int(shell.stdout.readline())
        table = process_table()
        noted = {orphan: table[orphan][1]}
        assert shell.stdout.readline().strip() == b"done"
        assert not wait_gone(noted), "the orphan outlived the driver"
        time.sleep(2 * SCAN_INTERVAL_S)  # the reaper has long finished
        table = process_table()
        bystanders = [p for p in descendants([shell.pid], table) if table[p][2] != "Z"]
        assert len(bystanders) == 1 and b"sleep" in Path(f"/proc/{bystanders[0]}/cmdline").read_bytes()
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
        stop(lambda table: set(running(noted)), grace_s=0.5)
