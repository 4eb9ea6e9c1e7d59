"""score: the reward of each sample (task reward, format reward, DAPO's overlong shaping)."""

from __future__ import annotations

from pipeline.rewards import compute_rewards
from pipeline.rollout import Sample


def score(job, samples: list[Sample], truths: list[str]):
    """One `RewardResult` per sample, against its prompt's ground truth."""
    texts = [job.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    return compute_rewards(
        job.cfg.reward,
        texts,
        truths,
        [len(s.response_ids) for s in samples],
        [s.truncated for s in samples],
        job.cfg.trainer.max_response_tokens,
        pool=job.reward_pool,
    )
