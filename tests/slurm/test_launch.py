"""slurm/ray_job.sbatch and `python -m pipeline submit`: static checks, then jobs on a real Slurm.

The slow tests submit through the launcher to the two-node Slurm of conftest.py (n1, n2 on this host,
Ray on 127.0.0.1 through the explicit RAY_NODE_IP override, per-node port offsets). The driver is
tests/slurm/standin_driver.py: the same command line and run directory as `python -m pipeline train`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import checkpoint, submit
from tests.demo import DEMO, ensure_demo_model
from tests.slurm.conftest import REPO, ensure_apt_packages, port_block

REAL = (
    "trainer.checkpoint_every=1",
    "trainer.eval_every=0",
    "trainer.prompts_per_step=8",
    "trainer.samples_per_prompt=4",
)

SCRIPTS = sorted([*(REPO / "slurm").glob("*.sh"), *(REPO / "slurm").glob("*.sbatch")])
NODE_SH = REPO / "slurm" / "ray_node.sh"


def dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yaml"
    if not recipe.exists():
        recipe.write_text(f"trainer:\n  run_dir: {tmp_path / 'run'}\n  steps: 3\n")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "submit",
            "--config",
            str(recipe),
            "--entry",
            "tests.slurm.standin_driver",
        ]
        + list(args)
        + ["--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


# ---- static: shellcheck, rendering, address choice ------------------------------------------------
def test_scripts_are_shellcheck_clean(tmp_path):
    if not shutil.which("shellcheck"):
        ensure_apt_packages()
    rendered = tmp_path / "job.sbatch"
    rendered.write_text(dry_run(tmp_path, "--nodes", "2", "--iface", "eth0", "trainer.steps=2").stdout)
    r = subprocess.run(
        ["shellcheck", "-x", *map(str, SCRIPTS), str(rendered)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for s in [*SCRIPTS, rendered]:
        assert subprocess.run(["bash", "-n", str(s)]).returncode == 0, s


def test_submit_puts_every_directive_before_the_first_command(tmp_path):
    r = dry_run(
        tmp_path, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "1-00:00:00"
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    sbatch = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert sbatch == list(range(1, 1 + len(sbatch))), "directives must follow the shebang directly"
    first_command = next(
        i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#")
    )
    assert first_command > sbatch[-1]
    header = "\n".join(lines[: sbatch[-1] + 1])
    for d in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gres=gpu:8",
        "--partition=gpu",
        "--requeue",
        "--open-mode=append",
    ):
        assert f"#SBATCH {d}\n" in header + "\n", d
    assert re.search(r"#SBATCH --signal=B:USR1@\d+", header)
    assert f"--output={tmp_path / 'run'}/slurm/slurm-%j.out" in header
    assert "export GPUS_PER_NODE=8" in r.stdout and f"export RL_RUN_DIR={tmp_path / 'run'}" in r.stdout


def test_submit_refuses_what_cannot_run(tmp_path):
    assert dry_run(tmp_path, "--nodes", "1", "trainer.ray_address=auto").returncode == 2
    assert dry_run(tmp_path, "--nodes", "1", "--time", "5:00", "--signal-seconds", "600").returncode == 2
    assert dry_run(tmp_path, "--nodes", "1", "--time", "soon").returncode == 2
    assert dry_run(tmp_path, "--nodes", "0").returncode == 2


R7 = str(REPO / "configs" / "qwen2.5-7b_dapo_clip_cov.yaml")


def submit_cli(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path} if path is not None else None
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "submit", *args], cwd=REPO, capture_output=True, text=True, env=env
    )


def test_submit_without_sbatch_exits_2_with_one_line_and_writes_no_job_file(tmp_path):
    """Regression (issue 16 item 12): a missing sbatch was a traceback after the job file was written."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"trainer:\n  run_dir: {tmp_path / 'run'}\n")
    r = submit_cli("--config", str(recipe), "--nodes", "1", "--entry", "tests.slurm.standin_driver",
                   path=str(Path(sys.executable).parent))  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "submit: sbatch is not on PATH: run this on a Slurm login node (or --dry-run)"
    ]
    assert not list(tmp_path.rglob("*.sbatch")) and r.stdout == ""


