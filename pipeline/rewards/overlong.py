"""DAPO overlong reward shaping (arXiv 2503.14476, section 3.4; verl reward_manager/dapo.py)."""


def overlong_penalty(response_length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """Soft punishment added to the task reward.

    0 while |y| <= max_length - buffer; then linear down to -factor at |y| = max_length;
    -factor beyond. E.g. max 20480, buffer 4096: 16384 -> 0, 18432 -> -0.5, 20480 -> -1.0.
    """
    if buffer <= 0:
        return 0.0 if response_length <= max_length else -factor
    expected = max_length - buffer
    if response_length <= expected:
        return 0.0
    return max(-factor, (expected - response_length) / buffer * factor)
