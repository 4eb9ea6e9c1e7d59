"""`python -m pipeline plan`: where every rank and engine goes, and whether the memory fits.

    python -m pipeline plan --config configs/<recipe>.yaml --nodes N --gpus-per-node G \\
        [--gpu-memory-gib 80] [--model-config config.json] [--json] [section.field=value ...]

Starts nothing. Prints each Megatron rank's node and GPU (with its tensor/pipeline/data-parallel
coordinates), each engine's node, GPUs and port, and the per-GPU memory estimate of every phase of
a step (`pipeline/launch/memory.py`), as a table or, with `--json`, as

    {"actor": [{"rank": 0, "node": 0, "gpu": 0, ...}, ...],
     "engines": [{"engine": 0, "node": 0, "gpus": [0, 1], "port": 30000}, ...],
     "memory_gib": {"actor": ..., "engines": ..., "per_gpu_peak": ..., "gpu": 80, ...},
     "colocate": true, "fits": true, "refused": null, ...}

A plan that cannot be scheduled or cannot fit is refused (exit code 2) with the numbers and what
would change them. `python -m pipeline submit` runs the same checks before it writes a job.
The model's dimensions come from `actor.model_path`/config.json, or `--model-config`, or a copy
kept in `configs/models/<name of the model directory>.json` (the recipes' models).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cluster import placement
from pipeline.errors import ConfigError
from pipeline.launch import memory

REPO = Path(__file__).resolve().parents[2]
MODEL_CONFIGS = REPO / "configs" / "models"


class PlanRefused(ConfigError):
    """The job cannot be scheduled or does not fit; `report` has what was computed before that."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


def model_config(cfg, explicit: str | None = None) -> tuple[dict, str]:
    """The model's config.json and where it came from."""
    candidates = [Path(explicit)] if explicit else []
    if cfg.actor.model_path:
        candidates += [
            Path(cfg.actor.model_path) / "config.json",
            MODEL_CONFIGS / f"{Path(cfg.actor.model_path).name.lower()}.json",
        ]
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text()), str(path)
    raise PlanRefused(
        f"actor.model_path={cfg.actor.model_path!r}: no config.json readable here; pass --model-config "
        "PATH (a copy of the model's config.json) or run where the model is"
    )


