"""tools/plot_run.py and tools/compare_methods.py on small run directories written here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from pipeline.config import Config, load

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import compare_methods  # noqa: E402
import plot_run  # noqa: E402


def fake_run(path: Path, decay: float, method: str = "ppo", selected: float | None = None) -> Path:
    """metrics.jsonl of 30 steps: entropy exp(-decay * step), evals every 5 steps on the law."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"loss": {"method": method}}))
    rows = [{"step": 0, "time": 1000.0, "eval/acc": 0.3, "eval/pass@4": 0.6, "eval/reward": 0.3,
             "eval/entropy": 1.0}]  # fmt: skip
    for s in range(1, 31):
        h = math.exp(-decay * s)
        row = {"step": s, "time": 1000.0 + 6 * s, "entropy/mean": h, "reward/acc_generated": 0.3 + 0.01 * s,
               "reward/acc": 0.5, "entropy_dynamics/predicted_change": -0.1 * h,
               "entropy_dynamics/measured_change": -0.09 * h,
               "entropy_dynamics/pred_vs_measured_corr": 0.9 if s > 2 else "nan"}  # fmt: skip
        if selected is not None:
            row |= {f"actor/{method}/selected": selected, "actor/n_tokens": 250.0}
        rows.append(row)
        if s % 5 == 0:
            rows.append({"step": s, "eval/acc": 0.3 + 0.01 * s, "eval/pass@4": 0.7, "eval/entropy": h,
                         "eval/reward": -0.4 * math.exp(h) + 1.4, "entropy_law/a": 0.4,
                         "entropy_law/b": 1.4, "entropy_law/r2": 1.0})  # fmt: skip
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_run_writes_the_three_pngs(tmp_path):
    run = fake_run(tmp_path / "run", 0.05)
    paths = plot_run.plot_runs([run])
    assert [p.name for p in paths] == ["curves.png", "reward_vs_entropy.png", "entropy_change.png"]
    for p in paths:
        assert (
            p.parent == run / "plots"
            and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            and p.stat().st_size > 5000
        )


def test_plot_run_overlays_several_runs_and_refuses_a_non_run(tmp_path):
    runs = [fake_run(tmp_path / "a", 0.01), fake_run(tmp_path / "b", 0.1)]
    assert all(p.exists() for p in plot_run.plot_runs(runs, tmp_path / "out"))
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot_run.plot_runs([tmp_path])


def test_plot_run_draws_the_seeds_of_a_method_as_mean_and_band(tmp_path):
    assert plot_run.group_name("kl_cov_share_s12") == "kl_cov_share" and plot_run.group_name("grpo") == "grpo"
    groups = {"m": [plot_run.merged(fake_run(tmp_path / f"m_s{i}", d)) for i, d in enumerate((0.1, 0.2))]}
    ((name, steps, mean, lo, hi),) = plot_run.band(groups, "entropy/mean")
    assert name == "m" and steps == list(range(1, 31))
    assert mean[0] == pytest.approx((math.exp(-0.1) + math.exp(-0.2)) / 2)
    assert (lo[0], hi[0]) == (pytest.approx(math.exp(-0.2)), pytest.approx(math.exp(-0.1)))
    paths = plot_run.plot_runs(
        [tmp_path / "m_s0", tmp_path / "m_s1", fake_run(tmp_path / "g", 0.01)], tmp_path / "o"
    )
    assert all(p.stat().st_size > 5000 for p in paths)


def test_steps_to_half_uses_the_first_five_steps_and_a_three_step_mean():
    # exp(-0.1 s): first-5 mean 0.74825, half 0.37412; the 3-step mean over s = 9, 10, 11 is
    # exp(-0.9) * (1 + e^-0.1 + e^-0.2) / 3 = 0.36849 (s = 8..10: 0.40725), so step 11
    steps = list(range(1, 31))
    assert compare_methods.steps_to_half(steps, [math.exp(-0.1 * s) for s in steps]) == 11
    assert compare_methods.steps_to_half(steps, [math.exp(-0.005 * s) for s in steps]) is None
    assert compare_methods.steps_to_half(steps[:7], [1.0, 1, 1, 1, 1, 0, 0]) is None  # too short


def test_compare_summary_reads_the_last_evaluation_the_law_and_the_selection(tmp_path):
    fast = compare_methods.summarize("fast", fake_run(tmp_path / "fast", 0.1, "kl_cov", selected=5.0))
    assert fast["steps_to_half"] == 11 and fast["minutes"] == pytest.approx(3.0)
    assert (fast["acc_start"], fast["acc_end"]) == (0.3, pytest.approx(0.6))
    assert (fast["pass_start"], fast["pass_end"], fast["pass_k"]) == (0.6, 0.7, 4)
    assert fast["entropy_start"] == pytest.approx(0.74825, abs=1e-5)
    assert fast["entropy_min"] == pytest.approx(math.exp(-3.0))
    assert (fast["law_a"], fast["law_b"], fast["law_r2"], fast["pred_vs_measured_corr"]) == (
        0.4,
        1.4,
        1.0,
        0.9,
    )
    assert fast["selected_per_minibatch"] == 5.0 and fast["selected_share"] == pytest.approx(0.02)
    assert "selected_share" not in compare_methods.summarize("g", fake_run(tmp_path / "g", 0.1))


