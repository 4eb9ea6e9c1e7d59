"""Countdown: reach a target number from given numbers with + - * (the task of TinyZero, Pan et al. 2025).

A prompt gives the numbers and the target; the response writes steps ``12+7=19, 19-5=14``. The
response is right when every step's arithmetic is right, each step uses two available values (a
given number or an earlier step's result, each used once), every given number is used, and the
last result is the target. Any order of steps is right, so a puzzle has many correct responses:
the task leaves the policy real choices to make (and to collapse).

The ground truth is written ``"14 from 12 7 5"`` (the target, then the numbers).

    reward.fn: pipeline.rewards.countdown:countdown_reward
"""

from __future__ import annotations

import re
from collections import Counter

_STEP = re.compile(r"^\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(\d+)\s*$")
_TRUTH = re.compile(r"^\s*(\d+)\s+from\s+((?:\d+\s*)+)$")


def ground_truth(numbers: list[int], target: int) -> str:
    return f"{target} from {' '.join(map(str, numbers))}"


def parse_ground_truth(text: str) -> tuple[list[int], int]:
    m = _TRUTH.match(text)
    if m is None:
        raise ValueError(f"countdown ground truth {text!r}: expected 'TARGET from N1 N2 ...'")
    return [int(x) for x in m.group(2).split()], int(m.group(1))


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


_EXPR = re.compile(r"^\s*(\d+(?:\s*[+\-*]\s*\d+)*)\s*(?:=\s*(\d+)\s*)?$")


def evaluate(expr: str) -> int:
    """Value of ``a op b op c ...`` with + - * (multiplication first)."""
    terms = re.findall(r"\d+|[+\-*]", expr)
    total, sign, prod = 0, 1, int(terms[0])
    for op, x in zip(terms[1::2], terms[2::2], strict=True):
        if op == "*":
            prod *= int(x)
        else:
            total, sign, prod = total + sign * prod, 1 if op == "+" else -1, int(x)
    return total + sign * prod


def check(response: str, numbers: list[int], target: int) -> str:
    """ "ok", or why the response is wrong: "format", "arithmetic", "numbers" or "target"."""
    expr = _EXPR.match(response)
    if expr is not None:  # one expression, optionally "= value"
        if sorted(int(x) for x in re.findall(r"\d+", expr.group(1))) != sorted(numbers):
            return "numbers"
        value = evaluate(expr.group(1))
        if expr.group(2) is not None and int(expr.group(2)) != value:
            return "arithmetic"
        return "ok" if value == target else "target"
    steps = [s for s in re.split(r"[,\n]", response.strip()) if s.strip()]
    if not steps:
        return "format"
    pool = Counter(numbers)  # values available: given numbers and earlier results
    result = None
    for step in steps:
        m = _STEP.match(step)
        if m is None:
            return "format"
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if apply(a, op, b) != c:
            return "arithmetic"
        for x in (a, b):
            if pool[x] <= 0:
                return "numbers"
            pool[x] -= 1
        pool[c] += 1
        result = c
    if sum(pool.values()) != 1:
        return "numbers"  # a value left over: not every given number was used
    return "ok" if result == target else "target"


def countdown_reward(response: str, ground_truth: str) -> dict:
    """{"acc": 1.0 if the steps reach the target using every given number once, else 0.0, "why": ...}."""
    numbers, target = parse_ground_truth(ground_truth)
    why = check(response, numbers, target)
    return {"acc": float(why == "ok"), "why": why}
