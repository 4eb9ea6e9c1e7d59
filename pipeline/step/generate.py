"""generate: rollout rounds until the step has `trainer.prompts_per_step` informative groups.

Each round samples `samples_per_prompt` responses per prompt from the engines and scores them; DAPO's
dynamic sampling keeps the groups whose accuracies differ (`pipeline/filters.py`). Every sample leaves
with its reward and group id in `sample.meta`.
"""

from __future__ import annotations

import logging

from pipeline.filters import fill_batch
from pipeline.metrics import timed
from pipeline.rollout import Sample, SamplingParams
from pipeline.step.score import score

log = logging.getLogger("pipeline.train")


def generate(job, m: dict) -> list[Sample]:
    t, cfg, state = job.cfg.trainer, job.cfg, job.state
    params = SamplingParams(
        max_new_tokens=t.max_response_tokens, temperature=cfg.actor.temperature, top_p=t.top_p
    )
    seen: list[float] = []  # accuracy of every sample generated, before the filter

    def one_round(_round: int):
        prompts = job.sampler.next(t.prompts_per_step)
        groups = list(range(state.group_counter, state.group_counter + len(prompts)))
        state.group_counter += len(prompts)
        k = t.samples_per_prompt
        samples = job.rollout.generate([p.input_ids for p in prompts for _ in range(k)], params)
        rewards = score(job, samples, [p.ground_truth for p in prompts for _ in range(k)])
        gids = [g for g in groups for _ in range(k)]
        for s, r, g in zip(samples, rewards, gids, strict=True):
            s.meta.update(reward=r, group=g)
        seen.extend(r.acc for r in rewards)
        return samples, gids, [r.acc for r in rewards]

    with timed(m, "rollout"):
        samples, stats = fill_batch(
            one_round, t.prompts_per_step, t.max_gen_rounds, enabled=t.dynamic_sampling
        )
    m.update({f"sampling/{k}": v for k, v in stats.items()})
    m.update(job.rollout.metrics())  # SGLang: rollout/{time_s,tokens_per_s,retries,engine_restarts}
    m.update(job.reward_pool.metrics())  # reward/{timeouts,errors}: scored as incorrect
    m["reward/acc_generated"] = sum(seen) / len(seen)  # the policy's accuracy, unfiltered
    # Samples from other weights than the last synced ones (an engine restarted mid-rollout
    # reloads its start-up checkpoint): they are off-policy by more than the ratio knows.
    stale = sum(s.weight_version != state.weight_version for s in samples)
    m["rollout/stale_samples"] = stale / max(len(samples), 1)
    if stale:
        log.warning(
            "%d of %d samples carry a weight version other than %d", stale, len(samples), state.weight_version
        )
    if samples:
        m.update(sample_metrics(samples))
    return samples


def sample_metrics(samples: list[Sample]) -> dict:
    """reward/* and response/* of the samples the step trains on."""
    rewards, n = [s.meta["reward"] for s in samples], len(samples)
    return {
        "reward/mean": sum(r.score for r in rewards) / n,
        "reward/acc": sum(r.acc for r in rewards) / n,
        "reward/format": sum(r.format_ok for r in rewards) / n,
        "reward/overlong_penalty": sum(r.overlong for r in rewards) / n,
        "response/length_mean": sum(len(s.response_ids) for s in samples) / n,
        "response/length_max": max(len(s.response_ids) for s in samples),
        "response/truncated": sum(s.truncated for s in samples) / n,
    }
