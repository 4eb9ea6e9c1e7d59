"""DAPO dynamic sampling: keep only prompt groups whose rewards differ, until the batch is full."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


def informative_groups(group_ids: Sequence[int], accs: Sequence[float]) -> list[int]:
    """Group ids (in first-seen order) whose accuracies are not all equal.

    A group whose responses all score the same has zero advantage under every group baseline, so it
    contributes no gradient. Filter on accuracy, not on the length-shaped score, or the overlong
    penalty makes degenerate groups look informative (DAPO; verl `filter_groups.metric=acc`).
    A group of size 1 is kept (nothing to compare against; verl does the same).
    """
    values: dict[int, list[float]] = defaultdict(list)
    for g, a in zip(group_ids, accs, strict=True):
        values[g].append(float(a))
    return [g for g, v in values.items() if len(v) == 1 or max(v) > min(v)]


def fill_batch(
    generate: Callable[[int], tuple[list, list[int], list[float]]],
    n_groups: int,
    max_rounds: int,
    enabled: bool = True,
) -> tuple[list, dict]:
    """Call `generate(round)` -> (samples, group_ids, accs) until `n_groups` informative groups exist.

    Returns (samples of exactly `n_groups` groups, stats). If `max_rounds` rounds do not fill the
    batch, trains on what it has (if anything) and warns; with nothing informative it returns no
    samples and the caller skips the step.
    """
    kept: dict[int, list] = {}
    order: list[int] = []
    stats = {"rounds": 0, "groups_seen": 0, "groups_kept": 0, "solve_all": 0, "solve_none": 0}
    for rnd in range(max_rounds):
        samples, gids, accs = generate(rnd)
        stats["rounds"] += 1
        by_group: dict[int, list[int]] = defaultdict(list)
        for i, g in enumerate(gids):
            by_group[g].append(i)
        stats["groups_seen"] += len(by_group)
        good = set(informative_groups(gids, accs)) if enabled else set(by_group)
        for g, idx in by_group.items():
            group_acc = [accs[i] for i in idx]
            if min(group_acc) >= 1.0:
                stats["solve_all"] += 1
            elif max(group_acc) <= 0.0:
                stats["solve_none"] += 1
            if g in good and g not in kept and len(order) < n_groups:
                kept[g] = [samples[i] for i in idx]
                order.append(g)
        if len(order) >= n_groups:
            break
    else:
        log.warning(
            "dynamic sampling: only %d of %d informative groups after %d rounds (max_rounds); "
            "training on what there is",
            len(order),
            n_groups,
            max_rounds,
        )
    stats["groups_kept"] = len(order)
    return [s for g in order for s in kept[g]], stats
