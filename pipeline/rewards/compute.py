"""Turn responses into rewards: task reward (math or a custom function, scored in a worker pool under a
per-response deadline: `pipeline.rewards.pool`), format reward, overlong shaping."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.rewards.math_reward import extract_answer, math_reward
from pipeline.rewards.overlong import overlong_penalty
from pipeline.rewards.pool import RewardPool


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    fn: str = "math"  # "math" (math-verify) or "module:function" returning {"acc": float, ...}
    correct_score: float = 1.0  # task score of a correct answer (DAPO: +1)
    incorrect_score: float = 0.0  # task score of a wrong answer (DAPO: -1)
    format_coef: float = 0.0  # added when the response commits to an answer (\boxed, ####, answer:)
    overlong_buffer: int = 0  # DAPO soft overlong punishment buffer L_cache in tokens; 0 = off
    overlong_factor: float = 1.0  # its maximum penalty f
    overlong_filter: bool = False  # mask truncated responses out of the loss (DAPO overlong filtering)
    workers: int = 2  # processes scoring responses (0 = in the driver, without timeouts)
    timeout_s: float = (
        5.0  # per response: a slower one scores as incorrect (reward/timeouts), its worker is replaced
    )

    def validate(self) -> None:
        if self.fn != "math" and ":" not in self.fn:
            raise ConfigError(f"fn={self.fn!r}: expected 'math' or an import path 'package.module:function'")
        if self.workers < 0:
            raise ConfigError(f"workers={self.workers}: must be >= 0 (0 scores in the driver)")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"timeout_s={self.timeout_s}: must be a number of seconds > 0, e.g. 5")
        if self.overlong_buffer < 0:
            raise ConfigError(f"overlong_buffer={self.overlong_buffer}: must be >= 0")


@dataclass(slots=True)
class RewardResult:
    score: float  # what the advantage sees
    acc: float  # task correctness in [0, 1]; dynamic sampling filters on this, not on score
    format_ok: bool
    overlong: float  # the shaping term included in score
    truncated: bool
    status: str = "ok"  # of the task reward: "ok", "timeout" or "error" (both score as incorrect)


def load_reward_fn(path: str) -> Callable[[str, str], dict]:
    """Import `package.module:function`; a clear error names what is missing."""
    if path == "math":
        return math_reward
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward fn {path!r}: cannot import module {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward fn {path!r}: {module_name} has no callable {attr!r}")
    return fn


def compute_rewards(
    cfg: RewardConfig,
    responses: list[str],
    ground_truths: list[str],
    response_lengths: list[int],
    truncated: list[bool],
    max_response_tokens: int,
    pool: RewardPool | None = None,
) -> list[RewardResult]:
    """Rewards of `responses`; task scores from `pool` (None: `cfg.fn` in this process)."""
    if pool is None:
        pool = RewardPool(cfg.fn, workers=0)
    tasks = pool.score(responses, ground_truths)
    out = []
    for text, task, n, trunc in zip(responses, tasks, response_lengths, truncated, strict=True):
        acc = task.acc
        score = (
            cfg.correct_score
            if acc >= 1.0
            else cfg.incorrect_score + acc * (cfg.correct_score - cfg.incorrect_score)
        )
        fmt = extract_answer(text) is not None
        score += cfg.format_coef * float(fmt)
        pen = (
            overlong_penalty(n, max_response_tokens, cfg.overlong_buffer, cfg.overlong_factor)
            if cfg.overlong_buffer
            else 0.0
        )
        out.append(RewardResult(score + pen, acc, fmt, pen, bool(trunc), task.status))
    return out
