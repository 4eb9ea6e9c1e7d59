"""The colocated hand-over of the GPUs: who releases, offloads, syncs and resumes, in which order.

The actor and the engines are recording stand-ins here (the real verbs are tested where they live:
offload in tests/actor/test_scale_switches.py, the servers' endpoints in tests/rollout); the
RolloutGroup is the real class, so its bookkeeping of released SGLang memory is what is tested.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.cluster.phases import MemoryPhases
from pipeline.cluster.rollout_group import RolloutGroup


class Recorder:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getattr__(self, verb):
        return lambda *a, **k: self.log.append((self.name, verb, *a))


def rollout_group(log, device="cuda"):
    """A RolloutGroup of SGLang engines whose client records the memory calls (no Ray, no servers)."""
    group = object.__new__(RolloutGroup)
    group.cfg = SimpleNamespace(device=device)
    group.kind, group._released, group.needs_weight_sync = "sglang", set(), False
    group.engine = SimpleNamespace(
        release_memory=lambda tags: log.append(("engines", "release", tuple(tags))),
        resume_memory=lambda tags: log.append(("engines", "resume", tuple(tags))),
    )
    return group


def test_a_colocated_step_hands_the_gpus_over_in_order():
    log = []
    phases = MemoryPhases(Recorder(log, "actor"), rollout_group(log), colocate=True, offload=True)
    phases.training()
    phases.rollout(lambda: log.append(("sync",)), moved=True)
    assert log == [
        ("engines", "release", ("weights", "kv_cache", "cuda_graph")),
        ("actor", "onload"),
        ("actor", "offload", ("grads", "optimizer")),
        ("engines", "resume", ("weights",)),
        ("sync",),
        ("actor", "offload", ("weights",)),
        ("engines", "resume", ("kv_cache", "cuda_graph")),
    ]


@pytest.mark.parametrize("device, synced", [("cuda", True), ("cpu", False)])
def test_a_skipped_step_resyncs_only_where_released_weights_are_gone(device, synced):
    log = []
    group = rollout_group(log, device)
    phases = MemoryPhases(Recorder(log, "actor"), group, colocate=True, offload=False)
    phases.training()
    phases.rollout(lambda: log.append(("sync",)), moved=False)  # no update: same weights
    assert (("sync",) in log) == synced and not group.needs_weight_sync
    assert not any(name == "actor" for name, *_ in log)  # no offload: the actor stays put


def test_release_and_resume_are_idempotent_per_tag():
    log = []
    group = rollout_group(log)
    group.release_memory()
    group.release_memory()  # already released: nothing sent
    group.resume_memory(("weights",))
    group.resume_memory(("weights",))
    assert log == [
        ("engines", "release", ("weights", "kv_cache", "cuda_graph")),
        ("engines", "resume", ("weights",)),
    ]


def test_disaggregated_jobs_only_sync_when_the_weights_moved():
    log = []
    phases = MemoryPhases(Recorder(log, "actor"), rollout_group(log), colocate=False, offload=True)
    phases.training()
    assert phases.rollout(lambda: "metrics", moved=False) is None and log == []
    assert phases.rollout(lambda: "metrics", moved=True) == "metrics"
