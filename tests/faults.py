"""Fault injection for the end-to-end tests, installed through `trainer.hooks` (production code has
no fault branch): `trainer.hooks=[tests.faults:nan_loss]` with `PIPELINE_FAULT_NAN` naming where.

    PIPELINE_FAULT_NAN="3"       a NaN loss in every mini-batch of step 3 (steps count from 1)
    PIPELINE_FAULT_NAN="2:0,4"   in mini-batch 0 of step 2, and in every mini-batch of step 4

The hook runs on every Megatron rank (`MegatronActor.loss_hook`), so the NaN takes the real path: the
non-finite loss is detected on every rank and the optimizer step is skipped.
"""

from __future__ import annotations

import functools
import os
import sys

ENV = "PIPELINE_FAULT_NAN"


def parse(spec: str) -> set[tuple[int, int | None]]:
    faults = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        step, _, mini_batch = item.partition(":")
        faults.add((int(step), int(mini_batch) if mini_batch else None))
    return faults


def nan_loss(job) -> None:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the ranks need not import tests/
    job.actors.set_loss_hook(functools.partial(nan_at, parse(os.environ.get(ENV, ""))))


def nan_at(faults, step: int, mini_batch: int, loss):
    """`loss` times NaN where `faults` says (`step` is the 0-based step the actor trains)."""
    if (step + 1, None) in faults or (step + 1, mini_batch) in faults:
        return loss * float("nan")
    return loss
