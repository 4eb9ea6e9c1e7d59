"""The float64 reference of the vocab-parallel op and the hard cases every implementation must pass.

Used by the op's tests (both implementations) and by the node self-test
(`tools/selftest_vocab_parallel.py`), so that a user's GPU node is checked on exactly the cases CI
checks on CPU.
"""

from __future__ import annotations

import torch


def reference(z: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, valid: int | None = None):
    """float64 (log p(target), entropy, influence) on the full (gathered) logits ``[..., V]``."""
    z = z.double()
    if valid is not None:
        z = z[..., :valid]
    x = z / temperature
    lp = torch.log_softmax(x, -1)
    p = lp.exp()
    lp0 = torch.where(p > 0, lp, torch.zeros_like(lp))  # 0 * log 0 = 0
    ent = -(p * lp0).sum(-1)
    lpy = lp.gather(-1, target[..., None]).squeeze(-1)
    infl = lpy.exp() * (lpy + ent) - (p * p * (lp0 + ent[..., None])).sum(-1)
    return lpy, ent, infl


def hard_cases(n: int = 12, vocab: int = 96, max_tp: int = 4, seed: int = 1234):
    """Named cases ``(name, logits float64 [n, vocab], target [n], valid_vocab_size, temperature)``.

    ``vocab`` must be divisible by ``max_tp``; shard boundaries are those of every TP size dividing
    ``max_tp``. Every row has at least one finite logit (rows without any are tested on their own).
    """
    if vocab % max_tp or vocab < 4 * max_tp:
        raise ValueError(f"hard_cases: vocab {vocab} must be a multiple of max_tp {max_tp}, >= {4 * max_tp}")
    g = torch.Generator().manual_seed(seed)
    v, q = vocab, vocab // max_tp
    cases = []

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def tgt(hi=v):
        return torch.randint(0, hi, (n,), generator=g)

    cases.append(("random", randn(n, v, scale=3.0), tgt(), None, 1.0))
    big = randn(n, v, scale=2.0) + 1e4
    big[: n // 2] -= 2e4  # +-1e4 offsets: max shifting and the cancellation in H
    cases.append(("magnitude_1e4", big, tgt(), None, 1.0))
    onehot = randn(n, v) * 0.1
    t = tgt()
    onehot[torch.arange(n), t] += 60.0  # H ~ 0, logp ~ 0
    t2 = t.clone()
    t2[::2] = (t2[::2] + 7) % v  # and targets far in the tail: logp ~ -60
    cases.append(("one_hot_like", onehot, t2, None, 1.0))
    cases.append(("uniform", torch.full((n, v), 0.5, dtype=torch.float64), tgt(), None, 1.0))
    cases.append(("vocab_padding", randn(n, v, scale=2.0), tgt(v - 13), v - 13, 1.0))
    cases.append(("padding_fills_last_rank", randn(n, v, scale=2.0), tgt(q - 3), q - 3, 1.0))
    cases.append(("temperature_0.6", randn(n, v, scale=2.0), tgt(), None, 0.6))
    last = torch.full((n,), v - 1)
    last[::3] = v - 2  # targets on the last rank, incl. the last id
    cases.append(("target_on_last_rank", randn(n, v, scale=2.0), last, None, 1.0))
    edges = sorted({e for r in range(1, max_tp + 1) for e in (r * q - 1, r * q % v)})
    boundary = torch.tensor((edges * n)[:n])
    cases.append(("shard_boundaries", randn(n, v, scale=2.0), boundary, None, 1.0))
    neg = randn(n, v, scale=2.0)
    neg[:, 5 : 40 * v // 96 : 3] = float("-inf")  # masked-out vocabulary entries
    tn = tgt()
    tn = torch.where(torch.isneginf(neg.gather(1, tn[:, None]).squeeze(1)), torch.full_like(tn, 4), tn)
    cases.append(("neg_inf_entries", neg, tn, None, 1.0))
    half = randn(n, v, scale=2.0)
    half[::2, : v // 2] = float("-inf")  # every other row: the first half of the vocab (whole shards) masked
    th = tgt(v // 2) + v // 2
    cases.append(("masked_shards", half, th, None, 1.0))
    return cases
