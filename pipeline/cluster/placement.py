"""Where the Megatron ranks and the rollout engines run: one Ray placement group for the job.

    colocated     the engines share the actor's devices: one bundle per rank (one GPU each on a
                  cluster); engine e runs on bundles [e*tp, (e+1)*tp). The phases alternate
                  (rollout, then training), and each side releases its memory while the other runs.
    disaggregated the engines get bundles of their own: rollout and training overlap in time on
                  separate devices; weights travel between them after every step.

On a CPU box a bundle is CPUs only: colocated, a rank and an engine each take half of a bundle's
CPU (so the CPU demo's TP=2 job fits a 2-CPU Ray node); disaggregated, the engines' CPUs form
bundles of their own. Ray's logical CPU count is what is planned here (`required_cpus`).
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@dataclass(slots=True)
class Plan:
    bundles: list[dict]  # Ray resources per bundle
    actor_bundles: list[int]  # bundle of each Megatron rank
    engine_bundles: list[list[int]]  # bundles of each engine (its tensor-parallel devices)
    actor_gpus: float  # Ray GPUs of one Megatron rank (a fraction when colocated)
    engine_gpus: float  # GPUs of one engine (its servers' devices; 0 on CPU)
    actor_cpus: float = 1.0  # Ray CPUs of one Megatron rank
    engine_cpus: float = 0.5  # Ray CPUs of one engine (its owner actor)

    @property
    def required_cpus(self) -> float:
        return sum(b.get("CPU", 0) for b in self.bundles)


def plan(
    world_size: int,
    num_engines: int,
    engine_tp: int,
    *,
    colocate: bool,
    gpus: bool,
    actor_cpus: float = 1.0,
    engine_cpus: float = 0.5,
) -> Plan:
    """Bundles for `world_size` ranks and `num_engines` engines of `engine_tp` devices each."""
    if world_size < 1 or num_engines < 1 or engine_tp < 1:
        raise ValueError(
            f"world_size={world_size}, num_engines={num_engines}, engine_tp={engine_tp}: must be >= 1"
        )
    device = {"GPU": 1} if gpus else {}
    if colocate:
        # Each bundle is one device (a GPU, or a CPU slot on a CPU box) shared by a Megatron rank and,
        # on the first bundles, an engine: each process asks for half of it, as the phases alternate.
        devices = max(world_size, num_engines * engine_tp)
        bundles = [{"CPU": actor_cpus, **device} for _ in range(devices)]
        engine_bundles = [list(range(e * engine_tp, (e + 1) * engine_tp)) for e in range(num_engines)]
        actor_gpus, actor_cpus, engine_cpus = (0.5 if gpus else 0), actor_cpus / 2, actor_cpus / 2
    else:
        bundles = [{"CPU": actor_cpus, **device} for _ in range(world_size)]
        engine_bundles = [[world_size + e] for e in range(num_engines)]
        bundles += [{"CPU": engine_cpus, **({"GPU": engine_tp} if gpus else {})} for _ in range(num_engines)]
        actor_gpus = 1 if gpus else 0
    return Plan(
        bundles,
        list(range(world_size)),
        engine_bundles,
        actor_gpus,
        engine_tp if gpus else 0,
        actor_cpus,
        engine_cpus,
    )


def create(p: Plan, timeout_s: float = 600.0) -> PlacementGroup:
    """Reserve the bundles (PACK: as few nodes as possible); fail clearly if the cluster lacks them."""
    have = ray.cluster_resources()
    for kind in ("CPU", "GPU"):
        need = sum(b.get(kind, 0) for b in p.bundles)
        if need > have.get(kind, 0):
            raise RuntimeError(
                f"the job needs {need:g} {kind}s in {len(p.bundles)} bundles {p.bundles}; the Ray cluster has "
                f"{have.get(kind, 0):g}: fewer trainer.world_size or rollout engines, or more nodes"
            )
    pg = placement_group(p.bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        have = ray.cluster_resources()
        ray.util.remove_placement_group(pg)
        raise RuntimeError(
            f"the Ray cluster cannot host the job's placement group within {timeout_s:.0f} s: it needs "
            f"{len(p.bundles)} bundles {p.bundles}, the cluster has {have}"
        )
    return pg


def in_bundle(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)
