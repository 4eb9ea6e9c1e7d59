"""Log-prob, entropy and entropy influence of the sampled token, on vocab-sharded logits.

Each tensor-parallel rank holds a contiguous slice of the vocabulary (Megatron layout: rank r holds
ids ``[r * V_local, (r + 1) * V_local)``). Per token we need, over the *whole* vocabulary,

    lse = log sum_a exp(x_a)        x = z / T (logits at the sampling temperature)
    mu  = E_p[x] = sum_a p_a x_a    p = softmax(x)
    H   = lse - mu                  (full-vocabulary entropy)
    logp_y = x_y - lse

One pass over the local shard computes, per token and in fp32, the local max ``m`` and the shifted
moments ``s0 = sum e``, ``s1 = sum e * (x - m)`` (``e = exp(x - m)``; keeping ``s1`` relative to the
running max avoids the cancellation of ``max + log(sum) - sum(p * z)`` at large |logits|). Ranks merge
with exactly two collectives: an all-reduce MAX of ``m`` and one all-reduce SUM of the moments
rescaled to the global max, packed in one ``[N, k]`` tensor. Backward needs no communication: from
the saved per-token ``lse`` and ``mu`` each rank recomputes ``p`` on its shard and writes

    d x_j = g_logp * ([j == y] - p_j) - g_H * p_j * (x_j - mu),     d z_j = d x_j / T

in the input dtype. Saved for backward: three fp32 scalars per token (plus references to the inputs).

Two implementations of the two passes over the shard (``impl``), sharing everything else (the
collectives, the O(tokens) finish, the saved statistics): chunked torch ops here (any device; chunks
of tokens so that no fp32 copy of a whole bf16 shard is ever made), and one-pass Triton kernels in
``vocab_parallel_triton`` (CUDA; on CPU through Triton's interpreter, for tests).

Entropy influence. For a softmax policy whose logits are the parameters, one plain policy-gradient
step on the sampled token y with advantage A and step size eta moves the logits by
``dz = eta * A * (e_y - p)`` (the gradient of log p_y). To first order the entropy changes by
``dH = sum_a (dH/dz_a) dz_a`` with ``dH/dz_a = -p_a (log p_a + H)``, so

    dH ~= -eta * A * [ p_y (log p_y + H) - sum_a p_a^2 (log p_a + H) ] = -eta * A * influence.

The bracket is ``Cov_{a~p}(log p_a, e_y - p)`` — the covariance of the entropy-mechanism paper
(arXiv 2505.22617, section 3) for this one token. It needs two more moments, ``s2 = sum e^2`` and
``s3 = sum e^2 (x - m)``: with ``P = sum p^2 = S2 / S0^2``,
``sum p^2 log p = (S3 - S2 log S0) / S0^2`` (moments relative to the global max). It is returned
without gradient (a telemetry quantity).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import NamedTuple

import torch
import torch.distributed as dist

IMPLS = ("auto", "torch", "triton")

# Shifted logits are clamped here: exp() of it is exactly 0 in fp32 and fp64, like exp(-inf), but
# e * x is then 0 instead of NaN, and g * x stays finite for any upstream gradient |g| < 2^64. No
# finite logit that far below the row max has a representable probability, so nothing else changes.
_FLOOR = -(2.0**64)


class LogProbEntropy(NamedTuple):
    """Per-token results; a field that was not asked for is None."""

    logprob: torch.Tensor | None
    entropy: torch.Tensor | None
    influence: torch.Tensor | None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_elements(device: torch.device, n_rows: int, v_local: int) -> int:
    """Elements of one fp32 working chunk (rows x V_local) of the torch path, by device and shape.

    CPU: 2^17 elements (512 KiB): the chunk's several elementwise passes stay in a 1 MiB L2; 2^19
    falls off a cliff there (docs/benchmarks.md, finding 5). GPU: each chunk costs ~12 kernel launches,
    so a chunk must be large enough for its kernels to run longer than their launch (>= 2^20
    elements), at most 2^24 (64 MiB fp32; nothing gained beyond), and at most an eighth of the shard so
    that the ~3 fp32 working buffers stay below one bf16 gradient buffer (1.5 vs 2 bytes per element).
    """
    if device.type == "cpu":
        return 1 << 17
    return max(1 << 20, min(1 << 24, n_rows * v_local // 8))


def _rows_per_chunk(n_rows: int, v_local: int, chunk_elements: int) -> int:
    return max(1, min(n_rows, chunk_elements // max(v_local, 1)))


def _shifted_chunk(logits, lo, hi, n_valid, inv_temp, shift, cdt):
    """(z - shift) / T for rows [lo, hi) of the valid columns, in the compute dtype, as a new buffer,
    with -inf (masked) logits at `_FLOOR`.

    Shifting before scaling keeps the difference of two large logits exact (Sterbenz), so a row at
    +1e4 loses nothing to the rounding of z / T.
    """
    z = logits[lo:hi, :n_valid]
    x = torch.sub(z, shift[:, None]) if z.dtype == cdt else z.to(cdt).sub_(shift[:, None])
    if inv_temp != 1.0:
        x.mul_(inv_temp)
    return x.clamp_(min=_FLOOR)


def _dot_rows(a, b):
    """Row-wise dot product of two [rows, V] chunks.

    `torch.linalg.vecdot` reduces with pairwise (blocked) summation: on a 4096 x 16384 fp32 shard it
    is 5-6x faster than `torch.bmm` of [rows, 1, V] x [rows, V, 1] (14 vs 79 ms per pass on the
    project's CPU) and gives the 16,384-term moment an error of 1e-6 instead of 2e-5
    (docs/benchmarks.md, finding 2). Its product temporary is one chunk, like the chunk itself.
    """
    return torch.linalg.vecdot(a, b, dim=-1)


def _local_moments(logits, local_target, n_valid, inv_temp, want_influence, chunk_elements):
    """One pass over this rank's valid columns: local max and shifted moments per token (torch path).

    Returns (m [N] raw max logit, moments [N, k]) with moments = (s0, s1, z_y[, s2, s3]) for
    x = (z - m) / T (m where finite, else 0): s0 = sum e, s1 = sum e x, s2 = sum e^2,
    s3 = sum e^2 x (e = exp x); z_y is the raw target logit if it lies in this shard, else 0.
    Rows where this shard has no finite logit get m = -inf and zero moments. No host
    synchronisation: the loop's bounds depend only on shapes.
    """
    n = logits.shape[0]
    cdt = _compute_dtype(logits.dtype)
    k = 5 if want_influence else 3
    dev = logits.device
    m = torch.full((n,), float("-inf"), dtype=cdt, device=dev)
    mom = torch.zeros((n, k), dtype=cdt, device=dev)
    if n_valid == 0 or n == 0:
        return m, mom
    in_shard = (local_target >= 0) & (local_target < n_valid)
    safe_t = torch.where(in_shard, local_target, torch.zeros_like(local_target))
    zy = logits.gather(1, safe_t[:, None]).squeeze(1).to(cdt)
    mom[:, 2] = torch.where(in_shard, zy, torch.zeros_like(zy))
    rows = _rows_per_chunk(n, n_valid, chunk_elements)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        mc = logits[lo:hi, :n_valid].amax(dim=1).to(cdt)
        m[lo:hi] = mc
        shift = torch.where(torch.isfinite(mc), mc, torch.zeros_like(mc))
        x = _shifted_chunk(logits, lo, hi, n_valid, inv_temp, shift, cdt)  # <= 0
        e = torch.exp(x)
        mom[lo:hi, 0] = e.sum(dim=1)
        mom[lo:hi, 1] = _dot_rows(e, x)
        if want_influence:
            e2 = e.square_()
            mom[lo:hi, 3] = e2.sum(dim=1)
            mom[lo:hi, 4] = _dot_rows(e2, x)
        del x, e
    return m, mom


def _merge(m, mom, inv_temp, tp_group):
    """Two collectives: MAX of the local maxima, then one packed SUM of the rescaled moments."""
    distributed = tp_group is not None and dist.get_world_size(tp_group) > 1
    m_global = m.clone()
    if distributed:
        dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=tp_group)
    finite = torch.isfinite(m) & torch.isfinite(m_global)
    d = torch.where(finite, (m - m_global) * inv_temp, torch.zeros_like(m))  # <= 0
    a = torch.exp(d)
    out = torch.empty_like(mom)
    out[:, 0] = a * mom[:, 0]
    out[:, 1] = a * (mom[:, 1] + d * mom[:, 0])
    out[:, 2] = mom[:, 2]
    if mom.shape[1] == 5:
        a2 = a * a
        out[:, 3] = a2 * mom[:, 3]
        out[:, 4] = a2 * (mom[:, 4] + d * mom[:, 3])
    if distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=tp_group)
    return m_global, out


def _finish(m_global, s, inv_temp, want_influence):
    """Per-token outputs from the merged sums, and the statistics the backward needs.

    A row whose every valid logit is -inf (on all ranks) has no distribution: its log-prob, entropy
    and influence are NaN, and its gradient is zero (every logit is -inf, and -inf logits get none).
    Its statistics are set so that both backward paths compute p = 0 there without a branch.
    """
    s0 = s[:, 0]
    dead = s0 == 0
    log_s0 = torch.log(s0)
    mean_shift = s[:, 1] / s0  # E_p[x] - M / T
    ent = log_s0 - mean_shift
    logp = (s[:, 2] - m_global) * inv_temp - log_s0
    infl = None
    if want_influence:
        s0_sq = s0 * s0
        sum_p2 = s[:, 3] / s0_sq
        sum_p2_logp = (s[:, 4] - s[:, 3] * log_s0) / s0_sq
        infl = (torch.exp(logp) * (logp + ent) - sum_p2_logp - ent * sum_p2).masked_fill(dead, float("nan"))
    stats = torch.stack(
        [
            m_global.masked_fill(dead, 0.0),
            mean_shift.masked_fill(dead, 0.0),
            log_s0.masked_fill(dead, float("inf")),
        ],
        1,
    )
    nan = float("nan")
    return logp.masked_fill(dead, nan), ent.masked_fill(dead, nan), infl, stats


def _backward_into(grad, logits, local_target, n_valid, inv_temp, stats, gl, gh, chunk):
    """Write d(loss)/d(logits) of this shard into `grad` (input dtype), chunk by chunk (torch path).

    With t = (z - M) / T, p = exp(t - log S0), E_p[t] = ms, and g = upstream / T (zero on rows
    without a distribution):
        d z_j = g_logp [j == y] + p_j * (g_H * (ms - t_j) - g_logp).
    No collectives and no host synchronisation.
    """
    n = logits.shape[0]
    if n_valid < grad.shape[1]:
        grad[:, n_valid:].zero_()  # vocab padding takes no probability mass and gets no gradient
    if n_valid == 0 or n == 0:
        return
    m_global, mean_shift, log_s0 = stats.unbind(1)
    cdt = stats.dtype
    if gh is not None:
        bias = gh * mean_shift - (gl if gl is not None else 0.0)  # p * (bias - gh * t)
    if gl is not None:
        in_shard = (local_target >= 0) & (local_target < n_valid)
        safe_t = torch.where(in_shard, local_target, torch.zeros_like(local_target))[:, None]
        gl_hit = torch.where(in_shard, gl, torch.zeros_like(gl))[:, None]
    direct = grad.dtype == cdt  # fp32/fp64 input: build the result in the gradient buffer itself
    rows = _rows_per_chunk(n, n_valid, chunk)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        g_out = grad[lo:hi, :n_valid]
        t = _shifted_chunk(logits, lo, hi, n_valid, inv_temp, m_global[lo:hi], cdt)
        if gh is None:
            p = t.sub_(log_s0[lo:hi, None]).exp_().mul_(-gl[lo:hi, None])  # -gl * p
        else:
            c = log_s0[lo:hi, None]
            p = torch.sub(t, c, out=g_out) if direct else torch.sub(t, c)
            p.exp_()
            p.mul_(t.mul_(-gh[lo:hi, None]).add_(bias[lo:hi, None]))
        del t
        if gl is not None:
            p.scatter_add_(1, safe_t[lo:hi], gl_hit[lo:hi])
        if p.data_ptr() != g_out.data_ptr():
            g_out.copy_(p)
        del p


@functools.cache
def _triton_kernels():
    """The Triton module, or None when Triton is not installed (imported once, on first use)."""
    if importlib.util.find_spec("triton") is None:
        return None
    from pipeline.ops import vocab_parallel_triton

    return vocab_parallel_triton


def _use_triton(impl: str, logits: torch.Tensor) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"vocab_parallel_logprob_entropy: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    kernels = _triton_kernels() if (impl == "triton" or logits.is_cuda) else None
    if impl == "auto":
        return kernels is not None and logits.is_cuda
    if kernels is None:
        raise RuntimeError(
            "vocab_parallel_logprob_entropy: impl='triton' but Triton is not installed "
            "(pip install -c constraints.txt triton), or use impl='torch'"
        )
    if not logits.is_cuda and not kernels.INTERPRETED:
        raise ValueError(
            f"vocab_parallel_logprob_entropy: impl='triton' needs CUDA tensors, got {logits.device}; "
            "on CPU set TRITON_INTERPRET=1 before Triton is first imported (its interpreter: correct "
            "but slow, for tests), or use impl='torch'"
        )
    return True


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, target, tp_group, vocab_start, n_valid, inv_temp, want_ent, want_inf, chunk, triton
    ):
        local_target = target - vocab_start
        cdt = _compute_dtype(logits.dtype)
        if triton:
            m, mom = _triton_kernels().local_moments(logits, local_target, n_valid, inv_temp, want_inf, cdt)
        else:
            m, mom = _local_moments(logits, local_target, n_valid, inv_temp, want_inf, chunk)
        m_global, s = _merge(m, mom, inv_temp, tp_group)
        logp, ent, infl, stats = _finish(m_global, s, inv_temp, want_inf)
        if infl is not None:
            ctx.mark_non_differentiable(infl)
        ctx.save_for_backward(logits, target, stats)  # 12 bytes per token beyond the inputs
        ctx.vocab_start, ctx.n_valid, ctx.inv_temp = vocab_start, n_valid, inv_temp
        ctx.chunk, ctx.triton = chunk, triton
        ctx.set_materialize_grads(False)  # an unused output costs nothing in backward
        return logp, (ent if want_ent else None), infl

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_inf):
        if g_logp is None and g_ent is None:
            return (None,) * 10
        logits, target, stats = ctx.saved_tensors
        local_target = target - ctx.vocab_start
        has_dist = stats[:, 2] != float("inf")  # rows with a distribution (see _finish)

        def upstream(g):  # d/dx = d/dz * T: fold 1/T into the per-token gradients once
            if g is None:
                return None
            return torch.where(has_dist, g.to(stats.dtype) * ctx.inv_temp, 0.0).contiguous()

        gl, gh = upstream(g_logp), upstream(g_ent)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if ctx.triton:
            _triton_kernels().backward_into(
                grad, logits, local_target, ctx.n_valid, ctx.inv_temp, stats, gl, gh
            )
        else:
            _backward_into(grad, logits, local_target, ctx.n_valid, ctx.inv_temp, stats, gl, gh, ctx.chunk)
        return grad, None, None, None, None, None, None, None, None, None


def _check_inputs(logits, target, tp_size, valid_vocab_size, temperature):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(
            f"vocab_parallel_logprob_entropy: logits must be a floating tensor (bf16, fp16, fp32 or "
            f"fp64), got {getattr(logits, 'dtype', type(logits))}"
        )
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"vocab_parallel_logprob_entropy: target must be an int64 tensor of global token ids, "
            f"got {getattr(target, 'dtype', type(target))}"
        )
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(target.shape):
        raise ValueError(
            f"vocab_parallel_logprob_entropy: logits {tuple(logits.shape)} must be target's shape "
            f"{tuple(target.shape)} plus a last vocab dimension"
        )
    if logits.device != target.device:
        raise ValueError(f"logits on {logits.device} but target on {target.device}")
    global_vocab = logits.shape[-1] * tp_size
    valid = global_vocab if valid_vocab_size is None else int(valid_vocab_size)
    if not 1 <= valid <= global_vocab:
        raise ValueError(
            f"vocab_parallel_logprob_entropy: valid_vocab_size={valid_vocab_size} is outside the global "
            f"vocabulary [1, {global_vocab}] (= V_local {logits.shape[-1]} x tp {tp_size})"
        )
    if not (temperature > 0.0):
        raise ValueError(f"vocab_parallel_logprob_entropy: temperature must be > 0, got {temperature}")
    if target.numel():
        lo, hi = torch.stack([target.min(), target.max()]).tolist()  # the call's one host sync
        if lo < 0 or hi >= valid:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"vocab_parallel_logprob_entropy: target id {bad} is out of range [0, {valid}) "
                f"(valid_vocab_size={valid}; ids >= it are vocab padding)"
            )
    return valid


def vocab_parallel_logprob_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    entropy: bool = True,
    influence: bool = False,
    impl: str = "auto",
    chunk_elements: int | None = None,
) -> LogProbEntropy:
    """Log-prob of `target`, full-vocabulary entropy and entropy influence, on vocab-sharded logits.

    Args:
        logits: ``[..., V_local]``, this tensor-parallel rank's contiguous vocab shard (bf16, fp16,
            fp32 or fp64). Never modified, never upcast as a whole.
        target: int64 (or int32) global token ids ``[...]``.
        tp_group: the tensor-parallel group the vocabulary is split over; None = no TP.
        temperature: logits are divided by it first (use the rollout temperature).
        valid_vocab_size: ids ``>= valid_vocab_size`` are vocab padding and take no probability mass.
        entropy / influence: which extra outputs to compute.
        impl: ``"auto"`` (the Triton kernels for CUDA tensors when Triton is installed, else torch),
            ``"torch"`` (chunked torch ops, any device) or ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``). Same results to fp32 rounding, same collectives.
        chunk_elements: the torch path's fp32 working chunk (tokens x V_local); None = by device and
            shape (``default_chunk_elements``). A memory/speed knob; the Triton path has no chunks.

    Returns:
        ``LogProbEntropy(logprob, entropy, influence)``: float32 tensors shaped like ``target``
        (float64 for float64 logits). ``logprob`` and ``entropy`` are differentiable w.r.t.
        ``logits`` (``dH/dz = -p (log p + H) / T``); ``influence`` is not (see the module docstring).
        A token whose every valid logit is -inf gets NaN outputs and a zero gradient.

    Communication: two forward collectives over ``tp_group`` (MAX, then one packed SUM), none in
    backward. Saved for backward: 12 bytes per token (max, E_p[x], log-sum-exp) beyond references to
    the inputs. Host synchronisation: one per call (the range check of the target ids), none per chunk.
    """
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    valid = _check_inputs(logits, target, tp_size, valid_vocab_size, temperature)
    triton = _use_triton(impl, logits)
    shape = target.shape
    v_local = logits.shape[-1]
    flat_logits = logits.reshape(-1, v_local)
    flat_target = target.reshape(-1).long()
    vocab_start = tp_rank * v_local
    n_valid = max(0, min(v_local, valid - vocab_start))
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(logits.device, flat_logits.shape[0], v_local)
    logp, ent, infl = _VocabParallelLogProbEntropy.apply(
        flat_logits,
        flat_target,
        tp_group if tp_size > 1 else None,
        vocab_start,
        n_valid,
        1.0 / float(temperature),
        bool(entropy),
        bool(influence),
        int(chunk_elements),
        triton,
    )
    return LogProbEntropy(
        logp.view(shape),
        ent.view(shape) if ent is not None else None,
        infl.view(shape) if infl is not None else None,
    )
