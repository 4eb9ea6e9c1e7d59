"""log_probs: the old policy's log-probs and entropies of the batch (and the reference policy's).

One no-grad forward of the actor (packed, vocab-parallel) over the whole step batch, before any update:
`old_log_prob` and `old_entropy` go into the batch (the first mini-batch's loss reuses them as the
current policy's), the entropy influence stays with the telemetry. The reference policy (when the
loss needs one) is the initial weights, swapped in for one forward. Logged: the engine-vs-actor
log-prob mismatch on the trained tokens and the entropy distribution.
"""

from __future__ import annotations

from pipeline import telemetry
from pipeline.batch import Batch
from pipeline.metrics import timed
from pipeline.rollout import logprob_mismatch


def log_probs(job, batch: Batch, m: dict) -> tuple[Batch, dict]:
    """(the batch with old (and reference) log-probs, the old forward's outputs: log_prob, entropy[, influence])."""
    with timed(m, "old_log_prob"):
        old = job.actors.compute_log_prob(batch, entropy=True, influence=job.cfg.trainer.entropy_telemetry)
    batch = batch.replace(old_log_prob=old["log_prob"], old_entropy=old["entropy"])
    if job.needs.reference:
        with timed(m, "ref_log_prob"):
            ref = job.actors.compute_log_prob(batch, entropy=False, weights="reference")["log_prob"]
        batch = batch.replace(ref_log_prob=ref)
    mask = batch.loss_mask.bool()
    m.update(logprob_mismatch([batch.rollout_log_prob[mask].tolist()], [old["log_prob"][mask].tolist()]))
    m.update({f"entropy/{k}": v for k, v in telemetry.token_quantiles(old["entropy"], mask).items()})
    return batch, old
