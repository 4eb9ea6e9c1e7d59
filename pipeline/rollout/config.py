"""Configuration of the SGLang rollout engines: how servers start, how the client talks, how weights sync.

Defaults run on the project's CPU machines (see shared docs cpu-recipes.md); a GPU cluster sets
`device="cuda"`, a larger `mem_fraction_static` and `dtype="bfloat16"`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import ConfigError
from pipeline.rollout.transports.common import DEFAULT_BUCKET_BYTES

SYNC_METHODS = ("distributed", "tensor", "disk")
ENGINES = ("local", "sglang")


class RolloutConfigError(ConfigError):
    """A rollout configuration that cannot work, with the field to change in the message."""


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    # --- which engine, where -------------------------------------------------------------------
    engine: str = (
        "local"  # "local": a transformers engine in a Ray actor per engine (CPU demo); "sglang": servers
    )
    colocate: bool = True  # engines share the actor's devices (memory released between phases)
    engine_cpus: float = 0.5  # Ray CPUs per engine when not colocated (colocated: half a bundle)

    # --- servers -------------------------------------------------------------------------------
    model_path: str = ""  # HF checkpoint the engines start from ("" in a recipe = actor.model_path)
    num_engines: int = 1  # SGLang servers; more than one sit behind sglang-router
    tp_size: int = 1  # tensor parallelism inside each server
    device: str = "cpu"  # "cpu" adds the CPU-path arguments of the recipe; "cuda" on a cluster
    dtype: str = "float32"  # server weights; keep the trainer's dtype policy (fp32 on CPU)
    mem_fraction_static: float = 0.05  # KV-cache + weights share of device memory (0.05 on CPU)
    max_total_tokens: int = 8192  # KV-cache size in tokens (None-equivalent 0 = SGLang decides)
    host: str = ""  # servers listen here; "" = their node's address (127.0.0.1 outside Ray)
    base_port: int = 0  # first server port on a node (its k-th engine: +k); 0 = a per-job block
    router_port: int = 0  # sglang-router port; 0 = a free port
    use_router: bool = True  # put sglang-router in front when num_engines > 1
    python: str = ""  # interpreter that runs the servers and the router; "" = this interpreter
    pythonpath: list[str] = field(default_factory=list)  # extra PYTHONPATH entries for the servers only
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the servers
    extra_args: list[str] = field(default_factory=list)  # appended to `sglang.launch_server`
    startup_timeout_s: float = 300.0  # deadline for /health_generate after a (re)start
    log_dir: str = ""  # server logs go here ("" = a temporary directory)

    # --- client --------------------------------------------------------------------------------
    request_timeout_s: float = 600.0  # one /generate call
    batch_size: int = 8  # prompts per /generate request
    max_inflight: int = 0  # concurrent /generate requests, all engines; 0 = the whole rollout at once
    max_retries: int = 5  # resubmissions of one request before the rollout fails
    retry_backoff_s: float = 0.5  # first wait after a failed request (doubles per retry)
    restart_dead_engines: bool = True  # restart an engine whose process died, then resubmit
    max_restarts: int = 3  # per engine, over the engine's life

    # --- weight sync ---------------------------------------------------------------------------
    sync_method: str = "distributed"  # "distributed" (broadcast), "tensor" (colocated), "disk"
    sync_backend: str = ""  # process-group backend for "distributed"; "" = gloo on cpu, nccl on cuda
    sync_master_addr: str = "127.0.0.1"  # the trainer's address the servers connect to
    sync_master_port: int = 0  # rendezvous port of the weight-update group; 0 = a free port
    bucket_bytes: int = DEFAULT_BUCKET_BYTES  # weight-sync bucket: export, request, broadcast round
    sync_dir: str = ""  # where "disk" sync writes safetensors ("" = a temporary directory)

    def validate(self) -> RolloutConfig:
        if self.engine not in ENGINES:
            raise RolloutConfigError(f"rollout.engine={self.engine!r}: one of {ENGINES}")
        if self.engine_cpus <= 0:
            raise RolloutConfigError(f"rollout.engine_cpus={self.engine_cpus}: must be > 0")
        if self.num_engines < 1 or self.tp_size < 1:
            raise RolloutConfigError(
                f"rollout.num_engines={self.num_engines}, rollout.tp_size={self.tp_size}: both must be >= 1"
            )
        if not 0 < self.mem_fraction_static <= 1:
            raise RolloutConfigError(f"rollout.mem_fraction_static={self.mem_fraction_static}: in (0, 1]")
        if self.sync_method not in SYNC_METHODS:
            raise RolloutConfigError(f"rollout.sync_method={self.sync_method!r}: one of {SYNC_METHODS}")
        if self.bucket_bytes <= 0 or self.batch_size < 1 or self.max_inflight < 0:
            raise RolloutConfigError(
                "rollout.bucket_bytes and batch_size must be positive, max_inflight >= 0 (0 = all at once)"
            )
        if self.device not in ("cpu", "cuda"):
            raise RolloutConfigError(f"rollout.device={self.device!r}: expected 'cpu' or 'cuda'")
        if self.engine == "sglang" and self.device == "cuda":
            self._check_gpu()
        return self

    def _check_gpu(self) -> None:
        """What a GPU job needs that the fields alone decide."""
        if not self.python:
            raise RolloutConfigError(
                "rollout.python: set the interpreter of the SGLang environment for engine=sglang, "
                "device=cuda (tools/setup_gpu_env.sh makes it; the actor's environment has no SGLang)"
            )
        if self.colocate and self.sync_method == "distributed":
            raise RolloutConfigError(
                "rollout.sync_method=distributed with rollout.colocate=true on GPUs: Megatron rank 0 and "
                "engine 0's first TP rank share a GPU, and NCCL refuses two ranks of one group on one GPU; "
                "use sync_method=tensor (CUDA IPC on the shared GPUs) or disk (shared storage)"
            )
        if not self.colocate and self.sync_method == "tensor":
            raise RolloutConfigError(
                "rollout.sync_method=tensor with rollout.colocate=false on GPUs: CUDA IPC handles only "
                "reach a process on the same GPUs; use sync_method=distributed (NCCL broadcast) or disk"
            )
        if self.sync_method == "disk" and not self.sync_dir:
            raise RolloutConfigError(
                "rollout.sync_method=disk on a cluster needs rollout.sync_dir on storage every node reads "
                "(the engines load what the trainer writes)"
            )

    @property
    def backend(self) -> str:
        return self.sync_backend or ("gloo" if self.device == "cpu" else "nccl")
