"""Reward functions that misbehave, for the reward pool's tests. The pool's (spawned) workers import
this module by name, so it imports nothing heavy."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from pipeline.rewards.math_reward import math_reward


def tricky(response: str, truth: str) -> dict:
    if response == "sleep":  # Python code that never returns
        time.sleep(3600)
    if response == "backtrack":  # C code that never returns to the interpreter: no signal gets in
        re.match(r"(a+)+$", "a" * 64 + "b")
    if response == "raise":
        raise ZeroDivisionError("division by zero")
    if response == "exit":  # the worker process dies
        os._exit(3)
    if response == "no acc":
        return {"pred": response}
    return {"acc": float(response == truth)}


def always_raises(response: str, truth: str) -> dict:
    raise RuntimeError("broken reward")


def flaky_math(response: str, truth: str) -> dict:
    """math_reward, except that the first response to claim each token in $FLAKY_REWARD_DIR hangs
    or raises (one of each in the whole run, whichever worker scores it)."""
    tokens = Path(os.environ["FLAKY_REWARD_DIR"])
    for token in ("hang", "raise"):
        try:
            os.close(os.open(tokens / token, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        if token == "hang":
            time.sleep(3600)
        raise ValueError("the reward function failed on this response")
    return math_reward(response, truth)
