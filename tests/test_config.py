"""The root config tree: every recipe in configs/ loads and validates; cross-section errors are clear."""

from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert {"demo_cpu.yaml", "demo_cpu_sglang.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(recipe):
    cfg = load(Config, recipe)
    cfg.check_job()
    assert cfg.actor.model_path and cfg.rollout.model_path
    assert cfg.trainer.world_size % (cfg.actor.tp * cfg.actor.pp) == 0


def test_the_rollout_engines_default_to_the_actors_model():
    cfg = load(Config, REPO / "configs" / "demo_cpu.yaml", ["actor.model_path=/m"])
    assert cfg.rollout.model_path == "/m"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["actor.model_path="], "actor.model_path: set the Hugging Face model directory"),
        (["data.train_files=[]"], "data.train_files: list at least one"),
        (
            ["trainer.prompts_per_step=1", "trainer.samples_per_prompt=1", "actor.tp=1"],
            "cannot give each of the 2 data-parallel ranks a sample",
        ),
        (["actor.max_tokens_per_micro_batch=1"], "actor.max_tokens_per_micro_batch=1: must be >= 2"),
        (["trainer.world_size=3"], "trainer.world_size=3 must be a multiple of actor.tp x actor.pp = 2"),
        (["rollout.engine=vllm"], "rollout.engine='vllm': one of"),
        (["rollout.engine=sglang", "actor.temperature=0.7"], "teacher-forced log-probs"),
        (["trainer.stepz=3"], "unknown field(s) trainer.stepz"),
    ],
)
def test_bad_combinations_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(Config, REPO / "configs" / "demo_cpu.yaml", overrides).check_job()
