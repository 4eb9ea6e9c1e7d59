"""The reward worker pool: a response that hangs or raises scores as incorrect and is counted, a hung
or dead worker is replaced, the results equal scoring in this process, and a broken function stops
the run with one line (the misbehaving functions: tests/rewards/faulty.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.rewards import RewardConfig, RewardFnError, RewardPool, compute_rewards, math_reward

FN = "tests.rewards.faulty:tricky"


@pytest.fixture(scope="module")
def pool():
    with RewardPool(FN, workers=2, timeout_s=2.0) as p:
        yield p


def test_hangs_and_errors_score_incorrect_are_counted_and_the_run_goes_on(pool):
    pool.metrics()
    pids = sorted(w.proc.pid for w in pool._workers)
    responses = ["1", "sleep", "raise", "2", "exit", "backtrack", "1", "no acc", *["1"] * 16]
    t0 = time.monotonic()
    out = pool.score(responses, ["1"] * len(responses))
    took = time.monotonic() - t0
    assert [(s.acc, s.status) for s in out[:8]] == [
        (1.0, "ok"),
        (0.0, "timeout"),
        (0.0, "error"),
        (0.0, "ok"),
        (0.0, "error"),
        (0.0, "timeout"),
        (1.0, "ok"),
        (0.0, "error"),
    ]
    assert all(s.acc == 1.0 and s.status == "ok" for s in out[8:])
    assert "ZeroDivisionError: division by zero" in out[2].error and "exited with code 3" in out[4].error
    assert "KeyError" in out[7].error
    assert took < 40, took  # two 2 s deadlines and three replacements, not an hour
    assert pool.metrics() == {"reward/timeouts": 2, "reward/errors": 3}
    assert pool.metrics() == {"reward/timeouts": 0, "reward/errors": 0}  # counts since the last call
    # the hung and dead workers were replaced: two live workers, new processes, the old ones gone
    new = sorted(w.proc.pid for w in pool._workers)
    assert len(new) == 2 and all(w.proc.is_alive() for w in pool._workers) and new != pids
    for pid in set(pids) - set(new):  # gone, or a zombie until the pool's process reaps it
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"
    assert [s.acc for s in pool.score(["1", "2", "1"], ["1", "1", "1"])] == [1.0, 0.0, 1.0]


def test_a_response_that_makes_sympy_hang_times_out():
    """math-verify's own timeout is a signal alarm, off in our calls: without the pool this never ends."""
    responses = ["so \\boxed{9^{9^{9^{9}}}}", "\\boxed{3}", "#### 4", "\\boxed{\\frac{1}{2}}"]
    truths = ["1", "3", "5", "0.5"]
    with RewardPool("math", workers=2, timeout_s=2.0) as pool:
        t0 = time.monotonic()
        out = pool.score(responses, truths)
        assert time.monotonic() - t0 < 30
    assert [(s.acc, s.status) for s in out] == [(0.0, "timeout"), (1.0, "ok"), (0.0, "ok"), (1.0, "ok")]


def test_pool_scores_equal_scoring_in_this_process():
    table = [
        ("so the result is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("we get 0.5 in the end\n#### 1/2", "\\frac{1}{2}"),
        ("The answer is 7", "7"),
        ("\\boxed{8}", "7"),
        ("I commit to nothing", "7"),
        ("\\boxed{x^2+2x+1}", "(x+1)^2"),
        ("#### 1,000", "1000"),
    ] * 4
    responses, truths = [r for r, _ in table], [t for _, t in table]
    with RewardPool("math", workers=2) as p:
        pooled = p.score(responses, truths)
    inline = RewardPool("math", workers=0).score(responses, truths)
    expected = [math_reward(r, t)["acc"] for r, t in table]
    assert [s.acc for s in pooled] == [s.acc for s in inline] == expected
    assert sum(expected) == 4 * 6


def test_compute_rewards_marks_what_timed_out_or_failed(pool):
    cfg = RewardConfig(fn=FN, correct_score=1.0, incorrect_score=-1.0, format_coef=0.0)
    res = compute_rewards(cfg, ["1", "raise", "sleep"], ["1"] * 3, [1, 1, 1], [False] * 3, 8, pool=pool)
    assert [(r.score, r.acc, r.status) for r in res] == [
        (1.0, 1.0, "ok"),
        (-1.0, 0.0, "error"),
        (-1.0, 0.0, "timeout"),
    ]


def test_a_function_that_fails_on_every_response_stops_with_one_line():
    with (
        RewardPool("tests.rewards.faulty:always_raises", workers=1) as p,
        pytest.raises(
            RewardFnError, match=r"failed on every one of 3 responses, e.g. RuntimeError: broken reward"
        ),
    ):
        p.score(["a", "b", "c"], ["a", "b", "c"])
    with pytest.raises(ConfigError):  # RewardFnError is a ConfigError: the CLI prints it as one line
        RewardPool("tests.rewards.faulty:always_raises", workers=0).score(["a"], ["a"])


def test_reward_config_rejects_what_cannot_work():
    with pytest.raises(ConfigError, match="workers=-1"):
        RewardConfig(workers=-1).validate()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="timeout_s="):
            RewardConfig(timeout_s=bad).validate()
