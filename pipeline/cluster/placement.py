"""Where the Megatron ranks and the rollout engines run: one Ray placement group for the job.

    colocated     the engines share the actor's devices: engine e runs on the devices of ranks
                  [e*tp, (e+1)*tp) (the same physical GPUs, asserted). The phases alternate (rollout,
                  then training): the engines release their memory while the actor trains, and the
                  actor moves its state to host memory while the engines generate only with
                  `actor.offload` (`pipeline/cluster/phases.py`).
    disaggregated the engines get devices of their own, after the actor's. The loop is still
                  sequential (the engines idle while the actor trains); weights travel to them after
                  every step that changed them.

Two halves, the same numbering:

    layout(...)   pure arithmetic: each rank's and each engine's (node, GPU) and each engine's port,
                  with the checks that refuse what cannot be scheduled. `python -m pipeline plan`
                  prints it before anything starts.
    create(...)   on Ray: one bundle per device, a PACK placement group, every bundle probed for its
                  node and GPU id, bundles sorted by node (fuller nodes first, then address and
                  id) and GPU id, as slime and verl sort them, roles given out in that order, then
                  the invariants asserted (an engine on one node, no GPU in two engines, a
                  colocated engine on its ranks' GPUs).

On a GPU cluster a bundle is one GPU (plus a CPU share). On a CPU box a bundle is CPUs only:
colocated, a rank and an engine each take half of it (the CPU demo's TP=2 job fits a 2-CPU Ray
node); disaggregated, each engine gets one bundle of `rollout.engine_cpus`.

Engine ports: engine k of a node listens on `port_base + k`; the base is `rollout.base_port` or,
when that is 0, a block below Linux's ephemeral range chosen from the Slurm job id, so two jobs on one
node do not collide (`engine_port_base`). A port found busy at start moves up within the block
(or, with the block full, to any free port).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline.errors import ConfigError

PORT_BLOCK = 40  # ports a job's engines may use per node (the router takes any free port)
PORT_FIRST = 30000  # below the 32768 where Linux's ephemeral range starts, above Ray's 20000-29999
PORT_BLOCKS = (32768 - PORT_FIRST) // PORT_BLOCK


class PlacementError(ConfigError):
    """A placement that cannot be scheduled or would break an invariant; the message has the numbers."""


def engine_port_base(base_port: int = 0, job_id: str | None = None) -> int:
    """First engine port on every node: `base_port`, else a per-job block (SLURM_JOB_ID, else 0)."""
    if base_port:
        return base_port
    job = job_id if job_id is not None else os.environ.get("SLURM_JOB_ID", "")
    block = int(job) % PORT_BLOCKS if job.isdigit() else 0
    return PORT_FIRST + block * PORT_BLOCK


@dataclass(frozen=True, slots=True)
class Device:
    node: int  # index of the node, in sorted order, from 0
    gpu: int | None  # GPU id on that node (Ray's id: the node's CUDA_VISIBLE_DEVICES); None on CPU
    bundle: int = -1  # placement-group bundle (-1 in a plan that has not been created)
    node_ip: str = ""  # where it is reachable (realised layouts)
    node_id: str = ""  # Ray's node id (realised layouts)


@dataclass(slots=True)
class Engine:
    devices: list[Device]  # its tensor-parallel devices, on one node
    port: int  # planned port of its server (moves up if busy at start)

    @property
    def node(self) -> int:
        return self.devices[0].node

    @property
    def gpus(self) -> list[int]:
        return [d.gpu for d in self.devices if d.gpu is not None]

    @property
    def host(self) -> str:
        return self.devices[0].node_ip


@dataclass(slots=True)
class Layout:
    """The job's placement: one `Device` per Megatron rank, one `Engine` per rollout engine."""

    colocate: bool
    gpus: bool  # devices are GPUs (else CPU slots)
    ranks: list[Device]
    engines: list[Engine]
    bundles: list[dict]  # Ray resources per bundle, in bundle order
    actor_cpus: float = 1.0  # Ray CPUs of one Megatron rank
    actor_gpus: float = 0.0  # Ray GPUs of one Megatron rank (a share of its bundle when colocated)
    engine_cpus: float = 0.5  # Ray CPUs of one engine actor (the owner of its server)
    pg: object = None  # the Ray placement group, once created
    notes: list[str] = field(default_factory=list)  # differences from the plan worth a look

    @property
    def required_cpus(self) -> float:
        return sum(b.get("CPU", 0) for b in self.bundles)

    @property
    def required_gpus(self) -> float:
        return sum(b.get("GPU", 0) for b in self.bundles)

    def to_json(self) -> dict:
        return {
            "actor": [{"rank": r, "node": d.node, "gpu": d.gpu} for r, d in enumerate(self.ranks)],
            "engines": [
                {"engine": e, "node": x.node, "gpus": x.gpus, "port": x.port}
                for e, x in enumerate(self.engines)
            ],
            "colocate": self.colocate,
        }