def test_submit_runs_the_plans_checks_first(tmp_path):
    out = f"trainer.run_dir={tmp_path / 'run'}"
    r = submit_cli("--config", R7, "--nodes", "2", "--dry-run", out)  # a GPU recipe, --gpus-per-node 0
    assert r.returncode == 2 and "rollout.device=cuda but --gpus-per-node=0" in r.stderr, r.stderr
    r = submit_cli("--config", R7, "--nodes", "1", "--gpus-per-node", "8", "--dry-run", out)
    assert r.returncode == 2 and "need 16 GPUs; 1 node(s) x 8 GPUs = 8: use --nodes 2" in r.stderr
    r = submit_cli("--config", R7, "--nodes", "2", "--gpus-per-node", "8", "--dry-run", out,
                   "actor.offload=false", "actor.sequence_parallel=false", "rollout.mem_fraction_static=0.75")  # fmt: skip
    assert r.returncode == 2 and "GiB per GPU, more than 95% of 80 GiB" in r.stderr
    r = submit_cli("--config", R7, "--nodes", "2", "--gpus-per-node", "8", "--dry-run", out)
    assert r.returncode == 0, r.stderr
    assert "export GPUS_PER_NODE=8" in r.stdout and "#SBATCH --gres=gpu:8" in r.stdout
    assert not list(tmp_path.rglob("*.sbatch"))


