"""`python -m pipeline submit`: fill the Slurm template (slurm/ray_job.sbatch) from a recipe and submit it.

    python -m pipeline submit --config configs/<recipe>.yaml --nodes 4 --gpus-per-node 8 \\
        --partition batch --time 24:00:00 --iface ib0 [--container-image IMG] [--dry-run] \\
        [section.field=value ...]

First the same checks as `python -m pipeline plan` (placement, per-GPU memory; a GPU recipe with
`--gpus-per-node 0` is refused). The generated script is the template with its `#SBATCH` header
replaced and an `export` block of the job's settings inserted; it is saved as
`<run_dir>/slurm/job-<time>.sbatch` (the record of what ran) and submitted with `sbatch`. Users
never edit a script; `--dry-run` prints it instead.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "slurm" / "ray_job.sbatch"
ENV_MARKER = "# @SUBMIT_ENV@"


class SubmitError(ValueError):
    """The job cannot be submitted as asked; the message says what to change."""


@dataclass(kw_only=True, slots=True)
class SlurmJob:
    config: str  # recipe path
    overrides: list[str] = field(default_factory=list)  # dotted recipe overrides
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None  # None = whatever Slurm gives the (exclusive) node
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"  # Slurm --time
    job_name: str | None = None  # default: the recipe's file stem
    mem: str = "0"  # per node; 0 = all of it
    exclusive: bool = True
    signal_seconds: int = 300  # SIGUSR1 this long before the time limit: checkpoint, then requeue
    iface: str | None = None  # network interface for Ray/NCCL/Gloo (ib0, eth0); None = first global
    node_ip: str | None = None  # explicit node address, only for single-host tests (127.0.0.1)
    ray_port: int = 0  # GCS port of the head; 0 = 6379 + job id % 100 (jobs sharing a node differ)
    port_base: int = 0  # per-node Ray ports base..base+999; 0 = 20000 + (job id % 10) x 1000
    port_stride: int = 0  # added per node rank: >0 only when several "nodes" share one host
    wait_seconds: int = 600  # deadline for the Ray cluster to form
    entry: str = "pipeline"  # driver module: python -m ENTRY train --config ...
    python: str = ""  # interpreter on the nodes; "" = the repo's .venv (else this interpreter)
    env: dict[str, str] = field(default_factory=dict)  # extra exported variables
    sbatch_args: list[str] = field(default_factory=list)  # extra #SBATCH options, verbatim
    container_image: str = ""  # pyxis/enroot image every step runs in (srun --container-image)
    container_mounts: str = ""  # srun --container-mounts (checkout and run dir must be visible inside)
    gpu_memory_gib: float = 80.0  # memory of one GPU, for the plan's check
    model_config: str | None = None  # the model's config.json where actor.model_path is not readable
    run_dir: str = ""  # filled by prepare(): absolute trainer.run_dir
    plan: dict | None = None  # filled by prepare(): `python -m pipeline plan`'s report

    def validate(self) -> None:
        if self.nodes < 1:
            raise SubmitError(f"--nodes={self.nodes}: must be >= 1")
        if self.gpus_per_node < 0 or (self.cpus_per_node is not None and self.cpus_per_node < 1):
            raise SubmitError("--gpus-per-node must be >= 0 and --cpus-per-node >= 1")
        limit = time_limit_seconds(self.time)
        if limit is not None and self.signal_seconds >= limit:
            raise SubmitError(
                f"--signal-seconds={self.signal_seconds} is not below --time={self.time}: the job would be "
                "asked to checkpoint at once"
            )
        if self.signal_seconds < 120:
            print(
                f"[submit] warning: --signal-seconds={self.signal_seconds}: Slurm delivers the signal up to "
                "60 s late; leave >= 120 s for the checkpoint",
                file=sys.stderr,
            )
        for o in self.overrides:
            if "=" not in o or any(c.isspace() for c in o):
                raise SubmitError(f"override {o!r}: expected section.field=value without whitespace")
            if o.split("=", 1)[0] == "trainer.ray_address":
                raise SubmitError("trainer.ray_address is set by the job (the head's address); drop it")
        for k in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise SubmitError(f"--env {k}=...: not a valid variable name")


def time_limit_seconds(t: str) -> int | None:
    """Seconds of a Slurm --time value (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); None for UNLIMITED."""
    if t.upper() in ("UNLIMITED", "INFINITE"):
        return None
    try:
        days, _, rest = t.rpartition("-")
        parts = [int(x) for x in rest.split(":")]
        if days:
            if len(parts) > 3:
                raise ValueError
            h, m, s = (parts + [0, 0])[:3]
            return int(days) * 86400 + h * 3600 + m * 60 + s
        h, m, s = {1: [0, *parts, 0], 2: [0, *parts], 3: parts}[len(parts)]
        return h * 3600 + m * 60 + s
    except (ValueError, KeyError):
        raise SubmitError(
            f"--time={t!r}: expected Slurm's [D-]HH:MM:SS (e.g. 24:00:00 or 2-00:00:00)"
        ) from None


def _recipe(job: SlurmJob) -> dict:
    """The recipe with overrides; for the pipeline's own driver validated by the real Config and
    checked like `python -m pipeline plan` (placement, memory, GPUs per node)."""
    from pipeline.config import ConfigError, apply_overrides, load_yaml

    try:
        data = apply_overrides(load_yaml(job.config), list(job.overrides))
        if job.entry == "pipeline":
            from pipeline.config import Config, load
            from pipeline.launch import plan

            cfg = load(Config, job.config, list(job.overrides))
            cfg.check_job()
            try:
                job.plan = plan.check(cfg, nodes=job.nodes, gpus_per_node=job.gpus_per_node,
                                      gpu_gib=job.gpu_memory_gib, model_config_path=job.model_config)  # fmt: skip
            except plan.PlanRefused as e:
                raise SubmitError(f"the plan is refused (python -m pipeline plan shows it): {e}") from None
            return {"trainer": {"run_dir": cfg.trainer.run_dir, "world_size": cfg.trainer.world_size}}
    except ConfigError as e:
        raise SubmitError(f"configuration error: {e}") from None
    return data


def prepare(job: SlurmJob) -> SlurmJob:
    """Validate, resolve paths (the driver runs in the repo root) and check the recipe fits the nodes."""
    job.validate()
    config = Path(job.config)
    if not config.is_absolute():
        config = (Path.cwd() / config).resolve()
    if not config.exists():
        raise SubmitError(f"--config {job.config}: no such file")
    job.config = str(config)
    trainer = _recipe(job).get("trainer") or {}
    run_dir = Path(str(trainer.get("run_dir", "runs/demo")))
    job.run_dir = str(run_dir if run_dir.is_absolute() else REPO / run_dir)
    world = trainer.get("world_size")
    if job.container_mounts and not job.container_image:
        raise SubmitError("--container-mounts without --container-image: name the image the steps run in")
    if job.gpus_per_node and isinstance(world, int) and world > job.nodes * job.gpus_per_node:
        raise SubmitError(
            f"trainer.world_size={world} needs more GPUs than --nodes={job.nodes} x --gpus-per-node="
            f"{job.gpus_per_node}; Ray would wait forever for the placement group"
        )
    if not job.python:
        venv = REPO / ".venv" / "bin" / "python"
        job.python = str(venv if venv.exists() else Path(sys.executable))
    job.job_name = job.job_name or config.stem
    return job


def directives(job: SlurmJob) -> list[str]:
    d = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        *(["--exclusive"] if job.exclusive else []),
        f"--mem={job.mem}",
        f"--time={job.time}",
        "--requeue",
        "--open-mode=append",
        f"--signal=B:USR1@{job.signal_seconds}",
        f"--output={job.run_dir}/slurm/slurm-%j.out",
    ]
    if job.partition:
        d.append(f"--partition={job.partition}")
    if job.account:
        d.append(f"--account={job.account}")
    if job.gpus_per_node:
        d.append(f"--gres=gpu:{job.gpus_per_node}")
    if job.cpus_per_node:
        d.append(f"--cpus-per-task={job.cpus_per_node}")
    return d + list(job.sbatch_args)


def environment(job: SlurmJob) -> dict[str, str]:
    env = {
        "PIPELINE_ROOT": str(REPO),
        "RL_CONFIG": job.config,
        "RL_RUN_DIR": job.run_dir,
        "RL_OVERRIDES": " ".join(job.overrides),
        "RL_PYTHON": job.python,
        "RL_ENTRY": job.entry,
        "GPUS_PER_NODE": str(job.gpus_per_node),
        "RAY_IFACE": job.iface or "",
        "RAY_NODE_IP": job.node_ip or "",
        "RAY_PORT": str(job.ray_port),
        "RAY_NODE_PORT_BASE": str(job.port_base),
        "RAY_PORT_STRIDE": str(job.port_stride),
        "RAY_WAIT_S": str(job.wait_seconds),
        "RL_CONTAINER_IMAGE": job.container_image,
        "RL_CONTAINER_MOUNTS": job.container_mounts,
    }
    if job.cpus_per_node:
        env["CPUS_PER_NODE"] = str(job.cpus_per_node)
    if job.iface:
        env.setdefault("NCCL_SOCKET_IFNAME", job.iface)
        env.setdefault("GLOO_SOCKET_IFNAME", job.iface)
    env.update(job.env)
    return env


def render(job: SlurmJob, template: Path = TEMPLATE) -> str:
    """The template with the job's #SBATCH header and its settings exported where the marker is."""
    lines = template.read_text().splitlines()
    i = 1
    while i < len(lines) and lines[i].startswith("#SBATCH"):
        i += 1
    body = lines[i:]
    marker = [k for k, line in enumerate(body) if line.startswith(ENV_MARKER)]
    if len(marker) != 1:
        raise SubmitError(f"{template}: expected one line starting with {ENV_MARKER!r}")
    env = [
        f"# Written by `python -m pipeline submit` on {time.strftime('%Y-%m-%d %H:%M:%S')} from",
        f"# {shlex.join(['--config', job.config, '--nodes', str(job.nodes), *job.overrides])}",
        *(f"export {k}={shlex.quote(v)}" for k, v in environment(job).items()),
    ]
    k = marker[0]
    out = [lines[0], *(f"#SBATCH {d}" for d in directives(job)), *body[:k], *env, *body[k + 1 :]]
    return "\n".join(out) + "\n"


