"""The metrics stream (checkpoint directories: tests/test_checkpoint.py)."""

from pipeline.metrics import MetricsLogger, read_metrics


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
