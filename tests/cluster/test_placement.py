"""Placement: the planned layout (pure arithmetic), its refusals, and the same layout realised by Ray.

The Ray tests run a two-node Ray cluster on this host with fake GPUs (`ray.cluster_utils.Cluster`,
each node started with `num_gpus`): the placement group is created and probed exactly as in a job,
then every rank's visible devices (a task with the rank actor's options) and every engine's server
command and environment (its real owner actor, server not started) are compared with the plan.
"""

from __future__ import annotations

import os

import pytest

from pipeline.cluster import placement
from pipeline.cluster.placement import PlacementError

RECIPES = {  # world size, engines, engine tp, actor tp (configs/qwen2.5-*.yaml)
    "7b": (16, 8, 2, 4),
    "32b": (64, 16, 4, 8),
}


def test_cpu_colocated_engines_share_the_first_ranks_bundles():
    p = placement.layout(2, 1, 1, colocate=True, gpus_per_node=0, port_base=31000)
    assert p.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]  # fits a 2-CPU node (the Slurm demo job)
    assert [d.bundle for d in p.ranks] == [0, 1] and [d.bundle for d in p.engines[0].devices] == [0]
    assert p.actor_cpus == 0.5 and p.engine_cpus == 0.5 and p.actor_gpus == 0  # half a bundle each
    assert p.required_cpus == 2 and p.engines[0].gpus == [] and p.engines[0].port == 31000


def test_cpu_disaggregated_engines_get_bundles_of_their_own():
    p = placement.layout(2, 2, 1, colocate=False, gpus_per_node=0, engine_cpus=2)
    assert p.bundles == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2}, {"CPU": 2}]
    assert [e.devices[0].bundle for e in p.engines] == [2, 3] and p.engine_cpus == 2


