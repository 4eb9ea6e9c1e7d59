"""`python -m pipeline plan`: placement and per-GPU memory of the GPU recipes, and the plans it refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Config, load
from pipeline.launch import memory, plan

REPO = Path(__file__).resolve().parents[2]
R7, R32 = "configs/qwen2.5-7b_dapo_clip_cov.yaml", "configs/qwen2.5-32b_kl_cov.yaml"


def run_plan(*args: str) -> subprocess.CompletedProcess:
    """`python -m pipeline plan ARGS`, in this process (the CLI's wiring is tested once, below)."""
    import contextlib
    import io
    import os

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = plan.main(list(args))
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def test_the_command_line_runs_plan():
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "plan", "--config", R7, "--nodes", "1", "--gpus-per-node", "8"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("plan: refused: 16 Megatron ranks"), r.stderr


def test_model_shapes_match_the_published_parameter_counts():
    s7 = memory.Dims.of(json.loads((REPO / "configs/models/qwen2.5-7b.json").read_text()))
    s32 = memory.Dims.of(json.loads((REPO / "configs/models/qwen2.5-32b.json").read_text()))
    assert abs(memory.params(s7) / 7.62e9 - 1) < 0.01 and abs(memory.params(s32) / 32.76e9 - 1) < 0.01


def test_actor_memory_by_hand_for_the_7b_recipe():
    """TP4 x DP4, 28 layers: p = (28 layer + 2 vocab matrices) / 4 params per GPU."""
    cfg = load(Config, REPO / R7)
    shape = memory.Dims.of(json.loads((REPO / "configs/models/qwen2.5-7b.json").read_text()))
    p = (28 * memory.layer_params(shape) + 2 * 152064 * 3584) / 4
    got = memory.actor(cfg.actor, shape, world_size=16, tokens_per_micro_batch=10240, micro_batches=64)
    assert got["weights"] == pytest.approx(p * 2 / memory.GIB)
    assert got["grads"] == pytest.approx(p * 4 / memory.GIB)
    assert got["optimizer"] == pytest.approx(p * 12 / 4 / memory.GIB)  # distributed over DP = 4
    # sequence parallel: (4h + 2h + 2 g d + 3f) / t elements per token and layer, bf16
    per_layer = (6 * 3584 + 2 * 4 * 128 + 3 * 18944) / 4
    assert got["activations"] == pytest.approx(28 * per_layer * 10240 * 2 / memory.GIB)
    no_sp = memory.actor(
        load(Config, REPO / R7, ["actor.sequence_parallel=false"]).actor, shape, world_size=16,
        tokens_per_micro_batch=10240, micro_batches=64,
    )  # fmt: skip
    assert no_sp["activations"] == pytest.approx(
        28 * (4 * 3584 + (2 * 3584 + 1024 + 3 * 18944) / 4) * 10240 * 2 / memory.GIB
    )
    full = memory.actor(
        load(Config, REPO / R7, ["actor.recompute_granularity=full", "actor.recompute_num_layers=1"]).actor,
        shape, world_size=16, tokens_per_micro_batch=10240, micro_batches=64,
    )  # fmt: skip
    assert full["activations"] == pytest.approx((28 * 3584 / 4 + per_layer) * 10240 * 2 / memory.GIB)


@pytest.mark.parametrize("recipe, nodes, ranks, engines, tp", [(R7, 2, 16, 8, 2), (R32, 8, 64, 16, 4)])
def test_the_gpu_recipes_fit_on_80_gb_gpus(recipe, nodes, ranks, engines, tp):
    r = run_plan("--config", recipe, "--nodes", str(nodes), "--gpus-per-node", "8", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["colocate"] is True and report["fits"] is True and report["refused"] is None
    assert [(a["rank"], a["node"], a["gpu"]) for a in report["actor"]] == [
        (i, i // 8, i % 8) for i in range(ranks)
    ]
    assert len(report["engines"]) == engines
    for e in report["engines"]:
        assert set(e) == {"engine", "node", "gpus", "port"} and len(e["gpus"]) == tp
        assert (
            e["gpus"] == [(e["engine"] * tp + j) % 8 for j in range(tp)]
            and e["node"] == e["engine"] * tp // 8
        )
    m = report["memory_gib"]
    assert m["gpu"] == 80 and m["per_gpu_peak"] <= 0.95 * 80
    assert m["per_gpu_peak"] == max(v for k, v in m["phases"].items() if k != "peak")
    assert m["actor"] > 15 and m["engines"] == pytest.approx(0.6 * 80 + memory.PROCESS_GIB)
    table = run_plan("--config", recipe, "--nodes", str(nodes), "--gpus-per-node", "8")
    assert table.returncode == 0 and table.stdout.rstrip().endswith("fits")
    assert f"rank {ranks - 1:>3}" in table.stdout and "memory per GPU" in table.stdout


@pytest.mark.parametrize(
    "args, match",
    [
        ([R7, "1", "8"], r"need 16 GPUs; 1 node\(s\) x 8 GPUs = 8: use --nodes 2"),
        ([R7, "2", "0"], r"rollout.device=cuda but --gpus-per-node=0"),
        (
            [
                R7,
                "2",
                "8",
                "actor.offload=false",
                "actor.sequence_parallel=false",
                "rollout.mem_fraction_static=0.75",
            ],
            r"the rollout phase needs 7\d\.\d GiB per GPU, more than 95% of 80 GiB \(76.0\); try actor.offload=true",
        ),
        (
            [R32, "8", "8", "rollout.mem_fraction_static=0.15"],
            r"weights \(15.3 GiB per GPU at rollout.tp_size=4\) do not fit",
        ),
        ([R7, "2", "8", "actor.tp=16"], r"actor.tp=16 does not divide the 8 GPUs"),
        ([R7, "2", "8", "actor.tp=8"], r"actor.tp=8: num_attention_heads=28 and num_key_value_heads=4"),
        ([R7, "2", "8", "actor.model_path=/nowhere/m"], r"no config.json readable here; pass --model-config"),
        (
            [R7, "2", "8", "rollout.colocate=false", "rollout.sync_method=distributed"],
            r"need 32 GPUs; 2 node\(s\) x 8 GPUs = 16",
        ),
    ],
)
def test_plans_that_cannot_run_are_refused_with_the_numbers(args, match):
    recipe, nodes, gpus, *overrides = args
    r = run_plan("--config", recipe, "--nodes", nodes, "--gpus-per-node", gpus, *overrides)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plan: refused: "), r.stderr
    import re

    assert re.search(match, lines[0]), lines[0]
    j = run_plan("--config", recipe, "--nodes", nodes, "--gpus-per-node", gpus, "--json", *overrides)
    assert (
        j.returncode == 2
        and json.loads(j.stdout)["fits"] is False
        and re.search(match, json.loads(j.stdout)["refused"])
    )


def test_a_refused_memory_plan_still_shows_its_table():
    r = run_plan("--config", R7, "--nodes", "2", "--gpus-per-node", "8", "actor.offload=false",
                 "actor.sequence_parallel=false", "rollout.mem_fraction_static=0.75")  # fmt: skip
    assert r.returncode == 2 and "memory per GPU" in r.stdout and "REFUSED:" in r.stdout


def test_cpu_demo_plan_has_no_gpus_and_no_memory_verdict():
    cfg = load(Config, REPO / "configs/demo_cpu.yaml")
    report = plan.check(cfg, nodes=1, gpus_per_node=0)
    assert report["actor"] == [{"rank": 0, "node": 0, "gpu": None, "tp_rank": 0, "dp_rank": 0, "pp_rank": 0},
                               {"rank": 1, "node": 0, "gpu": None, "tp_rank": 1, "dp_rank": 0, "pp_rank": 0}]  # fmt: skip
    assert report["memory_gib"] is None and report["fits"]


def test_rank_coordinates_follow_megatrons_order():
    # tp fastest, then data parallel, then pipeline: ranks 0-7 are stage 0 of the 32B recipe's first DP replica
    cfg = load(Config, REPO / R32)
    report = plan.check(cfg, nodes=8, gpus_per_node=8)
    a = report["actor"]
    assert (a[7]["tp_rank"], a[7]["dp_rank"], a[7]["pp_rank"]) == (7, 0, 0)
    assert (a[8]["tp_rank"], a[8]["dp_rank"], a[8]["pp_rank"]) == (0, 1, 0)
    assert (a[32]["tp_rank"], a[32]["dp_rank"], a[32]["pp_rank"]) == (0, 0, 1)