def test_container_option_puts_every_step_in_the_named_container(tmp_path):
    """The rendered job with stub `srun`/`scontrol` on PATH: every srun carries the pyxis options."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"trainer:\n  run_dir: {tmp_path / 'run'}\n")
    rendered = dry_run(tmp_path, "--nodes", "2", "--container-image", "/img/rl.sqsh",
                       "--container-mounts", "/shared:/shared", "--node-ip", "127.0.0.1").stdout  # fmt: skip
    assert "export RL_CONTAINER_IMAGE=/img/rl.sqsh" in rendered
    bin_dir, log = tmp_path / "bin", tmp_path / "srun.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho n1; echo n2\n")
    # srun: record the arguments; play the node script's part (address, head.ready), succeed.
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in *node-ip*) echo "127.0.0.1 lo" ;; *" head"*) echo 127.0.0.1:1 > "$RAY_LOG_DIR/head.ready"; exec sleep 300 ;;'
        " *worker*) exec sleep 300 ;; esac\n"
    )
    (bin_dir / "fakepython").write_text("#!/bin/bash\nexit 0\n")  # the cluster wait
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(rendered.replace("export RL_PYTHON=", f"export RL_PYTHON={bin_dir / 'fakepython'} #"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2", "WATCH_S": "1"}  # fmt: skip
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 5, calls  # address, head, workers, driver, the logs collected at the end
    for call in calls:
        assert "--container-image=/img/rl.sqsh --container-name=rl-4242" in call, call
        assert f"--container-workdir={REPO}" in call and "--container-mounts=/shared:/shared" in call


def test_time_limit_parsing():
    t = submit.time_limit_seconds
    assert (t("30"), t("10:00"), t("24:00:00"), t("2-00:00:00"), t("1-12"), t("UNLIMITED")) == (
        1800,
        600,
        86400,
        172800,
        129600,
        None,
    )


def node_ip(**env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM"))}
    return subprocess.run(
        ["bash", str(NODE_SH), "node-ip"], env={**clean, **env}, capture_output=True, text=True
    )


def test_head_address_is_never_loopback_by_accident():
    r = node_ip(RAY_IFACE="lo")
    assert r.returncode != 0 and "loopback" in r.stderr
    r = node_ip(RAY_IFACE="nosuch0")
    assert r.returncode != 0 and "RAY_IFACE=nosuch0" in r.stderr
    r = node_ip()  # no interface named: the first global address, or a clear failure
    assert r.returncode != 0 or not r.stdout.startswith("127.")


def test_head_address_from_the_configured_interface():
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    if not out.stdout.strip():
        pytest.skip("no non-loopback IPv4 interface on this machine")
    iface, cidr = out.stdout.split()[1], out.stdout.split()[3]
    r = node_ip(RAY_IFACE=iface)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [cidr.split("/")[0], iface]


def test_explicit_loopback_override_for_single_host_tests():
    r = node_ip(RAY_NODE_IP="127.0.0.1", RAY_IFACE="eth-ignored")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["127.0.0.1", "lo"]


# ---- real Slurm -------------------------------------------------------------------------------------
class Job:
    """One submission through the launcher; paths of its run directory.

    By default the driver is the stand-in (`tests/slurm/standin_driver.py`, seconds per step); with
    `recipe` and `entry="pipeline"` it is the real `python -m pipeline train` on that recipe.
    """

    def __init__(
        self,
        cluster,
        tmp_path: Path,
        nodes: int,
        steps: int,
        step_seconds: float = 1.0,
        extra=(),
        *,
        recipe: Path | None = None,
        entry: str = "tests.slurm.standin_driver",
        overrides=(),
        time_limit: str = "10:00",
    ):
        self.cluster, self.run_dir = cluster, tmp_path / "run"
        if recipe is None:
            recipe = tmp_path / "recipe.yaml"
            recipe.write_text(f"trainer:\n  run_dir: {self.run_dir}\n  checkpoint_every: 1\n")
        base = port_block(2200)
        cmd = [
            sys.executable, "-m", "pipeline", "submit", "--config", str(recipe), "--nodes", str(nodes),
            "--time", time_limit, "--signal-seconds", "120", "--node-ip", "127.0.0.1",
            "--ray-port", str(base + 2100), "--port-base", str(base), "--port-stride", "1000",
            "--wait-seconds", "120", "--entry", entry,
            "--env", f"RAY_TMP_BASE={cluster.ray_tmp}", "--env", "RAY_OBJECT_STORE_BYTES=80000000",
            "--env", f"STANDIN_NODES={nodes}", "--env", f"STANDIN_STEP_SECONDS={step_seconds}",
            *extra, f"trainer.steps={steps}", f"trainer.run_dir={self.run_dir}", *overrides,
        ]  # fmt: skip
        r = cluster.run(*cmd, cwd=REPO, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        self.id = r.stdout.split()[0]

    @property
    def output(self) -> str:
        f = self.run_dir / "slurm" / f"slurm-{self.id}.out"
        return f.read_text(errors="replace") if f.exists() else ""

    def log(self, name: str, restart: int = 0) -> str:
        f = self.run_dir / "slurm" / f"{self.id}-r{restart}" / name
        return f.read_text(errors="replace") if f.exists() else ""

    def metrics(self) -> list[dict]:
        f = self.run_dir / "metrics.jsonl"
        return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []

    def wait(self, states=("COMPLETED",), timeout: float = 180, **kw) -> dict:
        end = self.cluster.wait_job(
            self.id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout, **kw
        )
        assert end["JobState"] in states, (
            f"{end}\n---- output ----\n{self.output}\n{self.cluster.tail_logs()}"
        )
        return end

    def wait_until(self, cond, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not cond():
            assert time.time() < deadline, f"timed out waiting for {what}\n{self.output}"
            assert self.cluster.job(self.id).get("JobState") in ("PENDING", "RUNNING"), self.output
            time.sleep(0.5)


def no_ray_left(cluster) -> list[str]:
    """Command lines of processes still using this cluster's Ray temp dirs."""
    left = []
    for pid in cluster.marked_pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "ray" in cmd and "slurmstepd" not in cmd:
            left.append(f"{pid}: {cmd[:120]}")
    return left


