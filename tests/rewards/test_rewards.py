"""Rewards: math-verify answers, format, DAPO overlong shaping, custom functions, dynamic sampling."""

import pytest

from pipeline.config import ConfigError
from pipeline.filters import fill_batch, informative_groups
from pipeline.rewards import (
    RewardConfig,
    compute_rewards,
    extract_answer,
    load_reward_fn,
    math_reward,
    overlong_penalty,
)


@pytest.mark.parametrize(
    "response, truth, acc",
    [
        ("so the result is \\boxed{42}.", "42", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("we get 0.5 in the end\n#### 1/2", "\\frac{1}{2}", 1.0),
        ("The answer is 7", "7", 1.0),
        ("\\boxed{8}", "7", 0.0),
        ("I think 7 appears here but I commit to nothing", "7", 0.0),  # no committed answer
        ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        ("#### 1,000", "1000", 1.0),
    ],
)
def test_math_reward_checks_the_committed_answer(response, truth, acc):
    assert math_reward(response, truth)["acc"] == acc


def test_extract_answer_takes_the_last_boxed_with_nested_braces():
    assert extract_answer("\\boxed{1} then \\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"
    assert extract_answer("no answer") is None


def test_overlong_penalty_worked_numbers():
    # entropy-methods.md DAPO test property 4 (L_max 20480, L_cache 4096, f = 1)
    assert overlong_penalty(16384, 20480, 4096) == 0.0
    assert overlong_penalty(18432, 20480, 4096) == -0.5
    assert overlong_penalty(20480, 20480, 4096) == -1.0
    assert overlong_penalty(30000, 20480, 4096) == -1.0
    assert overlong_penalty(10, 20480, 0) == 0.0


def test_compute_rewards_scores_format_and_overlong():
    cfg = RewardConfig(correct_score=1.0, incorrect_score=-1.0, format_coef=0.1, overlong_buffer=4)
    res = compute_rewards(
        cfg,
        ["\\boxed{3}", "\\boxed{4}", "no answer", "\\boxed{3}"],
        ["3", "3", "3", "3"],
        [2, 2, 2, 10],
        [False, False, False, True],
        max_response_tokens=10,
    )
    assert [r.acc for r in res] == [1.0, 0.0, 0.0, 1.0]
    assert [r.format_ok for r in res] == [True, True, False, True]
    assert res[0].score == pytest.approx(1.1)
    assert res[1].score == pytest.approx(-0.9)
    assert res[2].score == pytest.approx(-1.0)
    assert res[3].overlong == pytest.approx(-1.0) and res[3].score == pytest.approx(0.1) and res[3].truncated


def custom_reward(response: str, truth: str) -> dict:
    return {"acc": float(truth in response)}


def test_custom_reward_by_import_path_and_clear_errors():
    fn = load_reward_fn("tests.rewards.test_rewards:custom_reward")
    assert fn("abc", "b") == {"acc": 1.0}
    with pytest.raises(ConfigError, match="cannot import module"):
        load_reward_fn("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="no callable"):
        load_reward_fn("tests.rewards.test_rewards:nothing_here")
    with pytest.raises(ConfigError, match="import path"):
        RewardConfig(fn="not-a-path").validate()


def test_dynamic_sampling_keeps_only_groups_with_differing_accuracy():
    gids = [0, 0, 1, 1, 2, 2, 3]
    accs = [1, 1, 0, 1, 0, 0, 1]
    assert informative_groups(gids, accs) == [1, 3]


def test_fill_batch_samples_until_full_and_truncates_to_exactly_n_groups():
    rounds = [
        ([("a", 0), ("b", 0), ("c", 1), ("d", 1)], [10, 10, 11, 11], [1, 1, 0, 1]),  # group 11 informative
        ([("e", 0), ("f", 0), ("g", 1), ("h", 1)], [12, 12, 13, 13], [0, 1, 1, 0]),  # 12 and 13
    ]
    samples, stats = fill_batch(lambda r: rounds[r], n_groups=2, max_rounds=5)
    assert [s[0] for s in samples] == ["c", "d", "e", "f"]
    assert stats["rounds"] == 2 and stats["groups_kept"] == 2 and stats["solve_all"] == 1


def test_fill_batch_warns_at_the_cap(caplog):
    dull = ([("a", 0), ("b", 0)], [1, 1], [0, 0])
    samples, stats = fill_batch(lambda r: dull, n_groups=1, max_rounds=3)
    assert samples == [] and stats["rounds"] == 3 and stats["solve_none"] == 3
    assert "only 0 of 1 informative groups" in caplog.text
