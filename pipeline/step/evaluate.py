"""evaluate: accuracy and pass@k on the held-out prompts (a fixed sampling seed, so steps compare),
and with the entropy telemetry the policy's entropy on its own responses and the fit of
R = -a exp(H) + b over the run's evaluations."""

from __future__ import annotations

import time

from pipeline import telemetry
from pipeline.batch import Batch
from pipeline.rollout import SamplingParams
from pipeline.step.score import score


def evaluate(job, m: dict) -> None:
    t = job.cfg.trainer
    if not job.eval_prompts:
        return
    t0 = time.perf_counter()
    k = t.eval_samples
    params = SamplingParams(max_new_tokens=t.max_response_tokens, temperature=t.eval_temperature, seed=t.seed)
    samples = job.rollout.generate([p.input_ids for p in job.eval_prompts for _ in range(k)], params)
    rewards = score(job, samples, [p.ground_truth for p in job.eval_prompts for _ in range(k)])
    accs = [r.acc for r in rewards]
    per_prompt = [accs[i * k : (i + 1) * k] for i in range(len(job.eval_prompts))]
    m.update(
        {
            "eval/acc": sum(accs) / len(accs),
            f"eval/pass@{k}": sum(max(a) for a in per_prompt) / len(per_prompt),
            "eval/reward": sum(r.score for r in rewards) / len(rewards),
            "eval/response_length": sum(len(s.response_ids) for s in samples) / len(samples),
        }
    )
    if t.entropy_telemetry:
        batch = Batch.from_samples(samples)
        ent = job.actors.compute_log_prob(batch, entropy=True)["entropy"]
        m["eval/entropy"] = telemetry.masked_mean(ent, batch.loss_mask)
        job.state.law_points.append((m["eval/entropy"], m["eval/reward"]))
        fit = telemetry.fit_entropy_law(*zip(*job.state.law_points, strict=True))
        if fit is not None:
            m.update({f"entropy_law/{k}": v for k, v in fit.items()})
    m.update(job.reward_pool.metrics("eval/reward_"))
    m["time/eval"] = time.perf_counter() - t0
