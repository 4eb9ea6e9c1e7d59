"""The rollout side of the job as Ray actors: one actor per engine, on the engine's own bundle(s).

    rollout.engine = "local"   a `LocalEngineWorker` per engine (transformers in the actor's process;
                               the CPU demo's default). Prompts are split over them.
    rollout.engine = "sglang"  an `EngineServerActor` per engine on the engine's node, owning one
                               `sglang.launch_server` that sees exactly the engine's GPUs and listens
                               on the node's address; the SGLang client on the driver
                               (`SGLangEngine`: retries, restarts through the actors, sglang-router in
                               front of all engines, weight-sync control) talks to them over HTTP.

Weight sync does not pass through the driver: Megatron ranks stream the export generator's buckets
straight to the engines (`ActorGroup.sync_weights(rollout.sync_target(), version)`): into each
`LocalEngineWorker` through Ray's object store, or to the SGLang servers by `rollout.sync_method`
(CUDA IPC from the colocated ranks, an NCCL/gloo broadcast, or files on shared storage).

Memory, colocated (`release_memory` / `resume_memory`, by SGLang's tags "weights", "kv_cache",
"cuda_graph"): the servers start with `--enable-memory-saver` on GPUs, so a release gives the memory
back to the actor; released weights are gone (`needs_weight_sync`), and the next sync refills them.
"""

from __future__ import annotations

import os
import tempfile

import ray

from pipeline import preemption
from pipeline.cluster import placement
from pipeline.cluster.engine_actor import EngineServerActor, RemoteServer
from pipeline.rollout.base import RolloutAborted

ALL_TAGS = ("weights", "kv_cache", "cuda_graph")


@ray.remote
class LocalEngineWorker:
    """A `LocalEngine` in its own process; its generator state is checkpointed with the run."""

    def __init__(self, model_path: str, seed: int):
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        from pipeline.rollout import LocalEngine

        self.engine = LocalEngine.from_pretrained(model_path, seed=seed)

    def generate(self, prompts, params):
        return self.engine.generate(prompts, params)

    def logprobs(self, sequences, prompt_lens, temperature: float) -> list[list[float]]:
        return self.engine.logprobs(sequences, prompt_lens, temperature)

    def begin_weight_update(self) -> None:
        self.engine.begin_weight_update()

    def load_weights(self, bucket) -> None:
        self.engine.load_weights(bucket)

    def end_weight_update(self, version: int) -> None:
        self.engine.end_weight_update(version)

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()

    def get_state(self) -> list[int]:
        return self.engine.generator.get_state().tolist()

    def set_state(self, state: list[int]) -> None:
        import torch

        self.engine.generator.set_state(torch.tensor(state, dtype=torch.uint8))


def _absolute_paths(cfg):
    """`rollout.python` and `pythonpath` relative to this process's directory, made absolute."""
    from dataclasses import replace

    def fix(path: str) -> str:
        return os.path.abspath(path) if path and os.sep in path and not os.path.isabs(path) else path

    return replace(cfg, python=fix(cfg.python), pythonpath=[fix(p) for p in cfg.pythonpath])


