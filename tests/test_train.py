"""`python -m pipeline train` end to end on the CPU demo: Ray, Megatron TP=2 over gloo, the engine.

Every run here is the real command line in its own process group (tests/demo.py), on the demo's
model and a copy of its prompts with bad rows added. Base: 4 steps of 8 prompts x 4 samples in two
mini-batches, an evaluation and a checkpoint every 2 steps; the fault-injection hook (tests/faults.py)
makes the loss NaN in mini-batch 0 of step 2 and in both mini-batches of step 3.
"""

from __future__ import annotations

import json
import math
import time

import pytest

from pipeline import checkpoint
from tests.demo import DEMO, REPO, Run, deterministic, ensure_demo_model, metrics, train, train_command
from tests.faults import ENV as FAULT_ENV
from tests.rollout.sglang_support import SERVER_PYTHON, needs_sglang

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

BAD_ROWS = [
    '{"prompt": "1+2=?"}',  # no ground truth
    "{not json",
    json.dumps({"prompt": "9" * 200 + "+1=?", "answer": "1"}),  # longer than max_prompt_tokens
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tiny = ensure_demo_model()
    d = tmp_path_factory.mktemp("data")
    rows = (tiny / "train.jsonl").read_text().splitlines()[:300]
    (d / "train.jsonl").write_text("\n".join(rows[:5] + BAD_ROWS + rows[5:]) + "\n")
    return d / "train.jsonl"


FAULTS = {FAULT_ENV: "2:0,3"}  # NaN loss: mini-batch 0 of step 2, all of step 3


def base(data, *extra: str) -> list[str]:
    return [
        f"data.train_files=[{data}]",
        *("trainer.steps=4", "trainer.prompts_per_step=8", "trainer.samples_per_prompt=4"),
        *("trainer.mini_batches_per_step=2", "trainer.hooks=[tests.faults:nan_loss]"),
        *("trainer.eval_every=2", "trainer.eval_prompts=16", "trainer.eval_samples=2"),
        *("trainer.checkpoint_every=2", "trainer.max_nan_steps=2"),
        *extra,
    ]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted reference run: (run_dir, output)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    code, out = train(DEMO, run_dir, *base(data), env=FAULTS)
    assert code == 0, out[-5000:]
    return run_dir, out


def test_demo_run_logs_every_metric_skips_the_nan_step_and_checkpoints(straight, data):
    run_dir, out = straight
    m = metrics(run_dir)
    assert sorted(m) == [0, 1, 2, 3, 4]
    # bad dataset rows: counted, named by file and line, skipped
    assert m[0]["data/skipped_rows"] == 3 and m[0]["data/prompts"] == 300
    for line, reason in ((6, "missing field"), (7, "invalid JSON"), (8, "prompt too long")):
        assert f"{data}:{line}: {reason}" in out
    for step in (1, 2, 4):
        row = m[step]
        assert 0.0 <= row["reward/acc"] <= 1.0 and row["reward/format"] > 0.5
        loss_metrics = {k: v for k, v in row.items() if k.startswith("actor/")}
        assert {"actor/loss", "actor/pg_loss", "actor/pg_clipfrac", "actor/grad_norm", "actor/lr"} <= set(
            loss_metrics
        )
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in loss_metrics.values()), (
            loss_metrics
        )
        assert row["sync/version"] == step and row["sync/probe_max_abs_diff"] < 1e-4
        assert row["rollout/stale_samples"] == 0 and row["mismatch/logprob_mean_abs"] < 1e-4
        assert {"entropy/mean", "entropy/p10", "entropy/p50", "entropy/p90"} <= set(row)
        assert {"time/rollout", "time/old_log_prob", "time/update", "time/weight_sync"} <= set(row)
        assert {"entropy_dynamics/cov_mean", "entropy_dynamics/predicted_change"} <= set(row)
        assert row["entropy_dynamics/measured_change"] != 0  # the weights moved
        assert (
            0.9 < row["perf/padding_efficiency"] <= 1.0 and row["perf/micro_batches_per_rank"] >= 1
        )  # rows pad
        assert row["perf/actor_tokens_per_s"] > 0 and row["perf/max_tokens_per_rank"] > 100
    assert m[1]["actor/skipped_nonfinite"] == 0 and m[4]["actor/skipped_nonfinite"] == 0
    # step 2: mini-batch 0 skipped, mini-batch 1 applied -> the engines get that update (version 2),
    # and step 3's rollout comes from it: its log-probs are the actor's (a missed sync would show here)
    assert m[2]["actor/skipped_mini_batches"] == 1 and m[2]["actor/update_successful"] == 0.5
    assert m[3]["rollout/stale_samples"] == 0 and m[3]["mismatch/logprob_max_abs"] < 1e-4
    # step 3: both skipped: no update, no weight sync, and the run went on
    assert m[3]["actor/skipped_nonfinite"] == 1 and m[3]["actor/nonfinite"] == 1
    assert (
        m[3]["actor/skipped_mini_batches"] == 2 and "sync/version" not in m[3] and m[3]["actor/loss"] == "nan"
    )
    assert "non-finite loss or gradient, update skipped" in out
    for step in (0, 2, 4):
        assert 0.0 <= m[step]["eval/acc"] <= m[step]["eval/pass@2"] <= 1.0
    assert checkpoint.latest_complete(run_dir / "checkpoints")[0] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "config.json").read_text())["actor"]["tp"] == 2