def _coordinates(rank: int, tp: int, pp: int, world: int) -> dict:
    """Megatron's rank order (tp fastest, then dp, then pp)."""
    dp = world // (tp * pp)
    return {"tp_rank": rank % tp, "dp_rank": rank // tp % dp, "pp_rank": rank // (tp * dp)}


def build(cfg, *, nodes: int, gpus_per_node: int, gpu_gib: float = 80.0, hf: dict | None = None,
          model_source: str = "") -> dict:  # fmt: skip
    """The plan of `cfg` on `nodes` x `gpus_per_node`: placement, memory, verdict. Raises PlanRefused."""
    from pipeline.actor.config import check_layout

    t, a, r = cfg.trainer, cfg.actor, cfg.rollout
    if nodes < 1:
        raise PlanRefused(f"--nodes={nodes}: must be >= 1")
    if r.device == "cuda" and gpus_per_node < 1:
        raise PlanRefused(
            f"rollout.device=cuda but --gpus-per-node={gpus_per_node}: a GPU recipe needs the GPUs of "
            "each node (the job would fall back to gloo on CPU); pass --gpus-per-node G"
        )
    try:
        lay = placement.layout(t.world_size, r.num_engines, r.tp_size, colocate=r.colocate,
                               gpus_per_node=gpus_per_node, nodes=nodes if gpus_per_node else None,
                               actor_tp=a.tp, engine_cpus=r.engine_cpus)  # fmt: skip
    except ConfigError as e:
        raise PlanRefused(str(e)) from None
    report = lay.to_json()
    for row in report["actor"]:
        row.update(_coordinates(row["rank"], a.tp, a.pp, t.world_size))
    report.update(nodes=nodes, gpus_per_node=gpus_per_node, memory_gib=None, fits=True, refused=None)
    if hf is not None:
        report["model"] = model_source
        try:
            check_layout(a, hf, t.world_size)
        except ConfigError as e:
            raise PlanRefused(str(e), report) from None
    if not gpus_per_node or hf is None:
        return report
    shape = memory.Dims.of(hf)
    seq = cfg.data.max_prompt_tokens + t.max_response_tokens
    dp = t.world_size // (a.tp * a.pp)
    rows = t.prompts_per_step * t.samples_per_prompt // t.mini_batches_per_step // dp
    budget = getattr(a, "max_tokens_per_micro_batch", 0) or a.micro_batch_size * seq
    micro_batches = max(1, -(-rows * seq // budget))
    act = memory.actor(
        a, shape, world_size=t.world_size, tokens_per_micro_batch=budget, micro_batches=micro_batches
    )
    eng = memory.engine(r, shape, gpu_gib=gpu_gib, sequence_tokens=seq)
    ph = memory.phases(
        act, eng, colocate=r.colocate, offload=a.offload, bucket_gib=r.bucket_bytes / memory.GIB
    )
    report["memory_gib"] = {
        "actor": round(act["total"], 2),
        "engines": round(eng["total"], 2),
        "per_gpu_peak": round(ph["peak"], 2),
        "gpu": gpu_gib,
        "actor_parts": {k: round(v, 2) for k, v in act.items() if k not in ("total", "params_per_gpu")},
        "engine_parts": {k: round(v, 2) for k, v in eng.items() if k not in ("total",)},
        "phases": {k: round(v, 2) for k, v in ph.items()},
        "tokens_per_micro_batch": budget,
        "micro_batches": micro_batches,
        "sequence_tokens": seq,
    }
    problems = []
    if eng["weights"] >= eng["static"]:
        problems.append(
            f"an engine's weights ({eng['weights']:.1f} GiB per GPU at rollout.tp_size={r.tp_size}) do not fit "
            f"its rollout.mem_fraction_static={r.mem_fraction_static} x {gpu_gib:g} GiB = {eng['static']:.1f} GiB: "
            "raise mem_fraction_static or rollout.tp_size"
        )
    elif eng["kv_tokens"] < seq:
        problems.append(
            f"an engine's KV cache holds {eng['kv_tokens']} tokens, less than one sequence "
            f"(data.max_prompt_tokens + trainer.max_response_tokens = {seq}): raise rollout.mem_fraction_static "
            "or rollout.tp_size"
        )
    limit = memory.FIT_FRACTION * gpu_gib
    if ph["peak"] > limit:
        phase = max((k for k in ph if k != "peak"), key=ph.get)
        hints = []
        if r.colocate and not a.offload:
            hints.append("actor.offload=true")
        if a.tp > 1 and not a.sequence_parallel:
            hints.append("actor.sequence_parallel=true")
        if a.recompute_granularity != "full":
            hints.append("actor.recompute_granularity=full")
        if r.colocate and phase == "rollout":
            hints.append("a lower rollout.mem_fraction_static")
        hints.append("more GPUs (a larger trainer.world_size and actor.tp/pp)")
        problems.append(
            f"the {phase} phase needs {ph['peak']:.1f} GiB per GPU, more than {memory.FIT_FRACTION:.0%} of "
            f"{gpu_gib:g} GiB ({limit:.1f}); try {', '.join(hints)}"
        )
    if problems:
        report.update(fits=False, refused="; ".join(problems))
        raise PlanRefused(report["refused"], report)
    return report


def table(report: dict) -> str:
    """The plan as text: one line per GPU, then memory per phase and the verdict."""
    lines = []
    where = "on the same GPUs as their ranks" if report["colocate"] else "on GPUs of their own"
    lines.append(
        f"{report['nodes']} node(s) x {report['gpus_per_node']} GPUs; {len(report['actor'])} Megatron ranks, "
        f"{len(report['engines'])} engines {where}"
    )
    slots: dict[tuple, list[str]] = {}
    for row in report["actor"]:
        slots.setdefault((row["node"], row["gpu"]), []).append(
            f"rank {row['rank']:>3} (tp {row['tp_rank']} pp {row['pp_rank']} dp {row['dp_rank']})"
        )
    for e in report["engines"]:
        for j, g in enumerate(e["gpus"] or [None]):
            slots.setdefault((e["node"], g), []).append(f"engine {e['engine']} tp-rank {j} :{e['port']}")
    lines.append(f"{'node':>4} {'gpu':>4}  what runs there")
    for (node, gpu), what in sorted(
        slots.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])
    ):
        lines.append(f"{node:>4} {'-' if gpu is None else gpu:>4}  " + "   ".join(what))
    m = report.get("memory_gib")
    if m:
        ap, ep, ph = m["actor_parts"], m["engine_parts"], m["phases"]
        lines.append(f"memory per GPU, GiB of {m['gpu']:g} (an estimate: pipeline/launch/memory.py)")
        lines.append(
            "  actor    " + "  ".join(f"{k} {v:.1f}" for k, v in ap.items()) + f"  = {m['actor']:.1f}"
            f"   ({m['micro_batches']} micro-batches of {m['tokens_per_micro_batch']} tokens)"
        )
        lines.append(
            f"  engines  weights {ep['weights']:.1f} + KV cache {ep['kv_cache']:.1f} = static {ep['static']:.1f}"
            f" + process {ep['process']:.1f}   (KV: {ep['kv_tokens']:,} tokens, {ep['sequences']} sequences of "
            f"{m['sequence_tokens']:,})"
        )
        lines.append("  phases   " + "  ".join(f"{k} {v:.1f}" for k, v in ph.items()))
    if report.get("model"):
        lines.append(f"model dimensions from {report['model']}")
    lines.append(f"REFUSED: {report['refused']}" if report.get("refused") else "fits")
    return "\n".join(lines)


def check(
    cfg, *, nodes: int, gpus_per_node: int, gpu_gib: float = 80.0, model_config_path: str | None = None
) -> dict:
    """What `submit` runs: the plan with the model's dimensions where they can be found."""
    hf, source = None, ""
    if gpus_per_node:
        hf, source = model_config(cfg, model_config_path)
    return build(cfg, nodes=nodes, gpus_per_node=gpus_per_node, gpu_gib=gpu_gib, hf=hf, model_source=source)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline plan", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--config", required=True, help="YAML recipe")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU-only plan")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    ap.add_argument("--model-config", help="the model's config.json, where actor.model_path is not readable")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    a = ap.parse_args(argv)
    from pipeline.config import Config, load

    try:
        cfg = load(Config, a.config, a.overrides)
        report = check(cfg, nodes=a.nodes, gpus_per_node=a.gpus_per_node, gpu_gib=a.gpu_memory_gib,
                       model_config_path=a.model_config)  # fmt: skip
    except PlanRefused as e:
        report = e.report or {"refused": str(e)}
        report["refused"] = str(e)
        report["fits"] = False
        if a.json:
            print(json.dumps(report, indent=1))
        else:
            if "actor" in report:
                print(table(report))
            print(f"plan: refused: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if a.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
