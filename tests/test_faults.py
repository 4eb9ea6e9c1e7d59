"""Faults a job survives, end to end with `python -m pipeline train` on the CPU demo (issue 16):
a bad newest checkpoint, a resume with a changed config, rewards that hang or raise, a driver
killed during start-up and a start that fails after the servers started. The last two assert that
no process of the job is left, the way a user would find them: by the environment the job gave them.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.cluster.reaper import descendants, marked_pids, process_table, stop
from tests.demo import (
    DEMO,
    MARKER,
    REPO,
    Run,
    deterministic,
    ensure_demo_model,
    metrics,
    train,
    train_command,
)
from tests.rollout.sglang_support import SERVER_PYTHON, needs_sglang

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

SMALL = (
    *("trainer.prompts_per_step=8", "trainer.samples_per_prompt=4", "trainer.eval_every=0"),
    *("trainer.checkpoint_every=1", "trainer.keep_checkpoints=3"),
)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A 2-step run with a checkpoint after each step: (run_dir, its metrics)."""
    ensure_demo_model()
    run_dir = tmp_path_factory.mktemp("two_steps") / "run"
    code, out = train(DEMO, run_dir, "trainer.steps=2", *SMALL)
    assert code == 0, out[-5000:]
    return run_dir, metrics(run_dir)


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()[:120]
    except OSError:
        return ""


class Watched:
    """A `python -m pipeline train` process and every process of its job, found by the test's
    marker and, while the driver lives, by the process tree below it (a process that renames
    itself, as Ray's agents do, may overwrite the marker in its environment as /proc shows it)."""

    def __init__(self, cmd: list[str], log: Path):
        self.run = Run(cmd, log)
        self.known: dict[int, int] = {}  # pid -> start time
        self.seen: set[str] = set()  # their command lines

    def note(self) -> None:
        table = process_table()
        for pid in descendants([self.run.proc.pid], table):
            self.known[pid] = table[pid][1]
            self.seen.add(_cmdline(pid))

    def wait(self, timeout: float) -> int:
        """The driver's exit code, noting its processes until then."""
        deadline = time.monotonic() + timeout
        while self.run.proc.poll() is None:
            assert time.monotonic() < deadline, f"still running after {timeout:.0f} s"
            self.note()
            time.sleep(0.5)
        return self.run.proc.returncode

    def alive(self) -> dict[int, str]:
        """pid -> command line of the job's processes that are still running."""
        table = process_table()
        pids = {p for p, t in self.known.items() if p in table and table[p][1] == t}
        pids |= set(marked_pids(MARKER, self.run.marker))
        return {p: _cmdline(p) for p in sorted(pids) if table.get(p, (0, 0, "Z"))[2] != "Z"}

    def assert_nothing_left(self, within_s: float = 15.0) -> None:
        deadline = time.monotonic() + within_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [f"{pid}: {cmd}" for pid, cmd in self.alive().items()]
        assert not left, f"{len(left)} process(es) of the job outlived it by {within_s:.0f} s:\n" + "\n".join(
            left
        )

    @property
    def output(self) -> str:
        return self.run.output

    def stop(self) -> None:
        self.run.stop()
        stop(lambda table: {p for p, t in self.known.items() if p in table and table[p][1] == t}, grace_s=1.0)