def test_7b_colocated_two_nodes_engines_on_their_ranks_gpus():
    world, engines, tp, actor_tp = RECIPES["7b"]
    p = placement.layout(
        world, engines, tp, colocate=True, gpus_per_node=8, actor_tp=actor_tp, port_base=30000
    )
    assert [(d.node, d.gpu) for d in p.ranks] == [(r // 8, r % 8) for r in range(16)]
    assert [(e.node, e.gpus, e.port) for e in p.engines] == [
        (e // 4, [2 * (e % 4), 2 * (e % 4) + 1], 30000 + e % 4) for e in range(8)
    ]
    assert len(p.bundles) == 16 and all(b["GPU"] == 1 for b in p.bundles)
    assert p.actor_gpus == 0.5  # the rank and its engine share each GPU
    placement.check(p)
    j = p.to_json()
    assert j["actor"][9] == {"rank": 9, "node": 1, "gpu": 1} and j["colocate"] is True
    assert j["engines"][5] == {"engine": 5, "node": 1, "gpus": [2, 3], "port": 30001}


def test_32b_colocated_and_7b_disaggregated():
    world, engines, tp, actor_tp = RECIPES["32b"]
    p = placement.layout(world, engines, tp, colocate=True, gpus_per_node=8, actor_tp=actor_tp)
    assert {e.node for e in p.engines} == set(range(8)) and all(len(set(e.gpus)) == 4 for e in p.engines)
    d = placement.layout(16, 8, 2, colocate=False, gpus_per_node=8)
    assert (
        len(d.bundles) == 32 and {r.node for r in d.ranks} == {0, 1} and {e.node for e in d.engines} == {2, 3}
    )
    assert d.actor_gpus == 1.0 and [e.port for e in d.engines[:5]] == [
        d.engines[0].port + k for k in (0, 1, 2, 3, 0)
    ]


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (
            (16, 9, 2),
            dict(colocate=True, gpus_per_node=8),
            r"9 engines x rollout.tp_size=2 = 18 GPUs but the actor has 16",
        ),
        (
            (16, 8, 2),
            dict(colocate=False, gpus_per_node=8, nodes=2),
            r"need 32 GPUs; 2 node\(s\) x 8 GPUs = 16: use --nodes 4",
        ),
        (
            (16, 5, 3),
            dict(colocate=True, gpus_per_node=8),
            r"engine 2 would span nodes \[0, 1\]: rollout.tp_size=3",
        ),
        (
            (12, 2, 8),
            dict(colocate=False, gpus_per_node=8),
            r"engine 0 would span nodes .*GPUs the actor leaves on its last node \(4\)",
        ),
        (
            (16, 1, 1),
            dict(colocate=True, gpus_per_node=8, actor_tp=16),
            r"actor.tp=16 does not divide the 8 GPUs",
        ),
        ((0, 1, 1), dict(colocate=True, gpus_per_node=8), r"trainer.world_size=0: must be >= 1"),
    ],
)
def test_plans_that_cannot_be_placed_are_refused_with_the_numbers(args, kwargs, match):
    with pytest.raises(PlacementError, match=match):
        placement.layout(*args, **kwargs)


def test_engine_ports_come_from_a_per_job_block_below_the_ephemeral_range():
    assert placement.engine_port_base(31234) == 31234
    a, b = placement.engine_port_base(job_id="1000"), placement.engine_port_base(job_id="1001")
    assert a != b and abs(a - b) >= placement.PORT_BLOCK
    for job in ("0", "67", "123456789"):
        base = placement.engine_port_base(job_id=job)
        assert base >= 30000 and base + placement.PORT_BLOCK <= 32768


def test_check_refuses_a_gpu_in_two_engines_and_a_colocated_engine_off_its_ranks():
    p = placement.layout(4, 2, 2, colocate=True, gpus_per_node=4)
    p.engines[1].devices[0] = p.engines[0].devices[0]
    with pytest.raises(PlacementError, match="GPU 0 of node 0 is in engines 0 and 1"):
        placement.check(p)
    p = placement.layout(4, 2, 2, colocate=True, gpus_per_node=4)
    p.ranks[0], p.ranks[1] = p.ranks[1], p.ranks[0]
    with pytest.raises(PlacementError, match="colocated engine 0 .* not the same GPUs"):
        placement.check(p)


# ---- Ray: two nodes with fake GPUs on this host ------------------------------------------------------
@pytest.fixture(scope="module")
def fake_gpu_cluster():
    """A function that (re)starts a 2-node Ray cluster with `gpus` fake GPUs per node."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    from pipeline.cluster.ray_env import LOOPBACK_ENV

    # Everything on 127.0.0.1: the variables for Ray's processes, the constant (read when ray was
    # first imported, perhaps by another test module) for this one.
    saved_env = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    os.environ.update(LOOPBACK_ENV)
    saved_flag, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    state = {"cluster": None, "gpus": None}

    def start(gpus: int):
        if state["gpus"] == gpus:
            return
        if state["cluster"] is not None:
            ray.shutdown()
            state["cluster"].shutdown()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": gpus, "num_gpus": gpus, "node_ip_address": "127.0.0.1"},
        )
        cluster.add_node(num_cpus=gpus, num_gpus=gpus, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        state.update(cluster=cluster, gpus=gpus)

    yield start
    if state["cluster"] is not None:
        ray.shutdown()
        state["cluster"].shutdown()
    ray_constants.ENABLE_RAY_CLUSTER = saved_flag
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _visible(rank_options: dict):
    import ray

    @ray.remote
    def where():
        return ray.get_runtime_context().get_node_id(), os.environ.get("CUDA_VISIBLE_DEVICES")

    return where.options(**rank_options).remote()


CASES = {  # recipe, colocate, GPUs per fake node (disaggregated: engines straddle the nodes), overrides
    "7b_colocated": ("qwen2.5-7b_dapo_clip_cov", True, 8, []),
    "7b_disaggregated": ("qwen2.5-7b_dapo_clip_cov", False, 24, ["rollout.sync_method=distributed"]),
    "32b_colocated": ("qwen2.5-32b_kl_cov", True, 32, []),
    "32b_disaggregated": (
        "qwen2.5-32b_kl_cov",
        False,
        80,
        ["rollout.num_engines=8", "rollout.sync_method=distributed"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_recipe_placement_on_a_two_node_ray_cluster_with_fake_gpus(fake_gpu_cluster, case, tmp_path):
    import ray

    from pipeline.cluster.rollout_group import RolloutGroup
    from pipeline.config import Config, load

    recipe, colocate, gpus, overrides = CASES[case]
    cfg = load(Config, f"configs/{recipe}.yaml", [f"rollout.colocate={str(colocate).lower()}", *overrides])
    fake_gpu_cluster(gpus)
    plan = placement.layout(cfg.trainer.world_size, cfg.rollout.num_engines, cfg.rollout.tp_size,
                            colocate=colocate, gpus_per_node=placement.cluster_gpus_per_node(),
                            actor_tp=cfg.actor.tp)  # fmt: skip
    real = placement.create(plan)
    group = None
    try:
        assert real.notes == []
        assert [(d.node, d.gpu) for d in real.ranks] == [(d.node, d.gpu) for d in plan.ranks]
        assert [(e.node, e.gpus, e.port) for e in real.engines] == [
            (e.node, e.gpus, e.port) for e in plan.engines
        ]
        # a rank sees exactly its planned GPU, on its planned node: every rank of the 16-GPU plans,
        # the first and last rank of each node of the 64-GPU ones (a worker process per task)
        ranks = [r for r, d in enumerate(real.ranks) if len(real.ranks) <= 16 or r == 0
                 or d.node != real.ranks[r - 1].node or r + 1 == len(real.ranks)
                 or real.ranks[r + 1].node != d.node]  # fmt: skip
        seen = ray.get([_visible(placement.rank_options(real, r)) for r in ranks])
        assert seen == [(real.ranks[r].node_id, str(real.ranks[r].gpu)) for r in ranks]
        # one owner actor per engine, on the engine's node; its server's command and environment
        cfg.rollout.log_dir = str(tmp_path)
        group = RolloutGroup(cfg.rollout, real, seed=0, eos_token_ids=[0], start=False)
        specs = group.server_specs()
        used = []
        for engine, spec in zip(real.engines, specs, strict=True):
            assert (
                len({d.node_id for d in engine.devices}) == 1 and spec["node_id"] == engine.devices[0].node_id
            )
            cmd = spec["command"]
            assert spec["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, engine.gpus))
            assert cmd[cmd.index("--base-gpu-id") + 1] == "0"
            assert cmd[cmd.index("--host") + 1] == engine.host == spec["node_ip"]
            assert cmd[cmd.index("--port") + 1] == str(engine.port)
            assert cmd[cmd.index("--tp-size") + 1] == str(cfg.rollout.tp_size)
            assert ("--enable-memory-saver" in cmd) == colocate
            assert cmd[0] == os.path.abspath(cfg.rollout.python)
            used += [(spec["node_id"], g) for g in engine.gpus]
        assert len(used) == len(set(used)), "a GPU is in two engines"
        assert len({s["node_id"] for s in specs}) == 2, "engines on both nodes"
        if colocate:
            for e, engine in enumerate(real.engines):
                tp = cfg.rollout.tp_size
                assert [(r.node_id, r.gpu) for r in real.ranks[e * tp : (e + 1) * tp]] == [
                    (d.node_id, d.gpu) for d in engine.devices
                ]
    finally:
        if group is not None:
            for w in group.workers:
                ray.kill(w)
        ray.util.remove_placement_group(real.pg)


def test_a_partial_node_is_numbered_last_whatever_its_id():
    """PACK may leave the remainder of a disaggregated job on any node: fuller nodes come first."""
    plan = placement.layout(8, 2, 2, colocate=False, gpus_per_node=8)  # 12 GPUs: a full node and 4 more
    probed = [
        placement.Device(-1, g, b, "10.0.0.1", "aaa") for b, g in enumerate(range(4))
    ]  # the partial node
    probed += [placement.Device(-1, g, 4 + b, "10.0.0.1", "zzz") for b, g in enumerate(range(8))]
    real = placement.assign(plan, probed)
    assert real.notes == [] and {r.node_id for r in real.ranks} == {"zzz"}
    assert [(e.node, e.gpus, e.devices[0].node_id) for e in real.engines] == [
        (1, [0, 1], "aaa"),
        (1, [2, 3], "aaa"),
    ]
