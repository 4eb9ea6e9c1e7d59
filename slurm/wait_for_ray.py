"""Wait until the Ray cluster at --address has the expected nodes, CPUs and GPUs; exit 1 at the deadline.

Run by slurm/ray_job.sbatch on the head node. Prints progress every 30 s instead of hanging silently;
its last line is the state it saw (the sbatch script echoes it).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--address", required=True, help="HEAD_IP:PORT")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--cpus", type=float, default=0)
    ap.add_argument("--gpus", type=float, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="seconds")
    ap.add_argument("--poll", type=float, default=2, help="seconds between checks")
    args = ap.parse_args(argv)

    import ray

    deadline = time.monotonic() + args.timeout
    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    last_print = -1e9
    while True:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        res = ray.cluster_resources()
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        state = (
            f"{len(alive)}/{args.nodes} nodes, {cpus:g}/{args.cpus:g} CPUs, {gpus:g}/{args.gpus:g} GPUs "
            f"({', '.join(sorted(n['NodeManagerAddress'] for n in alive))})"
        )
        if len(alive) >= args.nodes and cpus >= args.cpus and gpus >= args.gpus:
            print(f"ready: {state}", flush=True)
            return 0
        now = time.monotonic()
        if now > deadline:
            print(f"FATAL: the Ray cluster did not form within {args.timeout:g}s: {state}", flush=True)
            return 1
        if now - last_print >= 30:
            print(f"waiting: {state}", flush=True)
            last_print = now
        time.sleep(args.poll)


if __name__ == "__main__":
    sys.exit(main())
