"""`TrainerConfig`: the RL loop's own knobs (batch shape, schedule of eval/checkpoints, Ray, sync)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import ConfigError
from pipeline.rollout.verify import SYNC_TOLERANCE


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    run_dir: str = "runs/demo"  # metrics.jsonl, tensorboard/, checkpoints/, config.json
    make_tiny_model_dir: str | None = None  # CPU recipes: make the tiny model here first if missing
    make_tiny_model_args: list[str] = field(default_factory=list)  # its options, e.g. [--task, countdown]
    steps: int = 40  # RL steps (rollout + updates + sync)
    prompts_per_step: int = 16  # prompt groups trained on per step (after dynamic sampling)
    samples_per_prompt: int = 8  # responses per prompt (GRPO group size)
    max_response_tokens: int = 24  # generation limit (truncated responses: finish_reason "length")
    top_p: float = 1.0  # rollout nucleus sampling (1.0 keeps log-probs exact for the loss)
    mini_batches_per_step: int = 1  # optimizer steps per RL step per epoch (1 = on-policy)
    epochs: int = 1  # passes over the step's batch
    dynamic_sampling: bool = True  # DAPO: keep only groups whose accuracies differ
    max_gen_rounds: int = 4  # rollout rounds per step before training on a partial batch (with a warning)
    world_size: int = 2  # Megatron ranks (= actor.tp x actor.pp x data-parallel size)
    eval_every: int = 10  # steps between evaluations (0 = never)
    eval_prompts: int = 100  # held-out prompts per evaluation
    eval_samples: int = 4  # samples per eval prompt: accuracy and pass@k
    eval_temperature: float = 1.0  # sampling temperature at evaluation
    checkpoint_every: int = 20  # steps between checkpoints (0 = never); else the last step saves too
    keep_checkpoints: int = 2  # checkpoints kept (the newest that pass the resume check; 0 = all)
    allow_config_change: bool = (
        False  # resume even if the config changed (old one kept as config.step_N.json)
    )
    max_nan_steps: int = 3  # steps in a row with a non-finite loss or gradient tolerated; one more stops
    sync_tolerance: float = SYNC_TOLERANCE  # max |engine - actor| log-prob of the probe, every engine
    ray_address: str | None = None  # None = a private Ray instance on 127.0.0.1; else join it
    ray_num_cpus: int | None = None  # CPUs of the private Ray instance (None = all, at least the placement's)
    entropy_telemetry: bool = True  # covariance, predicted vs measured entropy change, R = -a e^H + b fit
    tensorboard: bool = True
    wandb_project: str | None = None  # W&B project; None = off
    seed: int = 0  # prompt order, rollout and eval sampling (data, actor, loss have seeds of their own)
    hooks: list[str] = field(default_factory=list)  # "module:function"s called with the started job (tests)

    def validate(self) -> None:
        for name in (
            "steps",
            "prompts_per_step",
            "samples_per_prompt",
            "max_response_tokens",
            "mini_batches_per_step",
            "epochs",
            "world_size",
            "max_gen_rounds",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}={getattr(self, name)}: must be >= 1")
        rows = self.prompts_per_step * self.samples_per_prompt
        if self.mini_batches_per_step > rows:
            raise ConfigError(
                f"trainer.mini_batches_per_step={self.mini_batches_per_step}: at most prompts_per_step x "
                f"samples_per_prompt = {rows} (a mini-batch needs samples)"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"trainer.top_p={self.top_p}: must be in (0, 1]")
