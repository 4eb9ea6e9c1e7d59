"""The float64 reference of the vocab-parallel op, the hard cases every implementation must pass, and
the check of one case with its tolerances.

Used by the op's tests (both implementations) and by the node self-test
(`tools/selftest_vocab_parallel.py`), so that a user's GPU node is checked on exactly the cases, and
against exactly the tolerances, CI checks on CPU.
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


def case_errors(
    z_full,
    target,
    valid,
    temperature,
    dtype,
    rank,
    tp,
    group,
    *,
    impl="auto",
    influence=True,
    device="cpu",
    chunk=None,
    seed=0,
):
    """Run the op on this rank's shard of ``z_full`` (cast to ``dtype``, on ``device``) and return its
    max abs errors against float64 on the very same values: log-prob, entropy (, influence), and the
    gradients of ``logprob.sum()`` and of ``(logprob * a + entropy * b).sum()`` for random per-token
    ``a``, ``b`` (with the largest reference gradient, the scale of bf16 rounding)."""
    import pipeline.ops  # looked up at call time: the self-test's own test swaps the op

    v_local = z_full.shape[-1] // tp
    z_in = z_full.to(dtype)  # the values both the op and the reference see
    shard = z_in[..., rank * v_local : (rank + 1) * v_local].to(device).requires_grad_()
    out = pipeline.ops.vocab_parallel_logprob_entropy(
        shard,
        target.to(device),
        tp_group=group,
        temperature=temperature,
        valid_vocab_size=valid,
        influence=influence,
        impl=impl,
        chunk_elements=chunk,
    )
    zr = z_in.double().requires_grad_()
    r_lp, r_ent, r_inf = reference(zr, target, temperature, valid)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(target.shape, generator=gen, dtype=torch.float64)
    b = torch.randn(target.shape, generator=gen, dtype=torch.float64)
    errs = {
        "logprob": (out.logprob.double().cpu() - r_lp.detach()).abs().max().item(),
        "entropy": (out.entropy.double().cpu() - r_ent.detach()).abs().max().item(),
        "outputs_fp": [o.dtype for o in out if o is not None],
    }
    if out.influence is not None:
        errs["influence"] = (out.influence.double().cpu() - r_inf.detach()).abs().max().item()
    for name, (ours, ref) in {
        "grad_logprob_sum": (out.logprob.sum(), r_lp.sum()),
        "grad_mixed": (
            (out.logprob.double() * a.to(device) + out.entropy.double() * b.to(device)).sum(),
            (r_lp * a + r_ent * b).sum(),
        ),
    }.items():
        (g_ours,) = torch.autograd.grad(ours, shard, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, zr, retain_graph=True)
        full_ref = torch.zeros_like(z_in, dtype=torch.float64)
        full_ref[..., : g_ref.shape[-1]] = torch.nan_to_num(g_ref, posinf=0.0, neginf=0.0)
        ref_shard = full_ref[..., rank * v_local : (rank + 1) * v_local]
        errs[name] = (g_ours.double().cpu() - ref_shard).abs().max().item()
        errs[name + "_scale"] = ref_shard.abs().max().item()
        errs["grad_dtype"] = g_ours.dtype
    return errs


def tolerance_failures(errs, dtype) -> list[str]:
    """What in ``case_errors``'s result is out of tolerance (empty = pass). fp32 input: 1e-5 on values
    and gradients; bf16 input with fp32 accumulation: 1e-4 on values, gradients within bf16 rounding
    (2^-8 relative to the largest gradient); outputs fp32, gradients in the input dtype."""
    tol_val, tol_grad = (1e-5, 1e-5) if dtype == torch.float32 else (1e-4, None)
    bad = []
    for field in ("logprob", "entropy", "influence"):
        if field in errs and not errs[field] <= tol_val:
            bad.append(f"{field} error {errs[field]:.3g} > {tol_val}")
    for field in ("grad_logprob_sum", "grad_mixed"):
        tol = tol_grad if tol_grad is not None else 2**-8 * max(1.0, errs[field + "_scale"])
        if not errs[field] <= tol:
            bad.append(f"{field} error {errs[field]:.3g} > {tol:.3g}")
    if errs["outputs_fp"] != [torch.float32] * (3 if "influence" in errs else 2):
        bad.append(f"output dtypes {errs['outputs_fp']}")
    if errs["grad_dtype"] != dtype:
        bad.append(f"gradient dtype {errs['grad_dtype']} (input {dtype})")
    return bad