def submit(job: SlurmJob, dry_run: bool = False) -> int:
    text = render(job)
    slurm_dir = Path(job.run_dir) / "slurm"
    script = slurm_dir / f"job-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    if dry_run:
        print(text, end="")
        print(f"# would run: sbatch --parsable {script}", file=sys.stderr)
        return 0
    if shutil.which("sbatch") is None:  # before anything is written: no job file for a job never sent
        print("submit: sbatch is not on PATH: run this on a Slurm login node (or --dry-run)", file=sys.stderr)
        return 2
    slurm_dir.mkdir(parents=True, exist_ok=True)  # --output's directory must exist before the job starts
    script.write_text(text)
    r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"[submit] sbatch failed ({r.returncode}): {r.stderr.strip()}", file=sys.stderr)
        return r.returncode
    job_id = r.stdout.strip().split(";")[0]
    print(job_id)
    print(
        f"[submit] job {job_id}: {script}\n[submit] output {slurm_dir}/slurm-{job_id}.out, "
        f"per-node logs {slurm_dir}/{job_id}-r<restart>/",
        file=sys.stderr,
    )
    return 0


def parse_args(argv: list[str] | None) -> tuple[SlurmJob, bool]:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline submit", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--config", required=True, help="YAML recipe")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, default=0)
    ap.add_argument("--cpus-per-node", type=int, default=None)
    ap.add_argument("--partition")
    ap.add_argument("--account")
    ap.add_argument("--time", default="04:00:00", help="Slurm time limit [D-]HH:MM:SS")
    ap.add_argument("--job-name")
    ap.add_argument("--mem", default="0", help="memory per node (0 = all)")
    ap.add_argument("--no-exclusive", dest="exclusive", action="store_false")
    ap.add_argument("--signal-seconds", type=int, default=300, help="checkpoint signal before the limit")
    ap.add_argument("--iface", help="cluster network interface (ib0, eth0, ...)")
    ap.add_argument("--node-ip", help="explicit address of every node: single-host tests only")
    ap.add_argument("--ray-port", type=int, default=0, help="GCS port (0: 6379 + job id %% 100)")
    ap.add_argument(
        "--port-base", type=int, default=0, help="Ray node ports (0: 20000 + job id %% 10 x 1000)"
    )
    ap.add_argument("--port-stride", type=int, default=0)
    ap.add_argument("--wait-seconds", type=int, default=600)
    ap.add_argument("--entry", default="pipeline", help="driver module (python -m ENTRY train ...)")
    ap.add_argument("--python", default="", help="interpreter on the nodes (default: the repo's .venv)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="export in the job")
    ap.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION", help="extra #SBATCH")
    ap.add_argument("--container-image", default="", help="pyxis/enroot image for every step")
    ap.add_argument("--container-mounts", default="", help="srun --container-mounts SRC:DST[,...]")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="GPU memory for the plan's check")
    ap.add_argument("--model-config", help="the model's config.json where actor.model_path is not readable")
    ap.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    ap.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    a = ap.parse_args(argv)
    env = {}
    for item in a.env:
        if "=" not in item:
            ap.error(f"--env {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        env[k] = v
    job = SlurmJob(
        config=a.config,
        overrides=a.overrides,
        nodes=a.nodes,
        gpus_per_node=a.gpus_per_node,
        cpus_per_node=a.cpus_per_node,
        partition=a.partition,
        account=a.account,
        time=a.time,
        job_name=a.job_name,
        mem=a.mem,
        exclusive=a.exclusive,
        signal_seconds=a.signal_seconds,
        iface=a.iface,
        node_ip=a.node_ip,
        ray_port=a.ray_port,
        port_base=a.port_base,
        port_stride=a.port_stride,
        wait_seconds=a.wait_seconds,
        entry=a.entry,
        python=a.python,
        env=env,
        sbatch_args=a.sbatch_arg,
        container_image=a.container_image,
        container_mounts=a.container_mounts,
        gpu_memory_gib=a.gpu_memory_gib,
        model_config=a.model_config,
    )
    return job, a.dry_run


def main(argv: list[str] | None = None) -> int:
    job, dry_run = parse_args(argv)
    try:
        prepare(job)
        return submit(job, dry_run=dry_run)
    except SubmitError as e:
        print(f"submit: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
