"""The rollout side of the job as Ray actors: in-process engines, or the owner of the SGLang servers.

    rollout.engine = "local"   one `LocalEngineWorker` per engine (transformers in the actor's
                               process; the CPU demo's default). Prompts are split over them.
    rollout.engine = "sglang"  one `SGLangWorker` that starts `rollout.num_engines` SGLang servers
                               (and sglang-router in front of several) on its node and owns their
                               lifecycle: restarts, resubmission, memory release (pipeline.rollout).

Weight sync does not pass through the driver: Megatron rank 0 streams the export generator's
buckets straight to the engines (`ActorGroup.sync_weights(rollout.sync_target(), version)`) —
into each `LocalEngineWorker` through Ray's object store, or to the SGLang servers over the
configured transport (`rollout.sync_method`: NCCL/gloo broadcast, tensor handles, disk).
"""

from __future__ import annotations

import os
from dataclasses import replace

import ray
import torch

from pipeline.cluster import placement
from pipeline.rollout import RolloutConfig, Sample, SamplingParams


@ray.remote
class LocalEngineWorker:
    """A `LocalEngine` in its own process; its generator state is checkpointed with the run."""

    def __init__(self, model_path: str, seed: int):
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        from pipeline.rollout import LocalEngine

        self.engine = LocalEngine.from_pretrained(model_path, seed=seed)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        return self.engine.generate(prompts, params)

    def logprobs(self, sequences, prompt_lens, temperature: float) -> list[list[float]]:
        return self.engine.logprobs(sequences, prompt_lens, temperature)

    def begin_weight_update(self) -> None:
        self.engine.begin_weight_update()

    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
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
        self.engine.generator.set_state(torch.tensor(state, dtype=torch.uint8))


@ray.remote
class SGLangWorker:
    """Owns an `SGLangEngine` (its servers run on this actor's node, in their own process groups)."""

    def __init__(self, cfg: RolloutConfig, eos_token_ids: list[int], gpu_ids: list[int] | None):
        from pipeline.rollout import SGLangEngine

        if gpu_ids is not None:  # the servers use exactly the GPUs of this engine's bundles
            cfg = replace(cfg, env={**cfg.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids))})
        self.engine = SGLangEngine(cfg, eos_token_ids=eos_token_ids)

    def urls(self) -> list[str]:
        return self.engine.engine_urls

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        return self.engine.generate(prompts, params)

    def logprobs(self, sequences, prompt_lens, temperature: float) -> list[list[float]]:
        return self.engine.logprobs(sequences, prompt_lens, temperature)

    def metrics(self) -> dict:
        """The last rollout's numbers (SGLangEngine keeps sync numbers there too: left out)."""
        return {k: v for k, v in self.engine.metrics.items() if k.startswith("rollout/")}

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()

    def shutdown(self) -> None:
        self.engine.shutdown()


@ray.remote(num_gpus=0.01, num_cpus=0)
def _gpu_ids() -> list[int]:
    return [int(i) for i in ray.get_gpu_ids()]


class RolloutGroup:
    """The engines of the job; the trainer calls `generate`, `logprobs`, memory and state verbs."""

    def __init__(
        self,
        cfg: RolloutConfig,
        pg,
        plan: placement.Plan,
        *,
        seed: int,
        eos_token_ids: list[int],
    ):
        self.cfg = cfg
        self.kind = cfg.engine
        if cfg.engine == "local":
            self.workers = [
                LocalEngineWorker.options(
                    num_cpus=plan.engine_cpus,
                    num_gpus=0,
                    scheduling_strategy=placement.in_bundle(pg, bundles[0]),
                ).remote(cfg.model_path, seed + e)
                for e, bundles in enumerate(plan.engine_bundles)
            ]
            ray.get([w.get_state.remote() for w in self.workers])  # surface start-up errors here
        else:
            bundles = [b for group in plan.engine_bundles for b in group]
            gpu_ids = None
            if plan.engine_gpus:
                gpu_ids = [
                    i
                    for b in bundles
                    for i in ray.get(
                        _gpu_ids.options(scheduling_strategy=placement.in_bundle(pg, b)).remote()
                    )
                ]
            owner = SGLangWorker.options(
                num_cpus=plan.engine_cpus,
                num_gpus=0,  # the servers are subprocesses; their GPUs are the bundles' (gpu_ids)
                scheduling_strategy=placement.in_bundle(pg, bundles[0]),
            )
            self.workers = [owner.remote(cfg, eos_token_ids, gpu_ids)]
            self.urls = ray.get(self.workers[0].urls.remote())

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """Samples in prompt order; with several local engines the prompts are split evenly."""
        n = len(self.workers)
        size = -(-len(prompts) // n)
        parts = [prompts[i * size : (i + 1) * size] for i in range(n)]
        futures = [w.generate.remote(p, params) for w, p in zip(self.workers, parts, strict=True) if p]
        return [s for part in ray.get(futures) for s in part]

    def logprobs(self, sequences, prompt_lens, temperature: float) -> list[list[float]]:
        return ray.get(self.workers[0].logprobs.remote(sequences, prompt_lens, temperature))

    def metrics(self) -> dict:
        return ray.get(self.workers[0].metrics.remote()) if self.kind == "sglang" else {}

    # ---- weight sync: what Megatron rank 0 streams into ---------------------------------------
    def sync_target(self) -> dict:
        if self.kind == "local":
            return {"kind": "local", "workers": self.workers}
        return {"kind": "sglang", "cfg": self.cfg, "urls": self.urls}

    # ---- colocated phases ---------------------------------------------------------------------
    def release_memory(self) -> None:
        ray.get([w.release_memory.remote() for w in self.workers])

    def resume_memory(self) -> None:
        ray.get([w.resume_memory.remote() for w in self.workers])

    # ---- checkpointed state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.kind != "local":
            return {}  # SGLang servers seed each request from the sampling params
        return {"generators": ray.get([w.get_state.remote() for w in self.workers])}

    def load_state_dict(self, state: dict) -> None:
        for w, s in zip(self.workers, state.get("generators", []), strict=False):
            ray.get(w.set_state.remote(s))

    def shutdown(self) -> None:
        if self.kind == "sglang":
            ray.get([w.shutdown.remote() for w in self.workers])
        for w in self.workers:
            ray.kill(w)
