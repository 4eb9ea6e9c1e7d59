"""The Countdown reward: one expression or steps, every given number once, the target reached."""

from __future__ import annotations

import pytest

from pipeline.rewards import compute_rewards, load_reward_fn
from pipeline.rewards.countdown import check, countdown_reward, evaluate, ground_truth, parse_ground_truth

TRUTH = "17 from 13 25 28 7"  # 13 + 25 - 28 + 7 = 17


def test_ground_truth_round_trips_and_bad_ones_say_what_is_expected():
    assert ground_truth([13, 25, 28, 7], 17) == TRUTH
    assert parse_ground_truth(TRUTH) == ([13, 25, 28, 7], 17)
    with pytest.raises(ValueError, match="expected 'TARGET from N1 N2"):
        parse_ground_truth("17")


def test_evaluate_multiplies_before_adding():
    assert evaluate("2+3*4-5*2") == 4 and evaluate("7") == 7 and evaluate("10-2-3") == 5


@pytest.mark.parametrize(
    "response, why",
    [
        ("13+25-28+7", "ok"),
        ("7+25-28+13", "ok"),  # any order of the terms
        ("25-28+13+7", "ok"),  # a negative running value is still the right value
        (" 13 + 25 - 28 + 7 = 17 ", "ok"),  # spaces and the value written out
        ("13+25-28+7=18", "arithmetic"),
        ("13+25+28-7", "target"),  # 59
        ("13+25-28", "numbers"),  # 7 unused
        ("13+25-28+7+7", "numbers"),  # 7 twice
        ("13+25-26+5", "numbers"),
        ("", "format"),
        ("seventeen", "format"),
        ("13+25=38, 38-28=10, 10+7=17", "ok"),  # steps
        ("13+25=38\n38-28=10\n10+7=17", "ok"),
        ("13+25=38, 38-28=10, 10+7=18", "arithmetic"),
        ("13+25=38, 38-28=10", "numbers"),  # 7 left over
        ("13+25=38, 38-28=10, 10+13=23", "numbers"),  # 13 used twice, 7 left
        ("13+25=38, 28-7=21, 38-21=17", "ok"),  # a tree of steps
        ("13+25=38, 38-28=10, 10*7=70", "target"),
        ("13+25=38, so 38-28=10", "format"),
    ],
)
def test_countdown_reward(response, why):
    assert check(response, [13, 25, 28, 7], 17) == why
    assert countdown_reward(response, TRUTH) == {"acc": float(why == "ok"), "why": why}


def test_a_result_may_stand_in_for_an_equal_given_number():
    assert check("5-3=2, 2*2=4", [5, 3, 2], 4) == "ok"  # the result 2 and the given 2


def test_the_trainer_loads_it_by_import_path():
    from pipeline.rewards import RewardConfig, RewardPool

    name = "pipeline.rewards.countdown:countdown_reward"
    assert callable(load_reward_fn(name))
    with RewardPool(name, workers=1) as pool:  # as the job scores: in a worker process
        out = compute_rewards(RewardConfig(fn=name), ["13+25-28+7", "13+25+28-7"], [TRUTH, TRUTH], [7, 7],
                              [False, False], 16, pool=pool)  # fmt: skip
    assert [r.acc for r in out] == [1.0, 0.0] and [r.score for r in out] == [1.0, 0.0]