def test_a_run_resumes_past_a_truncated_newest_checkpoint(two_steps, tmp_path):
    run_dir = copy_run(two_steps[0], tmp_path / "run")
    newest = checkpoint.step_dir(run_dir / "checkpoints", 2)
    shard = max((newest / "actor").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    broken = shard.read_bytes()

    code, out = train(DEMO, run_dir, "trainer.steps=2", *SMALL)
    assert code == 0, out[-5000:]
    assert f"skipped the newer checkpoint(s) step_000002 (actor/{shard.name} is truncated: " in out, out[
        -5000:
    ]
    assert "step_000001 (step 1)" in out
    # step 2 trained again from step 1's checkpoint: the same as the first time
    assert deterministic(metrics(run_dir)[2]) == deterministic(two_steps[1][2])
    # the bad checkpoint was kept (moved aside by the new save at step 2), never deleted
    assert (run_dir / "checkpoints" / "step_000002.bad" / "actor" / shard.name).read_bytes() == broken
    assert checkpoint.latest_loadable(run_dir / "checkpoints") == ((2, newest), [])


def test_a_resume_with_a_changed_config_is_refused_before_anything_starts(two_steps, tmp_path):
    run_dir = copy_run(two_steps[0], tmp_path / "run")
    saved = (run_dir / "config.json").read_text()
    run = Run(
        train_command(DEMO, run_dir, "trainer.steps=3", *SMALL, "loss.method=clip_cov", "actor.lr=1e-3"),
        tmp_path / "refused.log",
    )
    try:
        code = run.proc.wait(timeout=120)
    finally:
        run.stop()
    lines = run.output.strip().splitlines()
    assert code == 2, run.output[-3000:]
    assert lines[-1].startswith("configuration error: trainer.run_dir=") and len(lines) == 1, lines
    assert "actor.lr (0.0002 -> 0.001), loss.method ('ppo' -> 'clip_cov')" in lines[-1]
    assert (run_dir / "config.json").read_text() == saved and not list(run_dir.glob("config.step_*"))


def test_rewards_that_hang_or_raise_are_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    ensure_demo_model()
    monkeypatch.setenv("FLAKY_REWARD_DIR", str(tmp_path))
    run_dir = tmp_path / "run"
    cmd = train_command(
        DEMO,
        run_dir,
        "trainer.steps=1",
        *SMALL,
        "trainer.checkpoint_every=0",
        "reward.fn=tests.rewards.faulty:flaky_math",
        "reward.timeout_s=2",
    )
    job = Watched(cmd, tmp_path / "flaky.log")
    try:
        assert job.wait(timeout=600) == 0, job.output[-5000:]
        job.assert_nothing_left()  # a normal exit leaves nothing either
    finally:
        job.stop()
    m = metrics(run_dir)[1]
    assert m["reward/timeouts"] == 1 and m["reward/errors"] == 1, m
    assert (
        "reward timeout on response" in job.output and "ValueError: the reward function failed" in job.output
    )


def test_sigkill_to_the_driver_during_start_up_leaves_no_process(tmp_path):
    """Left alone, Ray's dashboard and runtime-env agents outlive a driver killed once they are up
    by a minute or more; the reaper stops every process of the job in seconds."""
    ensure_demo_model()
    cmd = train_command(DEMO, tmp_path / "run", "trainer.steps=50", *SMALL)  # killed long before
    job = Watched(cmd, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 300
        while not any("ray::DashboardAgent" in c for c in job.alive().values()):
            assert job.run.proc.poll() is None, job.output[-5000:]
            assert time.monotonic() < deadline, "Ray's dashboard agent never started"
            job.note()
            time.sleep(0.2)
        started = job.alive()
        job.run.proc.kill()
        job.run.proc.wait()
        job.assert_nothing_left()
        assert len(started) > 3, started
        assert "[pipeline] the job's driver" in job.output
    finally:
        job.stop()


@needs_sglang
def test_a_start_that_fails_after_the_servers_started_leaves_no_process(tmp_path):
    """A probe that cannot pass fails the start after the SGLang server (its own session) is up."""
    ensure_demo_model()
    cmd = train_command(
        REPO / "configs" / "demo_cpu_sglang.yaml",
        tmp_path / "run",
        "trainer.steps=1",
        *SMALL,
        "trainer.sync_tolerance=0",
        f"rollout.python={SERVER_PYTHON}",
    )
    job = Watched(cmd, tmp_path / "failed.log")
    try:
        code = job.wait(timeout=900)
        assert code == 1 and "weight sync check failed" in job.output, job.output[-5000:]
        assert any("sglang.launch_server" in c for c in job.seen), job.seen
        job.assert_nothing_left()
    finally:
        job.stop()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rollout"]["engine"] == "sglang"
