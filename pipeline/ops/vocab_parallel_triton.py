"""Triton kernels of the vocab-parallel op: the local pass over this rank's shard, forward and backward.

`pipeline.ops.vocab_parallel` owns the interface, the two forward collectives and the finish (all
O(tokens)); this module replaces only its two passes over the ``[N, V_local]`` shard, which are the
whole cost on a GPU:

- ``local_moments``: one read of the shard. One program per token walks the vocab in tiles of
  ``BLOCK_V`` columns, keeping the running max ``m`` (a scalar: one reduction per tile) and lane-wise
  fp32 accumulators of ``s0 = sum e``, ``s1 = sum e * x`` (and ``s2 = sum e^2``, ``s3 = sum e^2 x``
  for the influence), ``x = (z - m) / T``, ``e = exp(x)``, rescaled when ``m`` grows; the lanes are
  summed once at the end. It also reads the target logit when the target lies in this shard.
- ``backward_into``: one read of the shard and one write of the gradient in the input dtype,
  ``d z_j = g_logp [j == y] + p_j (g_H (E_p[x] - x_j) - g_logp)`` with ``p`` recomputed from the
  saved per-token ``(max, E_p[x], log-sum-exp)`` (the upstream gradients arrive already divided by
  ``T``). No softmax is ever stored.

Accumulation is fp32 (fp64 for fp64 logits), -inf logits contribute exactly zero (never ``0 * inf``),
columns at or beyond ``n_valid`` (vocab padding) take no probability mass and get a zero gradient,
and offsets are 64-bit (a 131,072 x 19,008 shard has more than 2^31 elements).

On CPU the kernels run through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
Triton was first imported (``INTERPRETED``); that checks their logic, not their speed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)


def _interpreter_rounds_bf16_to_nearest_even():
    """Triton's interpreter truncates fp32 -> bf16 (its fp_trunc drops the low bits), while GPUs round
    to nearest even (``cvt.rn.bf16.f32``), as torch does: without this, a bf16 gradient checked on CPU
    would be up to one bf16 step away from the one a GPU writes. Applied only under the interpreter."""
    import numpy as np
    from triton.runtime import interpreter

    truncate = interpreter.InterpreterBuilder.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return truncate(self, src, dst_type)

    interpreter.InterpreterBuilder.create_fp_trunc = create_fp_trunc


if INTERPRETED:
    _interpreter_rounds_bf16_to_nearest_even()

# Columns per tile: 4096 bf16 values = 8 KiB per program and tile, 5 tiles at a 19,008-column shard.
# Not autotuned (no GPU was lent when this was written, docs/benchmarks.md); tests lower it to
# exercise many tiles and a ragged last tile on small shapes.
MAX_BLOCK_V = 4096

_COMPUTE = {torch.float64: tl.float64}  # everything else accumulates in fp32


@triton.jit
def _local_moments_kernel(
    z_ptr,
    stride_n,
    stride_v,
    target_ptr,
    n_valid,
    v_local,
    inv_temp_ptr,
    m_ptr,
    mom_ptr,
    K: tl.constexpr,
    WANT_INFLUENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CDT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_n
    inv_temp = tl.load(inv_temp_ptr).to(CDT)
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    m = tl.max(tl.full([BLOCK_V], neg_inf, CDT), axis=0)  # scalar running max of the raw logits
    shift = tl.zeros([BLOCK_V], CDT).sum(axis=0)  # m where finite, else 0: x is relative to it
    acc0 = tl.zeros([BLOCK_V], CDT)
    acc1 = tl.zeros([BLOCK_V], CDT)
    acc2 = tl.zeros([BLOCK_V], CDT)
    acc3 = tl.zeros([BLOCK_V], CDT)
    for start in range(0, n_valid, BLOCK_V):
        c = start + cols
        z = tl.load(z_row + c.to(tl.int64) * stride_v, mask=c < v_local, other=neg_inf).to(CDT)
        z = tl.where(c < n_valid, z, neg_inf)  # padding: masked after the load, which stays vectorised
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift_new = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)
        # <= 0: rescales what was accumulated relative to `shift` (nothing yet while m is -inf)
        d = tl.where(m > neg_inf, (shift - shift_new) * inv_temp, 0.0)
        a = tl.exp(d)
        x = (z - shift_new) * inv_temp
        e = tl.exp(x)
        ex = tl.where(z > neg_inf, e * x, 0.0)  # exp(-inf) * -inf would be NaN; the term is 0
        acc1 = a * (acc1 + d * acc0) + ex
        acc0 = a * acc0 + e
        if WANT_INFLUENCE:
            a2 = a * a
            e2 = e * e
            acc3 = a2 * (acc3 + d * acc2) + tl.where(z > neg_inf, e2 * x, 0.0)
            acc2 = a2 * acc2 + e2
        m = m_new
        shift = shift_new
    t = tl.load(target_ptr + row)  # local id: < 0 or >= n_valid when on another shard
    in_shard = (t >= 0) & (t < n_valid)
    zy = tl.load(z_row + tl.where(in_shard, t, 0) * stride_v, mask=in_shard, other=0.0).to(CDT)
    tl.store(m_ptr + row, m)
    out = mom_ptr + row * K
    tl.store(out, tl.sum(acc0, axis=0))
    tl.store(out + 1, tl.sum(acc1, axis=0))
    tl.store(out + 2, zy)
    if WANT_INFLUENCE:
        tl.store(out + 3, tl.sum(acc2, axis=0))
        tl.store(out + 4, tl.sum(acc3, axis=0))


@triton.jit
def _backward_kernel(
    z_ptr,
    stride_n,
    stride_v,
    grad_ptr,
    stride_gn,
    target_ptr,
    n_valid,
    v_local,
    stats_ptr,
    g_logp_ptr,
    g_ent_ptr,
    inv_temp_ptr,
    HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    CDT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_n
    g_row = grad_ptr + row * stride_gn
    inv_temp = tl.load(inv_temp_ptr).to(CDT)
    m_global = tl.load(stats_ptr + row * 3)
    mean_shift = tl.load(stats_ptr + row * 3 + 1)  # E_p[x] with x = (z - m_global) / T
    log_s0 = tl.load(stats_ptr + row * 3 + 2)
    gl = tl.load(g_logp_ptr + row) if HAS_G_LOGP else 0.0
    gh = tl.load(g_ent_ptr + row) if HAS_G_ENT else 0.0
    bias = gh * mean_shift - gl
    t = tl.load(target_ptr + row)  # local id: < 0 or >= n_valid when on another shard
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, v_local, BLOCK_V):
        c = start + cols
        z = tl.load(z_row + c.to(tl.int64) * stride_v, mask=c < v_local, other=0.0).to(CDT)
        z = tl.where(c < n_valid, z, float("-inf"))
        x = (z - m_global) * inv_temp
        p = tl.exp(x - log_s0)
        if HAS_G_ENT:
            g = tl.where(z > float("-inf"), p * (bias - gh * x), 0.0)  # p = 0 there; avoid 0 * inf
        else:
            g = p * bias
        if HAS_G_LOGP:
            g = tl.where(c == t, g + gl, g)
        tl.store(g_row + c, g.to(grad_ptr.dtype.element_ty), mask=c < v_local)


def _launch_config(v_local: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). At 4096 x 16 warps ptxas gives (sm_80/sm_90, bf16/fp32): forward 40-64
    registers, backward 24-40, no spills, 16-byte loads and stores
    (`tools/compile_vocab_parallel_kernels.py`): two or more 512-thread programs per SM stay resident.
    Not timed on a GPU yet (docs/benchmarks.md)."""
    block = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(max(v_local, 1))))
    return block, (16 if block >= 4096 else 8 if block >= 1024 else 4)