def test_a_resumed_run_continues_identically(straight, data, tmp_path):
    reference = metrics(straight[0])
    run_dir = tmp_path / "run"
    code, out = train(DEMO, run_dir, *base(data, "trainer.steps=2"), env=FAULTS)
    assert code == 0, out[-5000:]
    code, out = train(DEMO, run_dir, *base(data), env=FAULTS)
    assert code == 0, out[-5000:]
    assert "resumed from" in out and "(step 2)" in out
    resumed = metrics(run_dir)
    assert sorted(resumed) == [0, 1, 2, 3, 4]  # no step logged twice, none missing
    for step in range(5):
        assert deterministic(resumed[step]) == deterministic(reference[step]), step


def test_killed_mid_checkpoint_resumes_from_the_last_complete_one(straight, data, tmp_path):
    """SIGKILL the whole job while step 3's checkpoint is being written; the rerun ignores it."""
    run_dir = tmp_path / "run"
    cmd = train_command(DEMO, run_dir, *base(data, "trainer.checkpoint_every=1"))
    run = Run(cmd, tmp_path / "killed.log", FAULTS)
    partial = checkpoint.partial_dir(run_dir / "checkpoints", 3)
    deadline = time.time() + 600
    while not partial.exists():
        assert run.proc.poll() is None, run.output[-5000:]
        assert time.time() < deadline, "step 3's checkpoint never started"
        time.sleep(0.02)
    run.stop()  # the driver, its Ray daemons and the Megatron ranks, at once
    assert partial.exists() and checkpoint.latest_complete(run_dir / "checkpoints")[0] == 2

    code, out = train(DEMO, run_dir, *base(data, "trainer.checkpoint_every=1"), env=FAULTS)
    assert code == 0, out[-5000:]
    assert "(step 2)" in out and not partial.exists()
    final = metrics(run_dir)
    reference = metrics(straight[0])
    assert sorted(final) == [0, 1, 2, 3, 4]
    for step in range(5):  # nothing lost or changed by the kill
        assert deterministic(final[step]) == deterministic(reference[step]), step


def test_repeated_nan_steps_stop_the_run_with_a_clear_message(data, tmp_path):
    run_dir = tmp_path / "run"
    code, out = train(
        DEMO, run_dir, *base(data, "trainer.max_nan_steps=1", "trainer.eval_every=0"), env={FAULT_ENV: "1,2"}
    )
    assert code == 1, out[-3000:]
    assert "2 steps in a row with a non-finite loss or gradient (trainer.max_nan_steps=1)" in out
    assert checkpoint.latest_complete(run_dir / "checkpoints") is None


def test_the_first_step_is_the_same_under_any_token_budget(data, tmp_path):
    """`actor.max_tokens_per_micro_batch=N` for two N >= the longest sample: other micro-batches,
    the same step (the same samples, losses, gradients and weights, to float rounding)."""
    rows = {}
    for n in (100, 5000):
        run_dir = tmp_path / f"budget{n}"
        code, out = train(
            DEMO, run_dir, f"data.train_files=[{data}]", f"actor.max_tokens_per_micro_batch={n}",
            *("trainer.steps=1", "trainer.prompts_per_step=8", "trainer.samples_per_prompt=4"),
            *("trainer.eval_every=0", "trainer.checkpoint_every=0"),
        )  # fmt: skip
        assert code == 0, out[-5000:]
        rows[n] = deterministic(metrics(run_dir)[1])
    small, large = rows[100], rows[5000]
    assert small["perf/micro_batches_per_rank"] > large["perf/micro_batches_per_rank"] == 1
    assert set(small) == set(large)
    # Float rounding differs with the packing (<= 1e-6 on a log-prob): the probe's engine-vs-actor
    # difference is itself at that level, and the entropy share of the top fifth of tokens may move a
    # token at the threshold from one side to the other; everything else agrees to 1e-5.
    loose = {
        "sync/probe_max_abs_diff": dict(abs_tol=1e-5),
        "entropy_dynamics/high_entropy_share": dict(rel_tol=1e-3),
    }
    for key, value in small.items():
        if isinstance(value, str):  # "nan" (e.g. a correlation of fewer than 3 points)
            assert value == large[key], key
        elif not key.startswith("perf/"):
            tol = loose.get(key, dict(rel_tol=1e-5, abs_tol=1e-6))
            assert math.isclose(value, large[key], **tol), (key, value, large[key])


def test_a_budget_smaller_than_the_longest_prompt_is_refused_before_anything_starts(data, tmp_path):
    code, out = train(
        DEMO, tmp_path / "run", f"data.train_files=[{data}]", "actor.max_tokens_per_micro_batch=8"
    )
    assert code == 2 and "Traceback" not in out, out[-3000:]
    assert "configuration error: actor.max_tokens_per_micro_batch=8 cannot hold the longest prompt" in out
    assert "Started a local Ray instance" not in out  # refused before any process started


@needs_sglang
def test_the_sglang_recipe_trains_against_a_real_server(data, tmp_path):
    """configs/demo_cpu_sglang.yaml: rollout on SGLang 0.5.23 (CPU), weights broadcast over gloo."""
    run_dir = tmp_path / "run"
    code, out = train(
        REPO / "configs" / "demo_cpu_sglang.yaml",
        run_dir,
        *base(data, "trainer.steps=2", "trainer.eval_every=0", "trainer.checkpoint_every=0"),
        "trainer.hooks=[]",
        f"rollout.python={SERVER_PYTHON}",
        timeout=900,
    )
    assert code == 0, out[-5000:]
    m = metrics(run_dir)
    for step in (1, 2):
        assert m[step]["sync/version"] == step and m[step]["sync/probe_max_abs_diff"] < 1e-4
        assert m[step]["mismatch/logprob_max_abs"] < 1e-3  # SGLang's sampled log-probs vs Megatron's
        assert 0.0 <= m[step]["reward/acc"] <= 1.0 and math.isfinite(m[step]["actor/loss"])
        assert m[step]["rollout/tokens_per_s"] > 0 and m[step]["rollout/retries"] == 0
