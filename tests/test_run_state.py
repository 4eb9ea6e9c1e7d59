"""The metrics stream, and checkpoint directories that are complete or ignored."""

import json

from pipeline import checkpoint
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


def test_checkpoint_interrupted_mid_write_is_never_used(tmp_path):
    p = checkpoint.begin(tmp_path, 2)
    (p / "model.bin").write_text("x")
    checkpoint.commit(tmp_path, 2, {"step": 2})
    p = checkpoint.begin(tmp_path, 4)
    (p / "model.bin").write_text("half")  # killed here: no marker, still .partial
    assert checkpoint.latest_complete(tmp_path) == (2, checkpoint.step_dir(tmp_path, 2))
    checkpoint.begin(tmp_path, 6)  # the next save clears the leftover
    assert not checkpoint.partial_dir(tmp_path, 4).exists()
    checkpoint.commit(tmp_path, 6, {"step": 6})
    assert checkpoint.latest_complete(tmp_path)[0] == 6
    assert json.loads((checkpoint.step_dir(tmp_path, 6) / "trainer_state.json").read_text()) == {"step": 6}


def test_checkpoint_keeps_the_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.begin(tmp_path, step)
        checkpoint.commit(tmp_path, step, {}, keep_last=2)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["step_000003", "step_000004"]
