"""Checkpoint directories: complete or ignored, checked before a resume uses them, walked back past
a bad one (which is never deleted), pruned without losing the only loadable one.

The actor part of each checkpoint is a real megatron-core torch_dist checkpoint (two processes,
each saving its half of a sharded tensor, a sharded object and common state), made once per module.
"""

import json
import shutil

import pytest

from pipeline import checkpoint
from tests.distributed import run_distributed


def _save_dist_checkpoint(rank, world_size, path):
    import torch

    import megatron_patches

    megatron_patches.apply(megatron_patches.CPU_PATCHES)
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    weight = torch.arange(4096.0).view(64, 64)[rank * 32 : (rank + 1) * 32]
    state = {
        "weight": ShardedTensor.from_rank_offsets("weight", weight, (0, rank, world_size), replica_id=0),
        "rng": ShardedObject("rng", {"rank": rank}, (world_size,), (rank,), replica_id=0),
        "extra": {"step_count": 3},
    }
    dist_checkpointing.save(state, path)


@pytest.fixture(scope="module")
def actor_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("actor") / "actor"
    path.mkdir()
    run_distributed(_save_dist_checkpoint, 2, str(path))
    return path


def save(root, step, template, keep_last=0):
    """What pipeline.step.save does, with the template as the actor's part."""
    p = checkpoint.begin(root, step)
    shutil.copytree(template, p / checkpoint.ACTOR_DIR)
    return checkpoint.commit(root, step, {"step": step}, keep_last=keep_last)


def shards(path):
    return sorted((path / checkpoint.ACTOR_DIR).glob("*.distcp"))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_file_names_are_megatron_cores():
    from megatron.core.dist_checkpointing.core import CONFIG_FNAME
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    assert (checkpoint.DIST_CONFIG, checkpoint.DIST_COMMON) == (CONFIG_FNAME, COMMON_STATE_FNAME)


@pytest.mark.multiproc  # the megatron-core checkpoint is saved by 2 gloo ranks
def test_a_complete_checkpoint_passes(actor_template, tmp_path):
    path = save(tmp_path, 2, actor_template)
    assert checkpoint.problem(path) is None
    assert len(shards(path)) == 2  # one file per rank, checked one by one
    assert checkpoint.latest_loadable(tmp_path) == ((2, path), [])


BREAKAGES = {
    "truncated trainer_state.json": (
        lambda p: truncate(p / "trainer_state.json"),
        "trainer_state.json: not valid JSON",
    ),
    "truncated .distcp shard": (lambda p: truncate(shards(p)[-1]), "__1_0.distcp is truncated: "),
    "only COMPLETE": (
        lambda p: [shutil.rmtree(p / checkpoint.ACTOR_DIR), (p / "trainer_state.json").unlink()],
        "trainer_state.json is missing",
    ),
    "no actor part": (lambda p: shutil.rmtree(p / checkpoint.ACTOR_DIR), "actor/ is missing"),
    "missing shard": (lambda p: shards(p)[0].unlink(), "actor/__0_0.distcp is missing"),
    "unfinished index": (lambda p: (p / "actor" / ".metadata").unlink(), ".metadata is missing"),
    "truncated index": (lambda p: truncate(p / "actor" / ".metadata"), "actor/.metadata: unreadable"),
    "truncated common state": (lambda p: truncate(p / "actor" / "common.pt"), "common.pt: unreadable"),
    "trainer state of another step": (
        lambda p: (p / "trainer_state.json").write_text('{"step": 7}'),
        "expected a mapping with step 4",
    ),
}


@pytest.mark.multiproc  # the megatron-core checkpoint is saved by 2 gloo ranks
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_resume_walks_back_past_a_bad_newest_checkpoint_and_keeps_it(breakage, actor_template, tmp_path):
    good = save(tmp_path, 2, actor_template)
    bad = save(tmp_path, 4, actor_template)
    damage, reason = BREAKAGES[breakage]
    damage(bad)
    before = {p.relative_to(bad): p.read_bytes() for p in bad.rglob("*") if p.is_file()}
    assert checkpoint.latest_complete(tmp_path) == (4, bad)  # the marker alone would pick it

    found, skipped = checkpoint.latest_loadable(tmp_path)
    assert found == (2, good)
    assert [p for p, _ in skipped] == [bad] and reason in skipped[0][1], skipped
    line = checkpoint.describe_skipped(skipped)
    assert line.startswith("step_000004 (") and reason in line and "\n" not in line
    after = {p.relative_to(bad): p.read_bytes() for p in bad.rglob("*") if p.is_file()}
    assert after == before  # looked at, not touched


