"""Batching of samples and the metrics stream (checkpoint directories: tests/test_checkpoint.py)."""

import pytest
import torch

from pipeline.batching import make_batch, split_rows
from pipeline.metrics import MetricsLogger, read_metrics
from pipeline.rollout import Sample


def test_make_batch_pads_prompts_left_and_responses_right():
    s = [
        Sample([5, 6, 7], [8, 9], [-0.1, -0.2], "stop", 0),
        Sample([4], [1, 2, 3], [-1.0, -2.0, -3.0], "length", 0),
    ]
    b = make_batch(s, [1.0, -0.5], pad_id=0, mask_truncated=True)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [0, 0, 4, 1, 2, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[1, 1, 0], [0, 0, 0]]  # the truncated one is filtered
    assert b["advantages"].tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert torch.allclose(b["rollout_log_prob"][1], torch.tensor([-1.0, -2.0, -3.0]))
    assert make_batch(s, [1.0, -0.5], pad_id=0)["response_mask"][1].tolist() == [1, 1, 1]
    parts = split_rows(b, 2)
    assert parts[1]["input_ids"].tolist() == [[0, 0, 4, 1, 2, 3]]
    with pytest.raises(ValueError, match="equal parts"):
        split_rows(b, 3)


def test_metrics_jsonl_and_tensorboard_and_truncate_on_resume(tmp_path):
    m = MetricsLogger(tmp_path)
    for step in range(4):
        m.log(step, {"reward": step * 0.5, "nan": float("nan"), "flag": True, "skip": [1]})
    m.truncate_after(1)
    m.log(2, {"reward": 9.0})
    m.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["reward"] == 9.0
    assert rows[0]["nan"] == "nan" and rows[0]["flag"] == 1 and "skip" not in rows[0]
    assert any((tmp_path / "tensorboard").iterdir())
