"""Reward functions: verifiable math answers, format, DAPO overlong shaping, custom ones by import path,
scored in a pool of worker processes with a per-response timeout."""

from pipeline.rewards.compute import RewardConfig, RewardResult, compute_rewards, load_reward_fn
from pipeline.rewards.math_reward import extract_answer, math_reward
from pipeline.rewards.overlong import overlong_penalty
from pipeline.rewards.pool import RewardFnError, RewardPool, TaskScore

__all__ = [
    "RewardConfig",
    "RewardFnError",
    "RewardPool",
    "RewardResult",
    "TaskScore",
    "compute_rewards",
    "extract_answer",
    "load_reward_fn",
    "math_reward",
    "overlong_penalty",
]