class RolloutGroup:
    """The engines of the job; the trainer calls `generate`, `engine_logprobs`, memory and state verbs."""

    def __init__(
        self,
        cfg,
        lay: placement.Layout,
        *,
        seed: int,
        eos_token_ids: list[int],
        log_dir: str = "",
        start: bool = True,
    ):
        cfg = _absolute_paths(cfg)  # the engines' owners may run elsewhere (another node, cwd)
        self.cfg, self.kind, self.layout = cfg, cfg.engine, lay
        self.eos_token_ids = list(eos_token_ids)
        self._released: set[str] = set()  # SGLang memory tags given back (colocated phases)
        self.needs_weight_sync = False  # released weights: the next sync must refill them
        self.engine = None
        if cfg.engine == "local":
            self.workers = [
                LocalEngineWorker.options(**placement.engine_options(lay, e)).remote(cfg.model_path, seed + e)
                for e in range(len(lay.engines))
            ]
            ray.get([w.get_state.remote() for w in self.workers])  # surface start-up errors here
            return
        self.log_dir = cfg.log_dir or log_dir or tempfile.mkdtemp(prefix="sglang-logs-")
        base = placement.engine_port_base(cfg.base_port)
        memory_saver = cfg.device == "cuda" and cfg.colocate
        self.workers = [
            EngineServerActor.options(**placement.engine_options(lay, e)).remote(
                cfg,
                e,
                host=cfg.host or engine.host,
                port=engine.port,
                port_limit=base + placement.PORT_BLOCK - 1,
                log_dir=self.log_dir,
                gpus=engine.gpus if lay.gpus else None,
                memory_saver=memory_saver,
            )
            for e, engine in enumerate(lay.engines)
        ]
        if start:
            self.start()

    def start(self) -> None:
        """Start every engine's server (and the router in front of several); wait until healthy."""
        from pipeline.rollout.sglang_engine import SGLangEngine

        self.engine = SGLangEngine(
            self.cfg, eos_token_ids=self.eos_token_ids, servers=[RemoteServer(w) for w in self.workers]
        )
        self.engine.abort_check = preemption.requested  # a preemption aborts a running rollout
        self.urls = self.engine.engine_urls

    def server_specs(self) -> list[dict]:
        """Per engine: the command and added environment of its server, and where its owner runs."""
        specs = ray.get([w.spec.remote() for w in self.workers])
        where = ray.get([w.where.remote() for w in self.workers])
        return [{**s, **w} for s, w in zip(specs, where, strict=True)]

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params) -> list:
        """Samples in prompt order. Raises RolloutAborted when a preemption is requested meanwhile."""
        if self.engine is not None:
            return self.engine.generate(prompts, params)
        n = len(self.workers)
        size = -(-len(prompts) // n)
        parts = [prompts[i * size : (i + 1) * size] for i in range(n)]
        futures = [w.generate.remote(p, params) for w, p in zip(self.workers, parts, strict=True) if p]
        pending = list(futures)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            if pending and preemption.requested():
                raise RolloutAborted("rollout aborted: preemption requested")
        return [s for part in ray.get(futures) for s in part]

    def engine_logprobs(self, sequences, prompt_lens, temperature: float) -> list[list[list[float]]]:
        """Per engine, teacher-forced log-probs of the sequences' tokens after their prompts (what
        `check_weight_sync` compares with the actor's)."""
        if self.engine is not None:
            return self.engine.engine_logprobs(sequences, prompt_lens, temperature)
        return ray.get([w.logprobs.remote(sequences, prompt_lens, temperature) for w in self.workers])

    def metrics(self) -> dict:
        if self.engine is None:
            return {}
        return {k: v for k, v in self.engine.metrics.items() if k.startswith("rollout/")}

    # ---- weight sync: what the Megatron ranks stream into ---------------------------------------
    def sync_target(self) -> dict:
        if self.kind == "local":
            return {"kind": "local", "workers": self.workers}
        tp = self.cfg.tp_size
        return {
            "kind": "sglang",
            "cfg": self.cfg,
            "urls": self.urls,
            # colocated: engine e sits on the GPUs of ranks [e*tp, (e+1)*tp) (placement.check)
            "engine_ranks": [list(range(e * tp, (e + 1) * tp)) for e in range(len(self.urls))]
            if self.layout.colocate
            else None,
        }

    def weights_synced(self) -> None:
        self.needs_weight_sync = False

    # ---- colocated phases ---------------------------------------------------------------------
    def release_memory(self, tags: tuple[str, ...] = ALL_TAGS) -> None:
        """Give the engines' device memory back (`tags`); what is already released is skipped."""
        tags = tuple(t for t in tags if t not in self._released)
        if not tags:
            return
        if self.engine is not None:
            self.engine.release_memory(list(tags))
            if "weights" in tags and self.cfg.device == "cuda":
                self.needs_weight_sync = True  # the memory saver discards released weights
        else:
            ray.get([w.release_memory.remote() for w in self.workers])
        self._released.update(tags)

    def resume_memory(self, tags: tuple[str, ...] = ALL_TAGS) -> None:
        tags = tuple(t for t in tags if t in self._released)
        if not tags:
            return
        if self.engine is not None:
            self.engine.resume_memory(list(tags))
        else:
            ray.get([w.resume_memory.remote() for w in self.workers])
        self._released.difference_update(tags)

    # ---- checkpointed state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.kind != "local":
            return {}  # SGLang servers seed each request from the sampling params
        return {"generators": ray.get([w.get_state.remote() for w in self.workers])}

    def load_state_dict(self, state: dict) -> None:
        for w, s in zip(self.workers, state.get("generators", []), strict=False):
            ray.get(w.set_state.remote(s))

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()  # the router, then every server through its owner
        for w in self.workers:
            ray.kill(w)
