"""The RL job: rollout -> rewards -> dynamic sampling -> advantages -> old/ref log-probs -> updates
-> weight sync -> evaluation -> checkpoint, once per step, until `trainer.steps`.

    python -m pipeline train --config configs/demo_cpu.yaml [section.field=value ...]

The Megatron actor runs as one Ray actor per rank (`pipeline.cluster.actor_group`), the engines as
Ray actors of their own (`pipeline.cluster.rollout_group`), placed by `pipeline.cluster.placement`.
A run directory holds `metrics.jsonl`, TensorBoard events, `checkpoints/step_N/` and the resolved
config; the same command run again resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import checkpoint, preemption, preflight, telemetry
from pipeline.algorithms.controller import measure_entropy
from pipeline.batching import make_batch, split_rows
from pipeline.data import PromptSampler
from pipeline.filters import fill_batch
from pipeline.metrics import MetricsLogger
from pipeline.rewards import compute_rewards, load_reward_fn
from pipeline.rollout import RolloutAborted, Sample, SamplingParams, logprob_mismatch

log = logging.getLogger("pipeline.train")


class TrainingError(RuntimeError):
    """The run cannot continue; the message says why and what to change."""


class Trainer:
    def __init__(self, cfg):
        from pipeline.algorithms import AdaptiveEntropyController

        inputs = preflight.check(cfg)  # model, tokenizer, layout, prompts: in seconds, before Ray
        self.cfg, t = cfg, cfg.trainer
        self.run_dir = Path(t.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.tokenizer, self.data_report = inputs.tokenizer, inputs.train_report
        self.eval_prompts = inputs.eval[: t.eval_prompts]
        self.sampler = PromptSampler(inputs.train, seed=t.seed)
        self.reward_fn = load_reward_fn(cfg.reward.fn)
        self.controller = (
            AdaptiveEntropyController(cfg.entropy_control) if cfg.entropy_control.enabled else None
        )
        self.metrics = MetricsLogger(
            self.run_dir,
            tensorboard=t.tensorboard,
            wandb_project=t.wandb_project,
            config=dataclasses.asdict(cfg),
        )
        self.step, self.nan_streak, self.group_counter = 0, 0, 0
        self.weight_version = 0  # of the weights the engines serve (set by each verified sync)
        self.dynamics = telemetry.RunningCorrelation()  # predicted vs measured entropy change
        self.law_points: list[tuple[float, float]] = []  # (eval entropy, eval reward) per evaluation
        self._start_cluster()
        # [i14] Colocated, the engines hand the GPUs to the actor, which resumes (or keeps the HF
        # weights the engines loaded too), then take them back with the actor's weights synced and
        # checked: the first sync proves the mapping.
        self.phases.training()
        self._resume()
        self.phases.rollout(lambda: self.sync_weights(self.step), moved=True)

    def _start_cluster(self) -> None:
        from pipeline.cluster import placement
        from pipeline.cluster.actor_group import ActorGroup
        from pipeline.cluster.phases import MemoryPhases
        from pipeline.cluster.ray_env import init_ray
        from pipeline.cluster.rollout_group import RolloutGroup

        cfg, t = self.cfg, self.cfg.trainer

        def plan(gpus_per_node: int) -> placement.Layout:  # [i14] one Ray actor per engine
            return placement.layout(
                t.world_size,
                cfg.rollout.num_engines,
                cfg.rollout.tp_size,
                colocate=cfg.rollout.colocate,
                gpus_per_node=gpus_per_node,
                actor_tp=cfg.actor.tp,
                engine_cpus=cfg.rollout.engine_cpus,
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
                cfg.actor, cfg.actor.model_path, self.layout, reference=self.needs_reference
            )
            if cfg.rollout.colocate and cfg.actor.offload:
                self.actors.offload()  # [i14] the engines start on GPUs the actor has left
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

    @property
    def needs_reference(self) -> bool:
        loss = self.cfg.loss
        archer_kl = loss.method == "archer" and (
            loss.archer_kl_coef_low_entropy or loss.archer_kl_coef_high_entropy
        )
        return loss.kl_coef > 0 or bool(archer_kl)

    # ---- one RL step ---------------------------------------------------------------------------
    def generate(self, timings: dict) -> tuple[list[Sample], dict]:
        """Rollout + rewards, repeated until dynamic sampling has `prompts_per_step` informative groups."""
        t, cfg = self.cfg.trainer, self.cfg
        params = SamplingParams(
            max_new_tokens=t.max_response_tokens, temperature=cfg.actor.temperature, top_p=t.top_p
        )

        seen: list[float] = []  # accuracy of every sample generated, before the filter

        def one_round(_round: int):
            prompts = self.sampler.next(t.prompts_per_step)
            groups = list(range(self.group_counter, self.group_counter + len(prompts)))
            self.group_counter += len(prompts)
            k = t.samples_per_prompt
            samples = self.rollout.generate([p.input_ids for p in prompts for _ in range(k)], params)
            rewards = self._rewards(samples, [p.ground_truth for p in prompts for _ in range(k)])
            gids = [g for g in groups for _ in range(k)]
            for s, r, g in zip(samples, rewards, gids, strict=True):
                s.meta.update(reward=r, group=g)
            seen.extend(r.acc for r in rewards)
            return samples, gids, [r.acc for r in rewards]

        with timed(timings, "rollout"):
            samples, stats = fill_batch(
                one_round, t.prompts_per_step, t.max_gen_rounds, enabled=t.dynamic_sampling
            )
        out = {f"sampling/{k}": v for k, v in stats.items()}
        out.update(self.rollout.metrics())  # SGLang: rollout/{time_s,tokens_per_s,retries,engine_restarts}
        out["reward/acc_generated"] = sum(seen) / len(seen)  # the policy's accuracy, unfiltered
        # Samples from other weights than the last synced ones (an engine restarted mid-rollout
        # reloads its start-up checkpoint): they are off-policy by more than the ratio knows.
        stale = sum(s.weight_version != self.weight_version for s in samples)
        out["rollout/stale_samples"] = stale / max(len(samples), 1)
        if stale:
            log.warning(
                "%d of %d samples carry a weight version other than %d",
                stale,
                len(samples),
                self.weight_version,
            )
        return samples, out

    def _rewards(self, samples: list[Sample], truths: list[str]):
        texts = [self.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        return compute_rewards(
            self.cfg.reward,
            texts,
            truths,
            [len(s.response_ids) for s in samples],
            [s.truncated for s in samples],
            self.cfg.trainer.max_response_tokens,
            fn=self.reward_fn,
        )

    def make_batch(self, samples: list[Sample]) -> tuple[dict, dict]:
        """Advantages over whole groups, then the padded batch, trimmed to what the ranks can split."""
        from pipeline.algorithms import compute_advantages

        cfg, t = self.cfg, self.cfg.trainer
        batch = make_batch(
            samples,
            [0.0] * len(samples),
            pad_id=self.tokenizer.pad_token_id or 0,
            sample_ids=[self.step * 1_000_000 + i for i in range(len(samples))],
            mask_truncated=cfg.reward.overlong_filter,
        )
        scores = torch.tensor([s.meta["reward"].score for s in samples], dtype=torch.float32)
        groups = [s.meta["group"] for s in samples]
        if not bool(torch.isfinite(scores).all()):  # a reward function returned NaN/inf: skip the step
            return {}, {"reward/nonfinite": int((~torch.isfinite(scores)).sum())}
        batch["advantages"] = compute_advantages(cfg.advantage, scores, groups, batch["response_mask"])
        unit = self.cfg.actor.micro_batch_size * self.actors.dp_size * t.mini_batches_per_step
        keep = len(samples) // unit * unit
        if keep == 0:
            return {}, {"sampling/too_few_rows": len(samples)}
        batch = {k: v[:keep] for k, v in batch.items()}
        return batch, {"sampling/rows_dropped_to_fit": len(samples) - keep}

    def train_step(self) -> dict:
        t, cfg = self.cfg.trainer, self.cfg
        timings: dict = {}
        samples, out = self.generate(timings)
        batch, fit = self.make_batch(samples) if samples else ({}, {})
        out.update(fit)
        if not batch:
            log.warning("step %d: nothing to train on (%s)", self.step + 1, {**out, **fit})
            return {"skipped": 1, **out, **timings}
        mask = batch["response_mask"]
        watch = t.entropy_telemetry
        with timed(timings, "to_training"):
            self.phases.training()  # [i14] colocated: the engines give the GPUs to the actor
        with timed(timings, "old_log_prob"):
            old = self.actors.compute_log_prob(batch, entropy=True, influence=watch)
        batch["old_log_prob"] = old["log_prob"]
        if self.needs_reference:
            with timed(timings, "ref_log_prob"):
                batch["ref_log_prob"] = self.actors.compute_log_prob(
                    batch, entropy=False, weights="reference"
                )["log_prob"]
        loss_cfg = cfg.loss
        if self.controller is not None:
            loss_cfg = dataclasses.replace(cfg.loss, entropy_coef=self.controller.alpha())
        updates = []
        with timed(timings, "update"):
            for _epoch in range(t.epochs):
                for mb in split_rows(batch, t.mini_batches_per_step):
                    inject = self.step + 1 in t.inject_nan_at_steps
                    updates.append(self.actors.train_step(mb, loss_cfg, self.step, inject_nan=inject))
        ok = all(u.get("update_successful", True) and not u.get("nonfinite") for u in updates)
        self.nan_streak = 0 if ok else self.nan_streak + 1
        if ok:
            if self.controller is not None:  # one update per RL step, from the old policy's log-probs
                self.controller.update(measure_entropy(batch["old_log_prob"], mask))
            if watch:  # the same tokens under the updated policy: the entropy change that happened
                with timed(timings, "entropy_telemetry"):
                    new = self.actors.compute_log_prob(batch, entropy=True)
                out.update(self._dynamics(batch, old, new))
        elif watch:
            out.update(self._dynamics(batch, old, None))
        # [i14] The engines' turn again: new weights after an update; after a skipped step the same
        # version again only where the engines' released weights are gone (colocated GPUs).
        version = self.step + 1 if ok else self.weight_version
        with timed(timings, "weight_sync"):
            out.update(self.phases.rollout(lambda: self.sync_weights(version), moved=ok) or {})
        rewards = [s.meta["reward"] for s in samples]
        n = len(rewards)
        valid = mask.bool()
        out.update(
            {
                "reward/mean": sum(r.score for r in rewards) / n,
                "reward/acc": sum(r.acc for r in rewards) / n,
                "reward/format": sum(r.format_ok for r in rewards) / n,
                "reward/overlong_penalty": sum(r.overlong for r in rewards) / n,
                "response/length_mean": sum(len(s.response_ids) for s in samples) / n,
                "response/length_max": max(len(s.response_ids) for s in samples),
                "response/truncated": sum(s.truncated for s in samples) / n,
                **logprob_mismatch(
                    [batch["rollout_log_prob"][i][valid[i]].tolist() for i in range(len(valid))],
                    [old["log_prob"][i][valid[i]].tolist() for i in range(len(valid))],
                ),
                **{f"entropy/{k}": v for k, v in telemetry.token_quantiles(old["entropy"], mask).items()},
                "actor/skipped_nonfinite": int(not ok),
                **timings,
            }
        )
        out.update(_mean_metrics(updates, prefix="actor/"))
        if self.controller is not None:
            out.update({f"entropy_control/{k}": float(v) for k, v in self.controller.state_dict().items()})
            out["entropy_control/alpha_used"] = loss_cfg.entropy_coef
        return out

    def _dynamics(self, batch: dict, old: dict, new: dict | None) -> dict:
        """Covariance of log-prob and advantage, predicted vs measured entropy change (telemetry)."""
        mask = batch["response_mask"]
        out = {
            f"entropy_dynamics/cov_{k}": v
            for k, v in telemetry.covariance_stats(old["log_prob"], batch["advantages"], mask).items()
        }
        predicted = telemetry.predicted_entropy_change(
            batch["advantages"], old["influence"], mask, self.cfg.actor.lr
        )
        out["entropy_dynamics/predicted_change"] = predicted
        if new is not None:
            measured = telemetry.masked_mean(new["entropy"], mask) - telemetry.masked_mean(
                old["entropy"], mask
            )
            self.dynamics.add(predicted, measured)
            out["entropy_dynamics/measured_change"] = measured
            out["entropy_dynamics/pred_vs_measured_corr"] = self.dynamics.value()
        high = telemetry.entropy_groups(old["entropy"], mask)
        out["entropy_dynamics/high_entropy_share"] = telemetry.masked_mean(old["entropy"] * high, mask) / max(
            telemetry.masked_mean(old["entropy"], mask), 1e-12
        )  # the top fifth of tokens carries this share of the entropy
        return out

    # ---- weight sync ---------------------------------------------------------------------------
    def sync_weights(self, version: int) -> dict:
        """Stream the actor's weights (HF names) into the engines as `version`, then check a probe."""
        out = self.actors.sync_weights(
            self.rollout.sync_target(), version, self.cfg.trainer.sync_bucket_mb << 20
        )
        seqs, lens = self._probe()
        engine = self.rollout.logprobs(seqs, lens, self.cfg.actor.temperature)
        samples = [
            Sample(s[:n], s[n:], [0.0] * (len(s) - n), "stop", version)
            for s, n in zip(seqs, lens, strict=True)
        ]
        batch = self._padded(
            make_batch(samples, [0.0] * len(samples), pad_id=self.tokenizer.pad_token_id or 0)
        )
        actor = self.actors.compute_log_prob(batch, entropy=False)["log_prob"]
        diff = max(
            abs(a - float(b))
            for i, lp in enumerate(engine)
            for a, b in zip(lp, actor[i, : len(lp)], strict=True)
        )
        if not diff <= self.cfg.trainer.sync_tolerance:
            raise TrainingError(
                f"weight sync check failed at step {self.step}: engine and actor log-probs of the probe differ "
                f"by {diff:.3g} > trainer.sync_tolerance={self.cfg.trainer.sync_tolerance}; the export mapping "
                "or the engine's dtype is wrong"
            )
        self.weight_version = version
        return {**out, "sync/probe_max_abs_diff": diff, "sync/version": version}

    def _probe(self) -> tuple[list[list[int]], list[int]]:
        """A fixed probe: a few prompts each followed by its ground-truth answer and EOS."""
        prompts = (self.eval_prompts or self.sampler.prompts)[:4]
        eos = self.tokenizer.eos_token_id
        seqs = [
            p.input_ids + self.tokenizer(p.ground_truth, add_special_tokens=False)["input_ids"] + [eos]
            for p in prompts
        ]
        return seqs, [len(p.input_ids) for p in prompts]

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Accuracy and pass@k on the held-out prompts (fixed seed: comparable across steps)."""
        t = self.cfg.trainer
        if not self.eval_prompts:
            return {}
        k = t.eval_samples
        params = SamplingParams(
            max_new_tokens=t.max_response_tokens, temperature=t.eval_temperature, seed=t.seed
        )
        t0 = time.perf_counter()
        samples = self.rollout.generate([p.input_ids for p in self.eval_prompts for _ in range(k)], params)
        rewards = self._rewards(samples, [p.ground_truth for p in self.eval_prompts for _ in range(k)])
        accs = [r.acc for r in rewards]
        per_prompt = [accs[i * k : (i + 1) * k] for i in range(len(self.eval_prompts))]
        out = {
            "eval/acc": sum(accs) / len(accs),
            f"eval/pass@{k}": sum(max(a) for a in per_prompt) / len(per_prompt),
            "eval/reward": sum(r.score for r in rewards) / len(rewards),
            "eval/response_length": sum(len(s.response_ids) for s in samples) / len(samples),
        }
        if t.entropy_telemetry:  # the policy's entropy on its own eval responses, and the law's fit
            batch = self._padded(
                make_batch(samples, [0.0] * len(samples), pad_id=self.tokenizer.pad_token_id or 0)
            )
            ent = self.actors.compute_log_prob(batch, entropy=True)["entropy"][: len(samples)]
            out["eval/entropy"] = telemetry.masked_mean(ent, batch["response_mask"][: len(samples)])
            self.law_points.append((out["eval/entropy"], out["eval/reward"]))
            fit = telemetry.fit_entropy_law(*zip(*self.law_points, strict=True))
            if fit is not None:
                out.update({f"entropy_law/{k}": v for k, v in fit.items()})
        out["time/eval"] = time.perf_counter() - t0
        return out

    def _padded(self, batch: dict) -> dict:
        """`batch` with its last row repeated until the data-parallel ranks get equal shares."""
        unit = self.actors.dp_size * self.cfg.actor.micro_batch_size
        pad = (-batch["input_ids"].shape[0]) % unit
        if pad:
            batch = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in batch.items()}
        return batch

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> dict:
        t0 = time.perf_counter()
        root = self.run_dir / "checkpoints"
        path = checkpoint.begin(root, self.step)
        self.actors.save_checkpoint(
            str(path / "actor"), {"controller": self.controller.state_dict() if self.controller else None}
        )
        state = {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "rollout": self.rollout.state_dict(),
            "nan_streak": self.nan_streak,
            "group_counter": self.group_counter,
            "dynamics": self.dynamics.state_dict(),
            "law_points": self.law_points,
        }
        checkpoint.commit(root, self.step, state, keep_last=self.cfg.trainer.keep_checkpoints)
        return {"time/checkpoint": time.perf_counter() - t0}

    def _resume(self) -> bool:
        found = checkpoint.latest_complete(self.run_dir / "checkpoints")
        if found is None:
            return False
        step, path = found
        extra = self.actors.load_checkpoint(str(path / "actor"))
        state = checkpoint.read_trainer_state(path)
        self.sampler.load_state_dict(state["sampler"])
        self.rollout.load_state_dict(state["rollout"])
        self.nan_streak, self.group_counter = state["nan_streak"], state["group_counter"]
        self.dynamics.load_state_dict(state["dynamics"])
        self.law_points = [tuple(p) for p in state["law_points"]]
        if self.controller is not None and extra.get("controller"):
            self.controller.load_state_dict(extra["controller"])
        self.step = step
        self.weight_version = step  # [i14] the caller syncs this version into the engines
        self.metrics.truncate_after(step)
        log.info("resumed from %s (step %d)", path, step)
        print(f"[pipeline] resumed from {path} (step {step})", flush=True)
        return True

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> str:
        """Train until `trainer.steps`; returns "done", or "preempted" after a checkpoint on request."""
        t = self.cfg.trainer
        preemption.install()
        if self.step == 0:
            self.metrics.log(
                0,
                {
                    "data/prompts": self.data_report.kept,
                    "data/skipped_rows": sum(self.data_report.skipped.values()),
                },
            )
            if t.eval_every:
                try:
                    self.metrics.log(0, self.evaluate())
                except RolloutAborted:  # [i14] preemption during the first evaluation
                    return self._preempted()
        bar = tqdm(total=t.steps, initial=self.step, desc="RL steps", unit="step")
        try:
            while self.step < t.steps:
                try:
                    m = self.train_step()
                except RolloutAborted:  # [i14] a preemption request aborted the step's rollout
                    return self._preempted()
                if self.nan_streak > t.max_nan_steps:
                    raise TrainingError(
                        f"{self.nan_streak} steps in a row with a non-finite loss or gradient "
                        f"(trainer.max_nan_steps={t.max_nan_steps}): the model has diverged; lower actor.lr, "
                        "check the reward function and the data, or resume from an earlier checkpoint"
                    )
                if m.get("actor/skipped_nonfinite"):
                    log.warning(
                        "step %d: non-finite loss or gradient, update skipped (%d in a row)",
                        self.step + 1,
                        self.nan_streak,
                    )
                self.step += 1
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                    try:
                        m.update(self.evaluate())
                    except RolloutAborted:  # [i14] the evaluation is dropped; the step is checkpointed
                        log.warning("step %d: evaluation aborted by a preemption request", self.step)
                saved = t.checkpoint_every and (self.step % t.checkpoint_every == 0 or self.step == t.steps)
                if saved:
                    m.update(self.save())
                self.metrics.log(self.step, m)
                bar.set_postfix(
                    acc=f"{m.get('reward/acc', float('nan')):.2f}",
                    H=f"{m.get('entropy/mean', float('nan')):.3f}",
                )
                bar.update(1)
                if preemption.requested() and self.step < t.steps:
                    if not saved:
                        self.save()
                    log.warning("preemption requested: checkpointed step %d, exiting for requeue", self.step)
                    return "preempted"
        finally:
            bar.close()
            self.metrics.close()
        return "done"

    def _preempted(self) -> str:
        """[i14] Checkpoint the last complete step (unless it is) and report "preempted"."""
        found = checkpoint.latest_complete(self.run_dir / "checkpoints")
        if found is None or found[0] != self.step:
            self.save()
        log.warning("preemption requested: checkpointed step %d, exiting for requeue", self.step)
        return "preempted"

    def shutdown(self) -> None:
        import ray

        self.rollout.shutdown()
        self.actors.shutdown()
        ray.util.remove_placement_group(self.layout.pg)


# ---- small helpers ---------------------------------------------------------------------------------
@contextmanager
def timed(timings: dict, name: str):
    t = time.perf_counter()
    yield
    timings[f"time/{name}"] = time.perf_counter() - t


def _mean_metrics(rows: list[dict], prefix: str) -> dict:
    """Mean over the step's optimizer steps of every numeric metric the actor returned."""
    out = {}
    for k in rows[0] if rows else []:
        vals = [float(r[k]) for r in rows if isinstance(r.get(k), int | float)]
        if vals:
            out[prefix + k] = sum(vals) / len(vals)
    return out
