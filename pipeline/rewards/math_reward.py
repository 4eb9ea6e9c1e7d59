"""Math answers checked with math-verify (symbolic equivalence, LaTeX and plain expressions)."""

from __future__ import annotations

import logging
import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# math-verify warns on every call that its signal-based timeout is off (we turn it off on purpose).
logging.getLogger("math_verify").setLevel(logging.ERROR)

_BOXED = re.compile(r"\\boxed\{")
_HASHES = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)
_ANSWER_IS = re.compile(r"answer(?: is)?\s*[:=]?\s*([^\n]+?)\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)


def extract_answer(response: str) -> str | None:
    """The final answer a response commits to: the last \\boxed{...}, else `#### x`, else `answer: x`."""
    starts = [m.end() for m in _BOXED.finditer(response)]
    if starts:
        i, depth = starts[-1], 1
        j = i
        while j < len(response) and depth:
            depth += {"{": 1, "}": -1}.get(response[j], 0)
            j += 1
        if depth == 0:
            return response[i : j - 1].strip()
    for pattern in (_HASHES, _ANSWER_IS):
        found = pattern.findall(response)
        if found:
            return found[-1].strip()
    return None


def _parse(text: str):
    # parsing_timeout=None: math-verify's default uses signal.alarm, which works only on a main
    # thread and cannot interrupt C code; the reward pool enforces the deadline from outside
    # (pipeline/rewards/pool.py).
    return parse(
        text,
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,
    )


def math_reward(response: str, ground_truth: str) -> dict:
    """{"acc": 1.0 if the committed answer equals the ground truth else 0.0, "pred": extracted answer}.

    Only the committed final answer counts (\\boxed, ####, "answer:"): a number that merely appears
    in the reasoning is not an answer.
    """
    pred = extract_answer(response)
    if pred is None:
        return {"acc": 0.0, "pred": None}
    gold_parsed = _parse(ground_truth if "$" in ground_truth or "\\" in ground_truth else f"${ground_truth}$")
    pred_parsed = _parse(pred if "$" in pred or "\\" in pred else f"${pred}$")
    ok = bool(gold_parsed) and bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=None)
    if not ok and pred.strip() == ground_truth.strip():
        ok = True  # identical strings that math-verify cannot parse (e.g. plain words)
    return {"acc": float(ok), "pred": pred}