def test_compare_aggregates_seeds_as_mean_and_spread(tmp_path):
    runs = [
        compare_methods.summarize("m", fake_run(tmp_path / f"m_s{i}", d))
        for i, d in enumerate((0.1, 0.2, 0.005))
    ]
    agg = compare_methods.aggregate("m", runs)
    assert agg["seeds"] == 3 and agg["steps_to_half_reached"] == 2
    assert agg["steps_to_half"] == pytest.approx((11 + runs[1]["steps_to_half"]) / 2)
    ends = [r["entropy_end"] for r in runs]
    assert agg["entropy_end"] == pytest.approx(sum(ends) / 3)
    mean = sum(ends) / 3
    assert agg["entropy_end_sd"] == pytest.approx(math.sqrt(sum((e - mean) ** 2 for e in ends) / 2))
    one = compare_methods.aggregate("g", [compare_methods.summarize("g", fake_run(tmp_path / "g", 0.1))])
    text = compare_methods.table([agg, one])
    head, _, row_m, row_g = text.splitlines()[:4]
    assert "| pass@4 start | pass@4 end |" in head  # k, not the seeds' mean 4.0
    assert row_m.startswith("| m | 3 |") and " ± " in row_m and "(2/3)" in row_m
    assert row_g.startswith("| g | 1 |") and " ± " not in row_g and "| 11 |" in row_g


# The dual clip c (loss.clip_ratio_c) of each method's reference recipe: 10 in the DAPO-family and
# Entropy-Mechanism scripts (GRPO baseline, Clip-Higher, 80/20, Archer; the entropy-shaped advantage
# sits on the GRPO baseline), none in Skywork-OR1; CISPO, Clip-Cov and KL-Cov losses have no dual clip.
REFERENCE_DUAL_CLIP = {
    "grpo": 10.0,
    "clip_higher": 10.0,
    "clip_cov": None,
    "clip_cov_share": None,
    "kl_cov": None,
    "kl_cov_share": None,
    "adaptive_entropy": None,
    "top20_entropy": 10.0,
    "cispo": None,
    "entropy_adv": 10.0,
    "archer": 10.0,
}


@pytest.mark.parametrize("recipe", ["collapse_cpu.yaml", "demo_cpu.yaml"])
def test_each_preset_sets_its_references_dual_clip_whatever_the_recipe_says(recipe):
    assert set(REFERENCE_DUAL_CLIP) == set(compare_methods.METHODS)
    for base_c in ("3.0", "null"):  # a recipe with verl's default c = 3, and one without dual clip
        for method, overrides in compare_methods.METHODS.items():
            cfg = load(Config, REPO / "configs" / recipe, [f"loss.clip_ratio_c={base_c}", *overrides])
            assert cfg.loss.clip_ratio_c == REFERENCE_DUAL_CLIP[method], (recipe, base_c, method)


def test_presets_keep_the_papers_settings():
    cfg = {
        m: load(Config, REPO / "configs" / "collapse_cpu.yaml", o).loss
        for m, o in compare_methods.METHODS.items()
    }
    assert (cfg["grpo"].clip_ratio_low, cfg["grpo"].clip_ratio_high) == (0.2, 0.2)
    assert cfg["clip_higher"].clip_ratio_high == 0.28 and cfg["top20_entropy"].top_entropy_ratio == 0.2
    assert (
        cfg["clip_cov"].clip_ratio_low,
        cfg["clip_cov"].clip_ratio_high,
        cfg["clip_cov"].clip_cov_ratio,
    ) == (1, 1, 2e-4)
    assert (cfg["kl_cov"].kl_cov_ratio, cfg["kl_cov"].kl_cov_coef) == (2e-3, 1.0)
    assert cfg["clip_cov_share"].clip_cov_ratio > cfg["clip_cov"].clip_cov_ratio
    assert cfg["kl_cov_share"].kl_cov_ratio > cfg["kl_cov"].kl_cov_ratio
    assert set(compare_methods.SEEDED) >= {"grpo", "clip_higher", "clip_cov", "kl_cov"}


def test_training_law_fits_block_means_of_training_accuracy_against_entropy():
    h = [1.0 - 0.1 * (s // 10) for s in range(50)]  # five blocks of constant entropy
    acc = [1.4 - 0.4 * math.exp(x) for x in h]
    fit = compare_methods.training_law(h, acc)
    assert (fit["a"], fit["b"], fit["r2"], fit["n"]) == (
        pytest.approx(0.4),
        pytest.approx(1.4),
        pytest.approx(1.0),
        5,
    )
    assert compare_methods.training_law(h[:25], acc[:25]) is None  # two blocks: nothing to fit


def test_seeded_chooses_which_methods_run_every_seed(tmp_path, monkeypatch):
    ran = []

    def fake_run(config, method, seed, out, steps, extra, retries):
        ran.append((method, seed))
        return tmp_path / f"{method}_s{seed}"

    monkeypatch.setattr(compare_methods, "run_method", fake_run)
    monkeypatch.setattr(compare_methods, "summarize", lambda m, d: {"method": m})
    monkeypatch.setattr(compare_methods, "aggregate", lambda m, runs: {"method": m, "seeds": len(runs)})
    monkeypatch.setattr(compare_methods, "table", lambda results: "table")
    monkeypatch.setattr(compare_methods, "plot_runs", lambda dirs, out: [])
    args = ["--out", str(tmp_path), "--methods", "grpo,clip_cov_share,cispo", "--seeds", "0,1"]
    assert compare_methods.main([*args, "--seeded", "grpo"]) == 0
    # every method's first seed first, then the later seeds of the --seeded ones only
    assert ran == [("grpo", 0), ("clip_cov_share", 0), ("cispo", 0), ("grpo", 1)]
    ran.clear()
    assert compare_methods.main(args) == 0  # default: SEEDED, which holds clip_cov_share
    assert ran == [("grpo", 0), ("clip_cov_share", 0), ("cispo", 0), ("grpo", 1), ("clip_cov_share", 1)]
