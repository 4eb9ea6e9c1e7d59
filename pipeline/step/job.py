"""The job the RL loop runs: its config, data, components and the state a checkpoint keeps.

`Job(cfg)` does everything before Ray: the start-up checks (`pipeline/preflight.py`: model,
tokenizer, layout, prompts; then the token budget against the longest prompt), the run directory,
and the reward worker processes (they start in the background); `job.start()` starts Ray, one Ray actor per Megatron rank and one per
rollout engine (each on its own placement bundles) and the colocated memory phases
(`pipeline/cluster/phases.py`: who holds the GPUs, the engines or the actor), then calls the hooks named in `trainer.hooks` (extension points; the tests install
their fault injection this way). `job.shutdown()` stops what `start` started, also after a start
that failed half-way.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import checkpoint, preflight, telemetry
from pipeline.algorithms import loss_needs
from pipeline.data import PromptSampler
from pipeline.errors import ConfigError
from pipeline.metrics import MetricsLogger
from pipeline.rewards import RewardPool

log = logging.getLogger("pipeline.train")


@dataclass
class RunState:
    """Counters and running statistics of the run (checkpointed with it)."""

    step: int = 0
    nan_streak: int = 0  # steps in a row with a non-finite loss or gradient
    group_counter: int = 0  # prompt groups generated so far (group ids)
    weight_version: int = 0  # of the weights the engines serve (set by each verified sync)
    dynamics: telemetry.RunningCorrelation = field(default_factory=telemetry.RunningCorrelation)
    law_points: list[tuple[float, float]] = field(default_factory=list)  # (eval entropy, eval reward)
    warned_long: bool = False  # a sample longer than the token budget was reported (once per run)


class Job:
    def __init__(self, cfg):
        from pipeline.algorithms import AdaptiveEntropyController

        inputs = preflight.check(cfg)  # model, tokenizer, layout, prompts: in seconds, before Ray
        check_budget(cfg.actor.max_tokens_per_micro_batch, inputs.train + inputs.eval)
        self.cfg, t = cfg, cfg.trainer
        self.run_dir = Path(t.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.adopt_config(cfg)  # refuses a resume whose config changed; keeps the old one
        random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.tokenizer, self.data_report = inputs.tokenizer, inputs.train_report
        self.eval_prompts = inputs.eval[: t.eval_prompts]
        self.sampler = PromptSampler(inputs.train, seed=t.seed)
        self.reward_pool = RewardPool(cfg.reward.fn, cfg.reward.workers, cfg.reward.timeout_s)
        self.needs = loss_needs(cfg.loss)  # current-policy statistics, a reference policy
        self.controller = (
            AdaptiveEntropyController(cfg.entropy_control) if cfg.entropy_control.enabled else None
        )
        self.state = RunState()
        self.metrics: MetricsLogger | None = None
        self.actors = self.rollout = self.layout = self.phases = None

    @property
    def step(self) -> int:
        return self.state.step

    def start(self) -> None:
        """Ray, the Megatron ranks and the engines; then the hooks of `trainer.hooks`."""
        from pipeline.cluster import placement
        from pipeline.cluster.actor_group import ActorGroup
        from pipeline.cluster.phases import MemoryPhases
        from pipeline.cluster.ray_env import init_ray
        from pipeline.cluster.rollout_group import RolloutGroup

        cfg, t = self.cfg, self.cfg.trainer

        def plan(gpus_per_node: int) -> placement.Layout:  # one Ray actor per engine, on its own bundles
            return placement.layout(
                t.world_size,
                cfg.rollout.num_engines,
                cfg.rollout.tp_size,
                colocate=cfg.rollout.colocate,
                gpus_per_node=gpus_per_node,
                actor_tp=cfg.actor.tp,
                engine_cpus=cfg.rollout.engine_cpus,
            )

        self.metrics = MetricsLogger(
            self.run_dir,
            tensorboard=t.tensorboard,
            wandb_project=t.wandb_project,
            config=dataclasses.asdict(cfg),
        )
        with tqdm(total=3, desc="starting Ray, Megatron ranks, engines", leave=False) as bar:
            local = plan(torch.cuda.device_count())
            cpus = t.ray_num_cpus or max(os.cpu_count() or 1, math.ceil(local.required_cpus))
            init_ray(t.ray_address, num_cpus=cpus)
            # GPUs as the Ray cluster has them (the driver itself may see none under srun --overlap)
            self.layout = placement.create(plan(placement.cluster_gpus_per_node()))
            for note in self.layout.notes:
                log.warning("placement differs from the plan: %s", note)
            bar.update(1)
            self.actors = ActorGroup(
                cfg.actor, cfg.actor.model_path, self.layout, reference=self.needs.reference
            )
            if cfg.rollout.colocate and cfg.actor.offload:
                self.actors.offload()  # the engines start on GPUs the actor has left
            bar.update(1)
            self.rollout = RolloutGroup(
                cfg.rollout,
                self.layout,
                seed=t.seed,
                eos_token_ids=[self.tokenizer.eos_token_id],
                log_dir=str(self.run_dir / "logs" / "rollout"),
            )
            self.phases = MemoryPhases(
                self.actors, self.rollout, colocate=cfg.rollout.colocate, offload=cfg.actor.offload
            )
            bar.update(1)
        for name in t.hooks:
            load_hook(name)(self)

    def shutdown(self) -> None:
        """Stop what was started (also after a start that failed half-way)."""
        import ray

        if self.metrics is not None:
            self.metrics.close()
        if self.rollout is not None:
            self.rollout.shutdown()
        if self.actors is not None:
            self.actors.shutdown()
        if self.layout is not None:
            ray.util.remove_placement_group(self.layout.pg)
        self.reward_pool.close()


def check_budget(budget: int | None, prompts) -> None:
    """Refuse a token budget that cannot hold the longest prompt (with no room for a response)."""
    if budget is None or not prompts:
        return
    longest = max(prompts, key=lambda p: len(p.input_ids))
    if budget <= len(longest.input_ids):
        raise ConfigError(
            f"actor.max_tokens_per_micro_batch={budget} cannot hold the longest prompt "
            f"({len(longest.input_ids)} tokens, {longest.source}) and its response; use at least "
            f"{len(longest.input_ids)} + trainer.max_response_tokens"
        )


def load_hook(name: str):
    """`package.module:function`, called with the started job."""
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr, None)
    except ImportError as e:
        raise ConfigError(f"trainer.hooks: cannot import {module!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"trainer.hooks: {module} has no callable {attr!r}")
    return fn
