"""Command line: `python -m pipeline train|plan|submit --config configs/<recipe>.yaml [section.field=value ...]`."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path


def _prepare_demo_model(cfg) -> None:
    """Make the recipe's tiny model first when the recipe asks for it and it does not exist yet.

    Its seed is the tool's own (or one in `make_tiny_model_args`), not `trainer.seed`: runs of
    several seeds share one model, whichever of them makes it."""
    out = cfg.trainer.make_tiny_model_dir
    if not out or (Path(out) / "model" / "config.json").exists():
        return
    tool = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_model.py"
    print(f"[pipeline] {out}/model does not exist: making the tiny model (a few minutes on 2 cores)")
    subprocess.run(
        [sys.executable, str(tool), "--out-dir", out, *cfg.trainer.make_tiny_model_args], check=True
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["submit"]:  # Slurm launcher: its own options (pipeline/submit.py)
        from pipeline.submit import main as submit

        return submit(argv[1:])
    if argv[:1] == ["plan"]:  # placement and memory, before anything starts (pipeline/launch/plan.py)
        from pipeline.launch.plan import main as plan

        return plan(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m pipeline", description="RL post-training with entropy control"
    )
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="run (or resume) an RL job")
    tr.add_argument("--config", required=True, help="YAML recipe in configs/")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.method=clip_cov actor.tp=2")
    sub.add_parser(
        "submit", help="write and submit the Slurm job for a recipe (submit --help)", add_help=False
    )
    sub.add_parser("plan", help="placement and per-GPU memory of a recipe, before submitting (plan --help)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from pipeline.checkpoint import check_resume_config
    from pipeline.config import Config, ConfigError, load

    try:
        cfg = load(Config, args.config, args.overrides)
        cfg.check_job()
        check_resume_config(cfg)  # a resume with another config: refused before anything starts
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if args.command == "train":
        from pipeline.cluster.reaper import own_processes

        own_processes()  # whatever the job starts from here on is stopped when this process ends
        _prepare_demo_model(cfg)
        from pipeline import preemption
        from pipeline.train import TrainingError, run

        try:
            status = run(cfg)  # its start-up checks raise ConfigError before Ray starts
        except ConfigError as e:
            print(f"configuration error: {e}", file=sys.stderr)
            return 2
        except TrainingError as e:
            print(f"[pipeline] stopped: {e}", file=sys.stderr)
            return 1
        if status == "preempted":
            return preemption.REQUEUE_EXIT_CODE
        from pipeline.metrics import curve_table

        print(f"[pipeline] done: {cfg.trainer.run_dir}/metrics.jsonl\n{curve_table(cfg.trainer.run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