def _inv_temp(inv_temp: float, cdt: torch.dtype, device) -> torch.Tensor:
    # a one-element tensor, not a kernel scalar argument: Triton passes Python floats as fp32, which
    # would round 1/T for fp64 logits
    return torch.full((1,), inv_temp, dtype=cdt, device=device)


def local_moments(logits, local_target, n_valid, inv_temp, want_influence, cdt):
    """The forward pass over this rank's shard: (raw max m [N], moments [N, k]), k = 3 or 5.

    moments = (s0, s1, z_y[, s2, s3]) relative to ``(z - m) / T`` (``m`` where finite, else 0),
    exactly the contract of the torch path's ``_local_moments``.
    """
    n = logits.shape[0]
    k = 5 if want_influence else 3
    m = torch.empty((n,), dtype=cdt, device=logits.device)  # every row is written, shard or no shard
    mom = torch.empty((n, k), dtype=cdt, device=logits.device)
    if n == 0:
        return m, mom
    block, warps = _launch_config(logits.shape[1])
    _local_moments_kernel[(n,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        local_target,
        n_valid,
        logits.shape[1],
        _inv_temp(inv_temp, cdt, logits.device),
        m,
        mom,
        K=k,
        WANT_INFLUENCE=bool(want_influence),
        BLOCK_V=block,
        CDT=_COMPUTE.get(cdt, tl.float32),
        num_warps=warps,
    )
    return m, mom


def backward_into(grad, logits, local_target, n_valid, inv_temp, stats, g_logp, g_ent):
    """Write the shard's gradient into ``grad`` (contiguous, input dtype): one read, one write.

    ``g_logp`` / ``g_ent``: per-token upstream gradients already divided by T (None = not needed).
    """
    n, v_local = logits.shape
    if n == 0 or v_local == 0:
        return
    cdt = stats.dtype
    block, warps = _launch_config(v_local)
    dummy = stats  # any tensor: a pointer argument the kernel never reads when its flag is off
    _backward_kernel[(n,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        grad,
        grad.stride(0),
        local_target,
        n_valid,
        v_local,
        stats,
        g_logp if g_logp is not None else dummy,
        g_ent if g_ent is not None else dummy,
        _inv_temp(inv_temp, cdt, logits.device),
        HAS_G_LOGP=g_logp is not None,
        HAS_G_ENT=g_ent is not None,
        BLOCK_V=block,
        CDT=_COMPUTE.get(cdt, tl.float32),
        num_warps=warps,
    )