@pytest.mark.multiproc  # the megatron-core checkpoint is saved by 2 gloo ranks
def test_a_save_over_a_skipped_checkpoint_moves_it_aside(actor_template, tmp_path):
    save(tmp_path, 2, actor_template)
    bad = save(tmp_path, 4, actor_template)
    truncate(shards(bad)[0])
    broken = shards(bad)[0].read_bytes()
    # the resumed run reaches step 4 again and saves
    new = save(tmp_path, 4, actor_template, keep_last=2)
    assert checkpoint.problem(new) is None
    aside = tmp_path / "step_000004.bad"
    assert (aside / checkpoint.ACTOR_DIR / shards(new)[0].name).read_bytes() == broken
    assert checkpoint.latest_loadable(tmp_path) == ((4, new), [])
    bad = save(tmp_path, 6, actor_template)
    truncate(shards(bad)[0])
    save(tmp_path, 6, actor_template)
    assert (tmp_path / "step_000006.bad").is_dir()
    bad = save(tmp_path, 6, actor_template)  # a second bad one at the same step gets its own name
    (bad / "trainer_state.json").write_text("{")
    save(tmp_path, 6, actor_template)
    assert (tmp_path / "step_000006.bad.1").is_dir()


@pytest.mark.multiproc  # the megatron-core checkpoint is saved by 2 gloo ranks
def test_keep_last_never_deletes_the_only_loadable_checkpoint(actor_template, tmp_path):
    save(tmp_path, 1, actor_template, keep_last=1)
    for step in (2, 3):  # saves that went wrong without an error (a disk that filled up)
        p = checkpoint.begin(tmp_path, step)
        shutil.copytree(actor_template, p / checkpoint.ACTOR_DIR)
        truncate(sorted((p / checkpoint.ACTOR_DIR).glob("*.distcp"))[0])
        checkpoint.commit(tmp_path, step, {"step": step}, keep_last=1)
    assert checkpoint.latest_loadable(tmp_path)[0] == (1, checkpoint.step_dir(tmp_path, 1))
    assert len(checkpoint.complete(tmp_path)) == 3
    # a good save again: what is older than it goes, good or bad
    save(tmp_path, 4, actor_template, keep_last=1)
    assert [s for s, _ in checkpoint.complete(tmp_path)] == [4]


@pytest.mark.multiproc  # the megatron-core checkpoint is saved by 2 gloo ranks
def test_checkpoint_keeps_the_last_k(actor_template, tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, actor_template, keep_last=2)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["step_000003", "step_000004"]
    save(tmp_path, 5, actor_template, keep_last=0)  # 0 keeps all
    assert len(checkpoint.complete(tmp_path)) == 3


@pytest.mark.multiproc  # the megatron-core checkpoint is saved by 2 gloo ranks
def test_checkpoint_interrupted_mid_write_is_never_used(actor_template, tmp_path):
    save(tmp_path, 2, actor_template)
    p = checkpoint.begin(tmp_path, 4)
    (p / "model.bin").write_text("half")  # killed here: no marker, still .partial
    assert checkpoint.latest_complete(tmp_path) == (2, checkpoint.step_dir(tmp_path, 2))
    assert checkpoint.latest_loadable(tmp_path) == ((2, checkpoint.step_dir(tmp_path, 2)), [])
    checkpoint.begin(tmp_path, 6)  # the next save clears the leftover
    assert not checkpoint.partial_dir(tmp_path, 4).exists()
    shutil.copytree(actor_template, checkpoint.partial_dir(tmp_path, 6) / checkpoint.ACTOR_DIR)
    checkpoint.commit(tmp_path, 6, {"step": 6})
    assert checkpoint.latest_complete(tmp_path)[0] == 6
    assert json.loads((checkpoint.step_dir(tmp_path, 6) / "trainer_state.json").read_text()) == {"step": 6}


# ---- the run's config on resume ------------------------------------------------------------------
def _cfg(run_dir, *overrides):
    from pipeline.config import Config, load
    from tests.demo import DEMO

    return load(Config, DEMO, [f"trainer.run_dir={run_dir}", *overrides])


