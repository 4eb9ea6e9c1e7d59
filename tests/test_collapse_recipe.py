"""configs/collapse_cpu.yaml: the recipe is plain GRPO on the Countdown model, and a short version of
it (a small model made on the first run, three steps) runs end to end and logs what
tools/compare_methods.py reads, so that the recipe behind docs/results.md cannot silently break.
"""

from __future__ import annotations

import sys

import pytest

from pipeline.config import Config, load
from tests.demo import REPO, metrics, train

COLLAPSE = REPO / "configs" / "collapse_cpu.yaml"
SMALL_MODEL = "[--task,countdown,--hidden,32,--layers,2,--max-steps,40,--n-train-prompts,64,--n-eval-prompts,16,--min-acc,-1]"


def test_the_recipe_is_grpo_with_a_symmetric_clip_and_no_entropy_terms():
    cfg = load(Config, COLLAPSE)
    loss = cfg.loss
    assert (loss.method, loss.clip_ratio_low, loss.clip_ratio_high, loss.loss_agg_mode) == (
        "ppo",
        0.2,
        0.2,
        "token-mean",
    )
    assert loss.entropy_coef == 0 and loss.kl_coef == 0 and loss.top_entropy_ratio == 1.0
    assert not loss.adv_entropy_shaping and not cfg.entropy_control.enabled
    assert (
        cfg.advantage.estimator == "grpo" and cfg.reward.fn == "pipeline.rewards.countdown:countdown_reward"
    )
    assert cfg.trainer.make_tiny_model_args[:2] == ["--task", "countdown"]
    assert cfg.trainer.mini_batches_per_step > 1  # off-policy updates: the clip and KL-Cov act


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_short_collapse_run_makes_its_model_and_logs_what_the_comparison_reads(tmp_path):
    model = tmp_path / "countdown"
    run_dir = tmp_path / "run"
    code, out = train(
        COLLAPSE,
        run_dir,
        f"trainer.make_tiny_model_dir={model}",
        f"trainer.make_tiny_model_args={SMALL_MODEL}",
        f"actor.model_path={model}/model",
        f"data.train_files=[{model}/train.jsonl]",
        f"data.eval_files=[{model}/eval.jsonl]",
        "trainer.steps=3",
        "trainer.prompts_per_step=8",
        "trainer.dynamic_sampling=false",  # a 40-step warm-up answers almost nothing right
        "trainer.eval_every=3",
        "trainer.eval_prompts=8",
        "trainer.checkpoint_every=0",
    )
    assert code == 0, out[-5000:]
    assert "making the tiny model" in out and (model / "model" / "tokenizer.json").exists()
    m = metrics(run_dir)
    assert sorted(m) == [0, 1, 2, 3]
    for step in (1, 2, 3):
        row = m[step]
        assert row["actor/skipped_nonfinite"] == 0 and row["sync/version"] == step
        assert row["entropy/mean"] > 0.0 and 0.0 <= row["reward/acc_generated"] <= 1.0
        assert row["actor/n_tokens"] > 0 and "entropy_dynamics/cov_mean" in row
    assert {"eval/acc", "eval/pass@8", "eval/entropy"} <= set(m[3]) and "eval/acc" in m[0]

    sys.path.insert(0, str(REPO / "tools"))
    import compare_methods

    summary = compare_methods.summarize("grpo", run_dir)
    assert summary["steps"] == 3 and summary["pass_k"] == 8 and summary["entropy_start"] > 0
