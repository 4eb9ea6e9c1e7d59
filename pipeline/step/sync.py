"""sync: the engines serve the actor's weights, and a probe proves it.

Megatron rank 0 streams the export generator's buckets (HF names, TP/PP gathered, `rollout.bucket_bytes`
each) straight into the engines as weight version `version` (colocated SGLang with `sync_method:
tensor`: every rank hands the engine on its GPU each bucket over CUDA IPC); then every engine's
teacher-forced log-probs of a fixed probe (a few held-out prompts with their answers) must equal the
actor's within `trainer.sync_tolerance` (`pipeline.rollout.verify.check_weight_sync`, the check the
tests use too).
"""

from __future__ import annotations

from pipeline.batch import Batch
from pipeline.metrics import timed
from pipeline.rollout import Sample, check_weight_sync


def sync(job, m: dict | None = None, version: int | None = None) -> dict:
    """Stream the weights as `version` (default: the step just trained), check the probe, log to `m`."""
    version = job.step if version is None else version
    out: dict = {}
    with timed(out, "weight_sync"):
        out.update(job.actors.sync_weights(job.rollout.sync_target(), version, job.cfg.rollout.bucket_bytes))
        seqs, lens = _probe(job)
        samples = [
            Sample(s[:n], s[n:], [0.0] * (len(s) - n), "stop", version)
            for s, n in zip(seqs, lens, strict=True)
        ]
        batch = Batch.from_samples(samples)
        actor = job.actors.compute_log_prob(batch, entropy=False)["log_prob"][batch.loss_mask.bool()]
        actor = [part.tolist() for part in actor.split([len(s) - n for s, n in zip(seqs, lens)])]
        diff = check_weight_sync(
            job.rollout,
            seqs,
            lens,
            actor,
            tolerance=job.cfg.trainer.sync_tolerance,
            temperature=job.cfg.actor.temperature,
            version=version,
        )
    job.state.weight_version = version
    out.update({"sync/probe_max_abs_diff": diff, "sync/version": version})
    if m is not None:
        m.update(out)
    return out


def _probe(job) -> tuple[list[list[int]], list[int]]:
    """A fixed probe: a few prompts each followed by its ground-truth answer and EOS."""
    prompts = (job.eval_prompts or job.sampler.prompts)[:4]
    eos = job.tokenizer.eos_token_id
    seqs = [
        p.input_ids + job.tokenizer(p.ground_truth, add_special_tokens=False)["input_ids"] + [eos]
        for p in prompts
    ]
    return seqs, [len(p.input_ids) for p in prompts]
