"""Stand-in for `python -m pipeline train` in the Slurm tests: same command line, same run directory.

    python -m tests.slurm.standin_driver train --config R.yaml [trainer.steps=3 ...]

Joins the Ray cluster at trainer.ray_address, checks that it has $STANDIN_NODES nodes and runs one
task pinned to each (recording the Slurm node each raylet runs on), then "trains": one metrics line
per step ($STANDIN_STEP_SECONDS each), a complete checkpoint every trainer.checkpoint_every steps,
automatic resume from the newest complete checkpoint, and on a preemption request (SIGUSR1 or the
sbatch script's file) a checkpoint and exit code 75, exactly as the trainer is to do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipeline import checkpoint, preemption
from pipeline.config import apply_overrides, load_yaml


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["train"])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    t = apply_overrides(load_yaml(args.config), args.overrides).get("trainer", {})
    run_dir = Path(t.get("run_dir", "runs/standin"))
    steps, every = int(t.get("steps", 3)), int(t.get("checkpoint_every", 1))
    step_s = float(os.environ.get("STANDIN_STEP_SECONDS", "1"))
    preemption.install()

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.cluster.ray_env import init_ray

    init_ray(t.get("ray_address"))
    alive = [n for n in ray.nodes() if n["Alive"]]
    want = int(os.environ.get("STANDIN_NODES", "1"))
    if len(alive) != want:
        print(f"[standin] FATAL: Ray has {len(alive)} nodes, expected {want}", flush=True)
        return 3

    @ray.remote(num_cpus=0)
    def where() -> str:
        return os.environ.get("SLURMD_NODENAME", "?")

    slurm_nodes = ray.get(
        [
            where.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote()
            for n in alive
        ]
    )
    cluster = {
        "ray_nodes": len(alive),
        "slurm_nodes": sorted(slurm_nodes),
        "cpus": ray.cluster_resources()["CPU"],
    }
    print(f"[standin] cluster {cluster}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "cluster.json").write_text(json.dumps(cluster))

    root = run_dir / "checkpoints"
    found = checkpoint.latest_complete(root)
    step = found[0] if found else 0
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if found:
        print(f"[standin] resumed from {found[1]} (step {step})", flush=True)

    def save() -> None:
        checkpoint.begin(root, step)
        checkpoint.commit(root, step, {"step": step, "restart": restart})

    with open(run_dir / "metrics.jsonl", "a") as metrics:
        while step < steps:
            time.sleep(step_s)
            step += 1
            metrics.write(
                json.dumps({"step": step, "restart": restart, "resumed_from": found and found[0]}) + "\n"
            )
            metrics.flush()
            saved = bool(every) and (step % every == 0 or step == steps)
            if saved:
                save()
            if preemption.requested() and step < steps:
                if not saved:
                    save()
                print(
                    f"[standin] preemption requested: checkpointed step {step}, exiting for requeue",
                    flush=True,
                )
                return preemption.REQUEUE_EXIT_CODE
    print(f"[standin] done at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