def layout(
    world_size: int,
    num_engines: int,
    engine_tp: int,
    *,
    colocate: bool,
    gpus_per_node: int,
    nodes: int | None = None,
    actor_tp: int = 1,
    actor_cpus: float = 1.0,
    engine_cpus: float = 0.5,
    port_base: int | None = None,
) -> Layout:
    """The planned placement on `nodes` nodes of `gpus_per_node` GPUs (0: a CPU box).

    Devices are numbered node by node, GPU by GPU; the ranks take the first `world_size`, engine e
    the tp devices `[e*tp, (e+1)*tp)` of the ranks' (colocated) or of the devices after them.
    Raises `PlacementError` with the numbers when the job cannot be placed.
    """
    for name, v in (("trainer.world_size", world_size), ("rollout.num_engines", num_engines),
                    ("rollout.tp_size", engine_tp), ("actor.tp", actor_tp)):  # fmt: skip
        if v < 1:
            raise PlacementError(f"{name}={v}: must be >= 1")
    base = engine_port_base() if port_base is None else port_base
    if gpus_per_node <= 0:
        return _cpu_layout(world_size, num_engines, engine_tp, colocate, actor_cpus, engine_cpus, base)
    need = world_size if colocate else world_size + num_engines * engine_tp
    nodes = nodes if nodes is not None else -(-need // gpus_per_node)
    have = nodes * gpus_per_node
    what = (
        f"{world_size} Megatron ranks with {num_engines} engines of tp {engine_tp} on the same GPUs"
        if colocate
        else f"{world_size} Megatron ranks + {num_engines} engines x tp {engine_tp}"
    )
    if colocate and num_engines * engine_tp > world_size:
        raise PlacementError(
            f"colocated: {num_engines} engines x rollout.tp_size={engine_tp} = {num_engines * engine_tp} GPUs "
            f"but the actor has {world_size}: a colocated engine must sit on its ranks' GPUs; use "
            f"rollout.num_engines <= {world_size // engine_tp} or rollout.colocate=false"
        )
    if need > have:
        raise PlacementError(
            f"{what} need {need} GPUs; {nodes} node(s) x {gpus_per_node} GPUs = {have}: use "
            f"--nodes {-(-need // gpus_per_node)} or fewer ranks/engines"
        )
    if actor_tp > gpus_per_node or gpus_per_node % actor_tp:
        raise PlacementError(
            f"actor.tp={actor_tp} does not divide the {gpus_per_node} GPUs of a node: a tensor-parallel "
            "group would span two nodes (its all-reduces on every layer then cross the network)"
        )
    devices = [Device(n, g) for n in range(nodes) for g in range(gpus_per_node)]
    ranks = devices[:world_size]
    first = 0 if colocate else world_size
    engines = []
    per_node: dict[int, int] = {}
    for e in range(num_engines):
        devs = devices[first + e * engine_tp : first + (e + 1) * engine_tp]
        if len({d.node for d in devs}) > 1:
            raise PlacementError(
                f"engine {e} would span nodes {sorted({d.node for d in devs})}: rollout.tp_size={engine_tp} "
                f"must divide the {gpus_per_node} GPUs of a node"
                + (
                    ""
                    if colocate
                    else f" and the GPUs the actor leaves on its last node ({world_size % gpus_per_node})"
                )
            )
        k = per_node.get(devs[0].node, 0)
        per_node[devs[0].node] = k + 1
        engines.append(Engine(list(devs), base + k))
    if max(per_node.values(), default=0) >= PORT_BLOCK:
        raise PlacementError(
            f"more than {PORT_BLOCK - 1} engines on one node: the per-job port block is full"
        )
    n_bundles = world_size if colocate else world_size + num_engines * engine_tp
    # Every bundle alike (one GPU and a CPU share): roles are handed out after sorting.
    bundle = {"CPU": max(actor_cpus, engine_cpus), "GPU": 1}
    return Layout(
        colocate=colocate,
        gpus=True,
        ranks=ranks,
        engines=engines,
        bundles=[dict(bundle) for _ in range(n_bundles)],
        actor_cpus=bundle["CPU"] / 2 if colocate else bundle["CPU"],
        actor_gpus=0.5 if colocate else 1.0,
        engine_cpus=bundle["CPU"] / 2 if colocate else bundle["CPU"],
    )


def _cpu_layout(world_size, num_engines, engine_tp, colocate, actor_cpus, engine_cpus, base) -> Layout:
    """A CPU box: ranks on CPU slots; engines on the first ranks' slots, or on slots of their own."""
    if colocate:
        devices = max(world_size, num_engines * engine_tp)
        slots = [Device(0, None, bundle=b) for b in range(devices)]
        engines = [Engine(slots[e * engine_tp : (e + 1) * engine_tp], base + e) for e in range(num_engines)]
        return Layout(
            colocate=True,
            gpus=False,
            ranks=slots[:world_size],
            engines=engines,
            bundles=[{"CPU": actor_cpus} for _ in range(devices)],
            actor_cpus=actor_cpus / 2,
            engine_cpus=actor_cpus / 2,
        )
    ranks = [Device(0, None, bundle=b) for b in range(world_size)]
    engines = [Engine([Device(0, None, bundle=world_size + e)], base + e) for e in range(num_engines)]
    return Layout(
        colocate=False,
        gpus=False,
        ranks=ranks,
        engines=engines,
        bundles=[{"CPU": actor_cpus} for _ in range(world_size)] + [{"CPU": engine_cpus} for _ in engines],
        actor_cpus=actor_cpus,
        engine_cpus=engine_cpus,
    )


# ---- on Ray -------------------------------------------------------------------------------------


def _probe_gpu():
    import ray

    return [int(i) for i in ray.get_gpu_ids()]


def probe(pg, n_bundles: int, *, gpus: bool, wave: int = 16) -> list[Device]:
    """(node ip, node id, GPU id) of every bundle, in bundle order.

    Nodes come from the placement-group table (no process needed); GPU ids from a tiny task in each
    GPU bundle (0.01 GPU: Ray gives it the bundle's GPU), `wave` bundles at a time.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    table = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    gpu_ids: list[int | None] = [None] * n_bundles
    if gpus:
        task = ray.remote(num_cpus=0, num_gpus=0.01)(_probe_gpu)
        for lo in range(0, n_bundles, wave):
            futures = [
                task.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=b
                    )
                ).remote()
                for b in range(lo, min(lo + wave, n_bundles))
            ]
            for b, ids in zip(range(lo, n_bundles), ray.get(futures), strict=False):
                if len(ids) != 1:
                    raise PlacementError(f"bundle {b} has GPUs {ids}; expected exactly one")
                gpu_ids[b] = ids[0]
    return [Device(-1, gpu_ids[b], b, ips[table[b]], table[b]) for b in range(n_bundles)]


def assign(plan: Layout, probed: list[Device]) -> Layout:
    """The plan's roles on the probed bundles, sorted by node (fullest first, then address and id)
    and GPU id."""
    # Nodes in (address, id) order, fuller nodes first: the plan fills whole nodes and leaves the
    # remainder on the last one, and PACK may have put that remainder on any node.
    count: dict[tuple[str, str], int] = {}
    for d in probed:
        count[(d.node_ip, d.node_id)] = count.get((d.node_ip, d.node_id), 0) + 1
    node_order = sorted(count, key=lambda key: (-count[key], key))
    node_index = {key: i for i, key in enumerate(node_order)}
    devices = [
        Device(node_index[(d.node_ip, d.node_id)], d.gpu, d.bundle, d.node_ip, d.node_id) for d in probed
    ]
    by_bundle = {d.bundle: d for d in devices}

    def ordered(bundles: list[int]) -> list[Device]:
        return sorted(
            (by_bundle[b] for b in bundles),
            key=lambda d: (d.node, d.gpu if d.gpu is not None else -1, d.bundle),
        )

    if plan.gpus:  # every bundle alike: ranks on the first devices, engines as planned after them
        slots = ordered(list(range(len(devices))))
        ranks = slots[: len(plan.ranks)]
        first = 0 if plan.colocate else len(plan.ranks)
        tp = len(plan.engines[0].devices) if plan.engines else 1
        groups = [slots[first + e * tp : first + (e + 1) * tp] for e in range(len(plan.engines))]
    else:  # CPU slots keep the roles of their bundles
        ranks = ordered([d.bundle for d in plan.ranks])
        groups = [ordered([d.bundle for d in e.devices]) for e in plan.engines]
    # Ports: engine k on its node gets the k-th port of the block, as planned.
    base = min((e.port for e in plan.engines), default=engine_port_base())
    seen: dict[int, int] = {}
    engines = []
    for group in groups:
        k = seen.get(group[0].node, 0)
        seen[group[0].node] = k + 1
        engines.append(Engine(group, base + k))
    out = Layout(
        colocate=plan.colocate,
        gpus=plan.gpus,
        ranks=ranks,
        engines=engines,
        bundles=plan.bundles,
        actor_cpus=plan.actor_cpus,
        actor_gpus=plan.actor_gpus,
        engine_cpus=plan.engine_cpus,
    )
    check(out)
    out.notes = _differences(plan, out)
    return out


def check(lay: Layout) -> None:
    """The invariants every layout keeps (raises PlacementError naming the engine and devices)."""
    used: dict[tuple[str, int], int] = {}
    for e, engine in enumerate(lay.engines):
        nodes = {(d.node_ip, d.node_id, d.node) for d in engine.devices}
        if len(nodes) > 1:
            raise PlacementError(f"engine {e} spans several nodes: {engine.devices}")
        if not lay.gpus:
            continue
        for d in engine.devices:
            key = (d.node_id or str(d.node), d.gpu)
            if key in used:
                raise PlacementError(f"GPU {d.gpu} of node {d.node} is in engines {used[key]} and {e}")
            used[key] = e
        if lay.colocate:
            ranks = lay.ranks[e * len(engine.devices) : (e + 1) * len(engine.devices)]
            if [(r.node_id, r.node, r.gpu) for r in ranks] != [
                (d.node_id, d.node, d.gpu) for d in engine.devices
            ]:
                raise PlacementError(
                    f"colocated engine {e} is on {engine.devices} but its ranks are on {ranks}: not the same GPUs"
                )


def _differences(plan: Layout, real: Layout) -> list[str]:
    """Where Ray's placement differs from the plan (GPU ids compared by their rank on the node)."""

    def local(devs: list[Device], all_devs: list[Device]) -> list[tuple[int, int]]:
        per_node: dict[int, list[int]] = {}
        for d in all_devs:
            per_node.setdefault(d.node, []).append(d.gpu if d.gpu is not None else d.bundle)
        for v in per_node.values():
            v.sort()
        return [(d.node, per_node[d.node].index(d.gpu if d.gpu is not None else d.bundle)) for d in devs]

    if not plan.gpus:
        return []
    planned = [*plan.ranks, *(d for e in plan.engines for d in e.devices)]
    realised = [*real.ranks, *(d for e in real.engines for d in e.devices)]
    notes = []
    got_ranks, want_ranks = local(real.ranks, realised), local(plan.ranks, planned)
    if got_ranks != want_ranks:
        notes.append(f"ranks on (node, local GPU) {got_ranks}, planned {want_ranks}")
    for e, (p, r) in enumerate(zip(plan.engines, real.engines, strict=True)):
        if local(r.devices, realised) != local(p.devices, planned):
            notes.append(f"engine {e} on {local(r.devices, realised)}, planned {local(p.devices, planned)}")
    return notes


def create(plan: Layout, timeout_s: float = 600.0) -> Layout:
    """Reserve the plan's bundles (PACK), probe and sort them, and return the realised layout."""
    import ray
    from ray.util.placement_group import placement_group

    have = ray.cluster_resources()
    for kind in ("CPU", "GPU"):
        need = sum(b.get(kind, 0) for b in plan.bundles)
        if need > have.get(kind, 0):
            raise PlacementError(
                f"the job needs {need:g} {kind}s in {len(plan.bundles)} bundles {plan.bundles[:2]}...; the Ray "
                f"cluster has {have.get(kind, 0):g}: fewer trainer.world_size or rollout engines, or more nodes"
            )
    pg = placement_group(plan.bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        have = ray.cluster_resources()
        ray.util.remove_placement_group(pg)
        raise PlacementError(
            f"the Ray cluster cannot host the job's placement group within {timeout_s:.0f} s: it needs "
            f"{len(plan.bundles)} bundles {plan.bundles[:2]}..., the cluster has {have}"
        )
    try:
        real = assign(plan, probe(pg, len(plan.bundles), gpus=plan.gpus))
    except BaseException:
        ray.util.remove_placement_group(pg)
        raise
    real.pg = pg
    return real


def cluster_gpus_per_node() -> int:
    """GPUs per node of the connected Ray cluster (the most common count among nodes that have any)."""
    import ray

    counts = [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    counts = [c for c in counts if c > 0]
    return max(set(counts), key=counts.count) if counts else 0


def in_bundle(pg, index: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def rank_options(lay: Layout, rank: int) -> dict:
    """Ray options of Megatron rank `rank`'s actor: its bundle, its CPU and GPU share."""
    return {
        "num_cpus": lay.actor_cpus,
        "num_gpus": lay.actor_gpus if lay.gpus else 0,
        "scheduling_strategy": in_bundle(lay.pg, lay.ranks[rank].bundle),
    }


def engine_options(lay: Layout, engine: int) -> dict:
    """Ray options of engine `engine`'s owner actor: on its first device's bundle, no GPU of its own
    (its server is a child process given the engine's GPUs explicitly)."""
    return {
        "num_cpus": lay.engine_cpus,
        "num_gpus": 0,
        "scheduling_strategy": in_bundle(lay.pg, lay.engines[engine].devices[0].bundle),
    }