def _started(run_dir, *overrides):
    """A run dir as a run with `overrides` leaves it after its checkpoint at step 2."""
    cfg = _cfg(run_dir, *overrides)
    checkpoint.adopt_config(cfg)
    p = checkpoint.begin(run_dir / "checkpoints", 2)
    checkpoint.commit(run_dir / "checkpoints", 2, {"step": 2})
    return p


def test_a_resume_with_a_changed_config_is_refused_with_the_fields_listed(tmp_path):
    from pipeline.errors import ConfigError

    _started(tmp_path, "loss.method=ppo", "actor.lr=2e-4")
    saved = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError) as e:
        checkpoint.check_resume_config(_cfg(tmp_path, "loss.method=clip_cov", "actor.lr=1e-3"))
    msg = str(e.value)
    assert "actor.lr (0.0002 -> 0.001)" in msg and "loss.method ('ppo' -> 'clip_cov')" in msg, msg
    assert "trainer.allow_config_change=true" in msg and "\n" not in msg
    with pytest.raises(ConfigError):  # the trainer's own write checks too
        checkpoint.adopt_config(_cfg(tmp_path, "loss.method=clip_cov"))
    assert (tmp_path / "config.json").read_text() == saved  # never overwritten
    assert not list(tmp_path.glob("config.step_*"))


def test_budget_logging_and_placement_fields_may_change_and_the_old_config_is_kept(tmp_path):
    _started(tmp_path, "loss.method=ppo")
    old = json.loads((tmp_path / "config.json").read_text())
    changed = ("trainer.steps=500", "trainer.eval_every=5", "trainer.ray_address=10.0.0.1:6379")
    cfg = _cfg(tmp_path, "loss.method=ppo", *changed, "trainer.tensorboard=false")
    checkpoint.check_resume_config(cfg)
    assert checkpoint.adopt_config(cfg) == tmp_path / "config.step_000002.json"
    assert json.loads((tmp_path / "config.step_000002.json").read_text()) == old
    assert json.loads((tmp_path / "config.json").read_text())["trainer"]["steps"] == 500
    # the same config again: nothing to keep
    assert checkpoint.adopt_config(cfg) is None and len(list(tmp_path.glob("config.step_*"))) == 1


def test_allow_config_change_resumes_and_keeps_every_old_config(tmp_path):
    _started(tmp_path, "loss.method=ppo")
    first = (tmp_path / "config.json").read_text()
    cfg = _cfg(tmp_path, "loss.method=clip_cov", "trainer.allow_config_change=true")
    checkpoint.check_resume_config(cfg)
    assert checkpoint.adopt_config(cfg) == tmp_path / "config.step_000002.json"
    second = (tmp_path / "config.json").read_text()
    cfg = _cfg(tmp_path, "loss.method=kl_cov", "trainer.allow_config_change=true")
    assert checkpoint.adopt_config(cfg) == tmp_path / "config.step_000002.json.1"
    assert (tmp_path / "config.step_000002.json").read_text() == first
    assert (tmp_path / "config.step_000002.json.1").read_text() == second
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["method"] == "kl_cov"


def test_a_fresh_run_dir_or_one_without_a_checkpoint_takes_any_config(tmp_path):
    checkpoint.check_resume_config(_cfg(tmp_path, "loss.method=ppo"))
    checkpoint.adopt_config(_cfg(tmp_path, "loss.method=ppo"))
    cfg = _cfg(tmp_path, "loss.method=clip_cov")
    checkpoint.check_resume_config(cfg)  # no checkpoint: a start over, not a resume
    assert checkpoint.adopt_config(cfg) == tmp_path / "config.step_000000.json"


def test_a_field_added_to_the_code_since_counts_only_when_set_away_from_its_default(tmp_path):
    from pipeline.errors import ConfigError

    _started(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["trainer"]["max_nan_steps"]  # a run saved before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    checkpoint.check_resume_config(_cfg(tmp_path))
    with pytest.raises(ConfigError, match=r"trainer.max_nan_steps \(default 3 -> 5\)"):
        checkpoint.check_resume_config(_cfg(tmp_path, "trainer.max_nan_steps=5"))


def test_an_unreadable_saved_config_is_one_clear_error(tmp_path):
    from pipeline.errors import ConfigError

    _started(tmp_path)
    (tmp_path / "config.json").write_text('{"trainer": ')
    with pytest.raises(ConfigError, match="config.json: the run's saved config is unreadable"):
        checkpoint.check_resume_config(_cfg(tmp_path))
