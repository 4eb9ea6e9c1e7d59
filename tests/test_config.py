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
        (["trainer.sync_bucket_mb=64"], "trainer.sync_bucket_mb was replaced by rollout.bucket_bytes"),
        (
            ["rollout.verify_tolerance=1e-3"],
            "rollout.verify_tolerance was replaced by trainer.sync_tolerance",
        ),
    ],
)
def test_bad_combinations_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(Config, REPO / "configs" / "demo_cpu.yaml", overrides).check_job()


# ---------------------------------------------------------------------- loader rules (issue 16 item 6)


def _numeric_fields(cls=Config, prefix=""):
    """Every int/float field of the tree (Optional ones too), as dotted names."""
    import dataclasses
    import types
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if int in options or float in options:
            yield prefix + f.name


NUMERIC = sorted(_numeric_fields())


def test_every_section_has_numeric_fields_to_check():
    sections = {n.split(".")[0] for n in NUMERIC}
    assert {
        "trainer",
        "data",
        "reward",
        "rollout",
        "actor",
        "loss",
        "advantage",
        "entropy_control",
    } <= sections


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf", "-inf", "1e999"])
def test_non_finite_numbers_are_refused_for_every_numeric_field(value):
    for name in NUMERIC:
        with pytest.raises(ConfigError, match=f"^<overrides>: {name}: "):
            load(Config, None, [f"{name}={value}"])


def test_non_finite_numbers_in_a_recipe_are_refused_naming_the_file_and_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss:\n  clip_ratio_low: .nan\n")
    with pytest.raises(
        ConfigError, match=r"r\.yaml: loss\.clip_ratio_low: got nan; expected a finite number"
    ):
        load(Config, recipe)


def test_an_override_that_is_not_yaml_is_a_literal_string(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.steps: expected an integer, got '\[1'"):
        load(Config, None, ["trainer.steps=[1"])
    with pytest.raises(ConfigError, match=r"data\.train_files: '\[a\.jsonl' is not a valid list"):
        load(Config, None, ["data.train_files=[a.jsonl"])
    assert load(Config, None, ["data.system_prompt=Answer: [x"]).data.system_prompt == "Answer: [x"


def test_duplicate_keys_are_refused_with_the_key_and_both_lines(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("actor:\n  lr: 1.0e-6\n  tp: 1\n  lr: 2.0e-4\nloss:\n  method: ppo\n")
    with pytest.raises(
        ConfigError, match=r"dup\.yaml: not valid YAML: line 4: duplicate key 'lr' \(first on line 2\)"
    ):
        load(Config, recipe)
    recipe.write_text("actor: {tp: 1}\nactor: {tp: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'actor'"):
        load(Config, recipe)


def test_config_that_is_a_directory_or_not_utf8_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a file; pass a YAML recipe"):
        load(Config, tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("data:\n  system_prompt: r\xe9ponds\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset 24\)"):
        load(Config, latin1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "{tmp}"], "is not a file"),
        (["--config", "{tmp}/latin1.yaml"], "not UTF-8 text"),
        (["--config", "{tmp}/dup.yaml"], "duplicate key 'steps'"),
        (["--config", "configs/demo_cpu.yaml", "trainer.steps=[1"], "trainer.steps: expected an integer"),
        (["--config", "configs/demo_cpu.yaml", "trainer.steps=nan"], "trainer.steps: expected an integer"),
        (["--config", "configs/demo_cpu.yaml", "loss.clip_ratio_low=nan"], "loss.clip_ratio_low: got nan"),
    ],
)
def test_train_cli_prints_one_line_and_exits_2_for_bad_config(tmp_path, capsys, monkeypatch, args, message):
    from pipeline.__main__ import main

    monkeypatch.chdir(REPO)
    (tmp_path / "latin1.yaml").write_bytes(b"trainer:\n  seed: \xff\n")
    (tmp_path / "dup.yaml").write_text("trainer:\n  steps: 1\n  steps: 2\n")
    assert main(["train", *(a.replace("{tmp}", str(tmp_path)) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("configuration error: "), err