@pytest.mark.slow
def test_one_node_job_completes_with_metrics_and_checkpoint(slurm_cluster, tmp_path):
    job = Job(slurm_cluster, tmp_path, nodes=1, steps=3, step_seconds=0.5)
    end = job.wait()
    assert end["ExitCode"] == "0:0"
    assert [m["step"] for m in job.metrics()] == [1, 2, 3]
    step, path = checkpoint.latest_complete(job.run_dir / "checkpoints")
    assert step == 3 and (path / checkpoint.MARKER).exists()
    assert "Ray head ready" in job.output and "driver finished" in job.output
    assert "head ready at 127.0.0.1" in job.log("ray-head.log")
    assert "ready: 1/1 nodes, 2/2 CPUs" in job.log("wait.log")
    assert "[standin] done at step 3" in job.log("driver.log")
    kept = job.run_dir / "slurm" / f"{job.id}-r0" / "ray-logs-0"  # Ray's session logs, kept
    assert (kept / "raylet.out").exists() and (kept / "gcs_server.out").exists(), sorted(
        kept.parent.iterdir()
    )
    time.sleep(2)
    assert no_ray_left(slurm_cluster) == []


@pytest.mark.slow
def test_two_nodes_on_one_host_form_one_ray_cluster(slurm_cluster, tmp_path):
    job = Job(slurm_cluster, tmp_path, nodes=2, steps=2, step_seconds=0.5)
    job.wait()
    cluster = json.loads((job.run_dir / "cluster.json").read_text())
    assert cluster == {"ray_nodes": 2, "slurm_nodes": ["n1", "n2"], "cpus": 4.0}
    assert "ready: 2/2 nodes, 4/4 CPUs" in job.log("wait.log")
    assert "joining 127.0.0.1:" in job.log("ray-worker-0.log")
    assert [m["step"] for m in job.metrics()] == [1, 2]
    time.sleep(2)
    assert no_ray_left(slurm_cluster) == []


def _checkpointed(job: Job, step: int):
    return lambda: (found := checkpoint.latest_complete(job.run_dir / "checkpoints")) and found[0] >= step


@pytest.mark.slow
def test_scontrol_requeue_restarts_and_resumes_from_the_checkpoint(slurm_cluster, tmp_path):
    job = Job(slurm_cluster, tmp_path, nodes=2, steps=6, step_seconds=1.5)
    job.wait_until(_checkpointed(job, 2), "the checkpoint of step 2")
    slurm_cluster.run("scontrol", "requeue", job.id)
    end = job.wait(timeout=240)
    assert end["Restarts"] == "1", end
    resumed = [m for m in job.metrics() if m["restart"] == 1]
    assert resumed and resumed[0]["resumed_from"] >= 2 and resumed[-1]["step"] == 6
    assert "resumed from" in job.log("driver.log", restart=1)
    assert "ready: 2/2 nodes" in job.log("wait.log", restart=1)  # a fresh Ray cluster on restart
    assert checkpoint.latest_complete(job.run_dir / "checkpoints")[0] == 6


@pytest.mark.slow
def test_signal_before_time_limit_checkpoints_and_requeues(slurm_cluster, tmp_path):
    job = Job(slurm_cluster, tmp_path, nodes=1, steps=6, step_seconds=1.5, extra=("--env", "WATCH_S=1"))
    job.wait_until(lambda: "[standin] cluster" in job.log("driver.log"), "the driver to start")
    # What --signal=B:USR1@S does at the time limit, now: signal the batch shell only.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job.id)
    end = job.wait(timeout=240)
    assert end["Restarts"] == "1", end
    assert "preemption requested: checkpointed step" in job.log("driver.log", restart=0)
    assert "requeueing job" in job.output
    first = [m for m in job.metrics() if m["restart"] == 0]
    again = [m for m in job.metrics() if m["restart"] == 1]
    assert first[-1]["step"] < 6 and again[0]["resumed_from"] == first[-1]["step"] and again[-1]["step"] == 6


