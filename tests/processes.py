"""Find and stop every process a test started, by a marker variable in its environment.

A test that launches a program which itself starts daemons (Ray's GCS and raylet, Slurm job steps)
sets `NAME=value` in that program's environment; every descendant inherits it, so afterwards the
test stops exactly those processes by id, even when the program was killed before cleaning up.
The functions are the job reaper's (`pipeline/cluster/reaper.py`).
"""

from pipeline.cluster.reaper import marked_pids, stop_marked

__all__ = ["marked_pids", "stop_marked"]
