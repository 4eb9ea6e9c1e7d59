"""Start or join Ray. On a CPU box everything stays on 127.0.0.1 (see the team's cpu-recipes)."""

from __future__ import annotations

import os

from pipeline.cluster.reaper import JOB_MARKER

LOOPBACK_ENV = {
    # Without this Ray swaps 127.0.0.1 for the external interface and listens on all of them.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """`address=None`: a private local instance on loopback; otherwise join that cluster (Slurm)."""
    import ray

    if ray.is_initialized():
        return
    worker_env = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        # megatron-core's "TE/Apex not installed, falling back" notices and torch's deprecation
        # notices, printed once per rank, would bury the progress bars; real errors still show.
        "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning"),
    }
    if JOB_MARKER in os.environ:  # a joined cluster's workers (and their servers) belong to the job too
        worker_env[JOB_MARKER] = os.environ[JOB_MARKER]
    if address in (None, "", "local"):
        os.environ.update(LOOPBACK_ENV)
        worker_env.update(LOOPBACK_ENV)
        ray.init(
            address="local",  # never attach to a stale /tmp/ray/ray_current_cluster
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            runtime_env={"env_vars": worker_env},
        )
    else:
        ray.init(address=address, runtime_env={"env_vars": worker_env}, log_to_driver=True)