@pytest.mark.slow
def test_watchdog_fails_the_job_when_a_ray_srun_dies(slurm_cluster, tmp_path):
    job = Job(slurm_cluster, tmp_path, nodes=2, steps=50, step_seconds=1, extra=("--env", "WATCH_S=1"))
    job.wait_until(lambda: "[standin] cluster" in job.log("driver.log"), "the driver to start")
    steps = slurm_cluster.run("squeue", "-s", "-h", "-j", job.id, "-o", "%i %N").stdout.split("\n")
    worker = next(s.split()[0] for s in steps if s.strip().endswith("n2"))  # the workers' step
    slurm_cluster.run("scancel", worker)
    job.wait(states=("FAILED",), timeout=120)
    assert "FATAL: the Ray workers srun" in job.output
    assert len(job.metrics()) < 50


@pytest.mark.slow
def test_loopback_interface_fails_the_job_loudly(slurm_cluster, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"trainer:\n  run_dir: {tmp_path / 'run'}\n")
    r = slurm_cluster.run(
        *[
            sys.executable,
            "-m",
            "pipeline",
            "submit",
            "--config",
            str(recipe),
            "--nodes",
            "1",
            "--iface",
            "lo",
        ],
        *["--entry", "tests.slurm.standin_driver", "--time", "5:00", "--signal-seconds", "120"],
        cwd=REPO,
    )
    job_id = r.stdout.split()[0]
    end = slurm_cluster.wait_job(job_id, ("COMPLETED", "FAILED"), 60)
    out = (tmp_path / "run" / "slurm" / f"slurm-{job_id}.out").read_text()
    assert end["JobState"] == "FAILED", out
    assert "loopback address 127.0.0.1" in out and "FATAL" in out


def real_job(cluster, tmp_path: Path, nodes: int, steps: int) -> Job:
    """The demo recipe through the launcher with `python -m pipeline train` as the driver."""
    ensure_demo_model()
    return Job(
        cluster, tmp_path, nodes, steps, recipe=DEMO, entry="pipeline", overrides=REAL, time_limit="20:00"
    )


@pytest.mark.slow
def test_real_rl_job_runs_on_the_slurm_ray_cluster(slurm_cluster, tmp_path):
    """`python -m pipeline train` itself, the demo recipe for 2 steps, through the launcher on one node."""
    job = real_job(slurm_cluster, tmp_path, nodes=1, steps=2)
    end = job.wait(timeout=900)
    assert end["ExitCode"] == "0:0"
    steps = [m["step"] for m in job.metrics()]
    assert max(steps) == 2 and all(math.isfinite(m.get("actor/loss", 0.0)) for m in job.metrics())
    assert checkpoint.latest_complete(job.run_dir / "checkpoints")[0] == 2
    assert "[pipeline] done" in job.log("driver.log")


@pytest.mark.slow
def test_real_rl_job_on_two_nodes_resumes_after_scontrol_requeue(slurm_cluster, tmp_path):
    """The demo on a two-node Ray cluster; requeued mid-run, it restarts and resumes from its checkpoint."""
    job = real_job(slurm_cluster, tmp_path, nodes=2, steps=6)
    job.wait_until(_checkpointed(job, 2), "the checkpoint of step 2", timeout=600)
    slurm_cluster.run("scontrol", "requeue", job.id)
    end = job.wait(timeout=900)
    assert end["Restarts"] == "1", end
    assert "ready: 2/2 nodes, 4/4 CPUs" in job.log("wait.log") and "ready: 2/2 nodes" in job.log(
        "wait.log", restart=1
    )
    driver = job.log("driver.log", restart=1)
    assert "resumed from" in driver and "[pipeline] done" in driver
    rows = [m for m in job.metrics() if "reward/acc" in m]
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6]  # every step once: resumed, not restarted
    assert checkpoint.latest_complete(job.run_dir / "checkpoints")[0] == 6
    time.sleep(2)
    assert no_ray_left(slurm_cluster) == []
