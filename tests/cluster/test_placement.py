"""Placement plans: which bundle each Megatron rank and each engine gets, colocated or not."""

import pytest

from pipeline.cluster import placement


def test_colocated_cpu_engines_share_the_first_ranks_bundles():
    p = placement.plan(2, 1, 1, colocate=True, gpus=False, engine_cpus=0.5)
    assert p.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]  # fits a 2-CPU node (the Slurm demo job)
    assert p.actor_bundles == [0, 1] and p.engine_bundles == [[0]]
    assert p.actor_cpus == 0.5 and p.engine_cpus == 0.5  # half a bundle each: the phases alternate
    assert p.actor_gpus == 0 and p.engine_gpus == 0 and p.required_cpus == 2


def test_colocated_gpu_engines_take_tp_consecutive_devices_of_the_actor():
    p = placement.plan(8, 2, 4, colocate=True, gpus=True)
    assert len(p.bundles) == 8 and all(b["GPU"] == 1 for b in p.bundles)
    assert p.engine_bundles == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert p.actor_gpus == 0.5  # the rank and the engine share each GPU


def test_colocated_engines_may_need_more_devices_than_ranks():
    p = placement.plan(2, 2, 2, colocate=True, gpus=True)
    assert len(p.bundles) == 4 and p.actor_bundles == [0, 1] and p.engine_bundles == [[0, 1], [2, 3]]


def test_disaggregated_engines_get_bundles_of_their_own():
    p = placement.plan(4, 2, 2, colocate=False, gpus=True, engine_cpus=2)
    assert p.actor_bundles == [0, 1, 2, 3] and p.engine_bundles == [[4], [5]]
    assert p.bundles[4:] == [{"CPU": 2, "GPU": 2}, {"CPU": 2, "GPU": 2}]
    assert p.actor_gpus == 1 and p.engine_gpus == 2 and p.actor_cpus == 1 and p.engine_cpus == 2


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        placement.plan(0, 1, 1, colocate=True, gpus=False)
