"""A real Slurm on this host for the launch tests: Debian's slurm-wlm 22.05 and munge, installed if
missing, with munged, slurmctld and two slurmd "nodes" (n1, n2: `slurmd -N`, distinct ports and spool
dirs) on 127.0.0.1. Everything lives in a tmp dir; every daemon is started here and stopped by its
process id, and any process still carrying this cluster's marker variable (job steps, Ray) is
stopped by id as well, even when a test fails.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import marked_pids, stop_marked

REPO = Path(__file__).resolve().parents[2]
APT_PACKAGES = ["slurm-wlm", "munge", "shellcheck"]
BINARIES = ["sbatch", "slurmctld", "slurmd", "munged", "shellcheck"]
NODES = ("n1", "n2")
CPUS_PER_NODE = 2  # two "nodes" of 2 CPUs on a 2-core box: slurmd accepts it with config_overrides
MARKER_ENV = "PIPELINE_SLURM_TEST_CLUSTER"


def ensure_apt_packages() -> None:
    """apt-get install slurm-wlm munge shellcheck once when any of their programs is missing."""
    missing = [b for b in BINARIES if not shutil.which(b) and not Path("/usr/sbin", b).exists()]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{missing} missing and cannot apt-get install {APT_PACKAGES} (not root on Debian)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *APT_PACKAGES], check=True, env=env)


def port_block(size: int) -> int:
    """A random base port with `size` ports above it free on 127.0.0.1 (below the ephemeral range)."""
    for _ in range(200):
        base = random.randrange(11000, 30000 - size, 10)
        try:
            for p in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.name = f"pt{os.getpid()}"
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.socket = root / "munge.socket"
        self.procs: list[subprocess.Popen] = []
        self.logs = root / "log"
        self.ray_tmp = Path(f"/tmp/rs{os.getpid()}")  # RAY_TMP_BASE of the jobs: short for unix sockets

    # -- setup ---------------------------------------------------------------------------------
    def write_config(self) -> None:
        for d in (self.logs, self.root / "state", self.ray_tmp, *(self.root / f"spool-{n}" for n in NODES)):
            d.mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ports = port_block(2 + len(NODES))
        mem = 4000
        lines = [
            f"ClusterName={self.name}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ports}",
            f"SlurmdPort={ports + 1}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again (120 s default)
            f"AuthInfo=socket={self.socket},cred_expire=10",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=500",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MpiDefault=none",
            "KillWait=10",
            "MinJobAge=600",
            f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmdSpoolDir={self.root}/spool-%n",
            f"StateSaveLocation={self.root}/state",
            f"SlurmctldLogFile={self.logs}/slurmctld.log",
            f"SlurmdLogFile={self.logs}/slurmd-%n.log",
            "JobCompType=jobcomp/none",
            *(
                f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={ports + 2 + i} "
                f"CPUs={CPUS_PER_NODE} RealMemory={mem} State=UNKNOWN"
                for i, n in enumerate(NODES)
            ),
            f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PYTEST_"))}
        env.update(SLURM_CONF=str(self.conf), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env[MARKER_ENV] = str(self.root)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin"
        return env

    def _daemon(self, name: str, *cmd: str) -> None:
        out = open(self.logs / f"{name}.stdout", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.procs.append(p)
        time.sleep(0.3)
        if p.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {p.returncode}: {(self.logs / f'{name}.stdout').read_text()}"
            )

    def start(self) -> None:
        self.write_config()
        r = self.root
        self._daemon(
            "munged",
            "munged",
            "-F",
            "--force",
            f"--socket={self.socket}",
            f"--key-file={r / 'munge.key'}",
            f"--pid-file={r / 'munged.pid'}",
            f"--log-file={self.logs / 'munged.log'}",
            f"--seed-file={r / 'munged.seed'}",
        )
        for _ in range(50):
            if self.socket.exists():
                break
            time.sleep(0.1)
        self._daemon("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
        for n in NODES:
            self._daemon(f"slurmd-{n}", "slurmd", "-D", "-f", str(self.conf), "-N", n)
        deadline = time.time() + 60
        while time.time() < deadline:
            r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if states and all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(1)
        raise RuntimeError(f"Slurm nodes not idle after 60 s: {r.stdout} {r.stderr}\n{self.tail_logs()}")

    # -- use -----------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, **kw)

    def job(self, job_id: str) -> dict:
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        fields = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float, while_waiting=None) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self.job(job_id)
            if j.get("JobState") in states:
                return j
            if while_waiting:
                while_waiting(j)
            time.sleep(1)
        raise AssertionError(
            f"job {job_id} not in {states} after {timeout}s: {self.job(job_id)}\n{self.tail_logs()}"
        )

    def tail_logs(self, n: int = 15) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            out.append(f"---- {f.name} ----\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    # -- teardown ------------------------------------------------------------------------------
    def marked_pids(self) -> list[int]:
        """Processes of this cluster: their environment carries MARKER_ENV=<root> (daemons, steps, Ray)."""
        return marked_pids(MARKER_ENV, str(self.root))

    def stop(self) -> None:
        try:
            r = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
            for job_id in r.stdout.split():
                self.run("scancel", job_id, check=False, timeout=10)
            deadline = time.time() + 30
            while time.time() < deadline and self.run("squeue", "-h", check=False, timeout=10).stdout.strip():
                time.sleep(1)
        except (subprocess.SubprocessError, OSError):
            pass
        for p in reversed(self.procs):  # slurmd, slurmctld, then munged
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        stop_marked(MARKER_ENV, str(self.root))  # job steps or Ray processes that outlived them
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory, request):
    ensure_apt_packages()
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    request.addfinalizer(c.stop)  # registered before start: a half-started cluster is stopped too
    c.start()
    return c
