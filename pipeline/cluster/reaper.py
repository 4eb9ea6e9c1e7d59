"""The job owns its processes: whatever a driver starts is gone when the driver dies, however it dies.

Ray's daemons (GCS, raylet, dashboard and runtime-env agents, workers) and SGLang servers (in their
own process session, started from Ray workers) do not all die with the process that started them:
SIGKILL to a driver once Ray's agents are up leaves `ray::DashboardAgent` and `ray::RuntimeEnvAgent`
(they ignore SIGTERM) running for another minute or more. Process groups cannot hold them (servers
lead their own sessions), so the job keeps track of them itself:

    job_id = own_processes()   # first thing in the driver, before anything else starts

puts `PIPELINE_JOB_ID=<fresh uuid>` into the driver's environment, which every process it starts
inherits (Ray hands it on to the raylet and the workers, the workers to the servers), and starts a
small reaper: a child in its own session (Ctrl-C or a signal to the driver's group does not reach
it, and it ignores SIGTERM) that, while the driver lives, notes every process below it in the
process tree once a second, and when the driver has ended stops all of them and every process that
carries the marker, SIGTERM first and SIGKILL after a grace period, until none is left. A normal exit goes the same
way: the reaper finds nothing, or what a clean shutdown left behind.

Both are needed, and a third rule closes the gap between them: a process that renames itself
(Ray's agents call setproctitle) may overwrite the start of its environment block in /proc, marker
included, while orphans lose their place in the tree the moment the driver dies (Ray's raylet dies
with the driver and leaves its agents to init). The tree, noted while the driver lives, finds the
first; the marker finds the processes started since the last scan that kept it; and a process
started since the last scan that renamed itself *and* was orphaned is found as one that is still
in the driver's session (Ray's daemons do not leave it), started no earlier than one interval
before that scan, and whose parent is no longer in that session. A process the user started
beside the driver in the same session keeps its parent (the shell) and is left alone. Process ids
are checked against their start time, so an id reused since is left alone.

On a Ray cluster that the job joins (`trainer.ray_address`) the reaper sees the driver's node only;
the marker still reaches this job's workers there, and Slurm ends the job's processes on the
other nodes.

`marked_pids` / `stop_marked` find and stop processes by a marker variable for anyone (the tests
use them with markers of their own).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable

JOB_MARKER = "PIPELINE_JOB_ID"
SCAN_INTERVAL_S = 1.0  # how often the reaper notes the driver's process tree (about 3 ms a scan)


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time in clock ticks, state letter) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (command name) "
        table[int(name)] = (int(fields[1]), int(fields[19]), fields[0].decode())
    return table


def descendants(roots: Iterable[int], table: dict[int, tuple[int, int, str]]) -> set[int]:
    """Every process below `roots` in the process tree (the roots not included)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def marked_pids(name: str, value: str) -> list[int]:
    """Processes whose environment (as /proc shows it) carries `name=value`, this process excluded."""
    me, found = os.getpid(), []
    needle = f"{name}={value}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def stop(targets: Callable[[dict], set[int]], grace_s: float = 3.0, deadline_s: float = 60.0) -> list[int]:
    """SIGTERM the processes `targets(process_table())` names, SIGKILL what is left after `grace_s`,
    and again for processes that appear meanwhile (a raylet restarting workers), until none is left
    or `deadline_s` passed. Returns the ids of every process it signalled."""
    seen: set[int] = set()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        table = process_table()
        pids = {p for p in targets(table) if p in table and table[p][2] != "Z"} - {os.getpid()}
        if not pids:
            break
        seen |= pids
        _signal(pids, signal.SIGTERM)
        until = min(end, time.monotonic() + grace_s)
        while time.monotonic() < until and _running(pids):
            time.sleep(0.1)
        _signal(_running(pids), signal.SIGKILL)
        time.sleep(0.1)
    return sorted(seen)


def stop_marked(name: str, value: str, grace_s: float = 3.0, deadline_s: float = 60.0) -> list[int]:
    """`stop` every process that carries `name=value`, and everything below them."""

    def targets(table):
        marked = marked_pids(name, value)
        return set(marked) | descendants(marked, table)

    return stop(targets, grace_s, deadline_s)


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _running(pids: Iterable[int]) -> set[int]:
    table = process_table()
    return {p for p in pids if p in table and table[p][2] != "Z"}  # a zombie is dead, only unreaped


def own_processes() -> str:
    """Mark everything this process starts from now on with a fresh job id and start the reaper."""
    job = uuid.uuid4().hex
    os.environ[JOB_MARKER] = job
    env = {k: v for k, v in os.environ.items() if k != JOB_MARKER}  # the reaper is not the job's
    subprocess.Popen(
        [sys.executable, "-m", "pipeline.cluster.reaper", str(os.getpid()), job],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    return job


def _watch(driver: int) -> tuple[dict[int, int], int]:
    """Until `driver` (this process's parent) has ended: pid -> start time of every process that
    was below it in the tree and is still running, and the clock tick (since boot, as start times
    count) of the last scan."""
    try:
        fd = os.pidfd_open(driver)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): watch the parent id instead
        fd = None
    poller = select.poll()
    if fd is not None:
        poller.register(fd, select.POLLIN)  # readable once the process has exited
    known: dict[int, int] = {}
    scanned = _ticks()
    try:
        while os.getppid() == driver:  # (checked after pidfd_open: the fd is the parent's)
            scanned = _ticks()
            table = process_table()
            known = {p: t for p, t in known.items() if p in table and table[p][1] == t}
            known.update({p: table[p][1] for p in descendants([driver], table) if p != os.getpid()})
            if fd is None:
                time.sleep(SCAN_INTERVAL_S)
            elif poller.poll(SCAN_INTERVAL_S * 1000):
                break
    finally:
        if fd is not None:
            os.close(fd)
    return known, scanned


def _ticks() -> int:
    """Now, in the clock ticks since boot that /proc/<pid>/stat counts start times in."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def orphans_since(session: int, since: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    """Processes of `session` that started at or after tick `since` and whose parent is no longer
    in the session (re-parented to init or a subreaper when their own parent died)."""
    return {
        pid
        for pid, (ppid, start, _) in table.items()
        if start >= since and _session(pid) == session and _session(ppid) != session
    }


def _reap(driver: int, job: str) -> None:
    # A Ctrl-C meant for the driver, the terminal closing, a SIGTERM to every process of the job
    # (scancel): the reaper outlives them all and exits by itself once it has done its work.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    session = _session(driver)
    if session == os.getsid(0):  # never the reaper's own session (it starts one of its own)
        session = None
    known, scanned = _watch(driver)
    since = scanned - int(SCAN_INTERVAL_S * os.sysconf("SC_CLK_TCK"))  # one scan interval of slack

    def targets(table):
        noted = {p for p, t in known.items() if p in table and table[p][1] == t}
        roots = noted | set(marked_pids(JOB_MARKER, job))
        if session is not None:
            roots |= orphans_since(session, since, table)
        return roots | descendants(roots, table)

    stopped = stop(targets)
    if stopped:
        print(
            f"[pipeline] the job's driver (pid {driver}) ended: stopped {len(stopped)} process(es) it left",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    _reap(int(sys.argv[1]), sys.argv[2])
