"""Side-by-side benchmark of vocab-parallel log-prob (+ entropy) implementations: TP over gloo on CPU, or
on CUDA GPUs over NCCL.

    .venv/bin/python tools/bench_vocab_parallel.py                 # CPU: 4096 tokens x 32768 vocab, TP=2, fp32+bf16
    .venv/bin/python tools/bench_vocab_parallel.py --quick         # CPU: small smoke shape, a few seconds
    python tools/bench_vocab_parallel.py --device cuda             # one GPU: 32768 x 19008 and 16384 x 152064

Adapters (one contract: ``fn(logits_shard, target, group) -> (logprob, entropy | None)``, differentiable
w.r.t. the shard; see ``ADAPTERS``):

- ``ours``: ``pipeline.ops.vocab_parallel_logprob_entropy`` (log-prob + entropy) with ``impl="auto"``, i.e.
  what the actor runs: the Triton kernels on CUDA, the torch path on CPU.
- ``ours_torch`` (CUDA only): the same op forced onto its torch path (the fallback).
- ``megatron_ce+clone``: megatron-core ``vocab_parallel_cross_entropy`` (log-prob = -CE) on a clone made
  inside the measured call: what a caller that still needs its logits (e.g. for entropy, as verl does)
  pays. fp32 only: on bf16 input megatron upcasts to a new buffer and leaves the input intact.
- ``megatron_ce``: the same, in place on the caller's tensor (fp32 input is destroyed; the harness makes a
  fresh copy *outside* the measured call for every run).
- ``naive``: all-gather the shards (nothing to gather at TP=1), float32 ``log_softmax``, gather the
  target, entropy = -(p * logp).sum; backward through autograd.
- ``ours@REF`` (with ``--baseline REF``): the op as ``pipeline/ops/vocab_parallel.py`` was at git
  revision REF (e.g. ``main``), side by side with the working tree's, to measure a change of the op.

Per shape, input dtype and adapter it measures, on every rank (reported: max over ranks):

- time: forward under ``no_grad`` and forward+backward (random per-token upstream gradients for log-prob
  and entropy, i.e. the RL case), median/p10/p90 over ``--repeats`` runs after warm-ups (CPU 2, CUDA 3),
  a barrier before each run, adapters interleaved run by run so that load changes hit all of them alike;
  CUDA times are CUDA events;
- peak extra memory beyond the inputs: CPU: max of the running sum of the profiler's ``[memory]``
  allocation events inside the measured call; CUDA: ``max_memory_allocated`` minus what was allocated
  before the call; both checked on a known allocation at start-up;
- bytes saved for backward (``saved_tensors_hooks``, deduplicated by storage; storages of the inputs are
  reported separately as aliases);
- collectives issued in forward and in backward (``torch.distributed`` functions wrapped);
- max abs error of log-prob, entropy and the gradient against a float64 reference built from the
  gathered logits (the same bf16/fp32 values).

Before the adapters, a calibration on the very logits tensor: row-max read and clone bandwidth, giving the
measured floors (forward: one read; forward+backward: two reads and one write = 1.5 clones), the floors at
the GPU's spec bandwidth where known, and (CUDA, bf16) the lm_head GEMMs of the shape at ``--gemm-hidden``.

Prints a Markdown table and PASS/FAIL lines for the targets of docs/vocab-parallel.md (``TARGETS``; on
an H100/H200 also the absolute ones of ``GPU_TARGETS``), and writes one JSON line per (shape, adapter,
dtype) to ``--out``. CPU timings say nothing about GPU kernels; the memory, saved-bytes and collective
numbers are device-independent. An adapter that runs out of GPU memory is reported as such and skipped
(with ``--tp 1``; at TP > 1 a rank that fails alone would leave the others waiting).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Per device: default shapes (tokens x global vocab), TP size, timed runs, warm-ups, lm_head hidden size.
DEVICE_DEFAULTS = {
    "cpu": {"shapes": "4096x32768", "tp": 2, "repeats": 5, "warmup": 2, "gemm_hidden": 0},
    "cuda": {"shapes": "32768x19008,16384x152064", "tp": 1, "repeats": 20, "warmup": 3, "gemm_hidden": 5120},
}
QUICK_SHAPES = {"cpu": "256x4096", "cuda": "4096x19008"}
# HBM spec bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(), most specific first.
SPEC_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12)]


# ------------------------------------------------------------------------------------------------------
# Adapters


@dataclass(frozen=True)
class Adapter:
    """One implementation under test.

    fn(logits_shard, target, group) -> (logprob [N] fp32, entropy [N] or None), differentiable w.r.t.
    ``logits_shard``. ``destroys_input``: the harness hands it a fresh copy (made outside the measured
    call) every time. ``dtypes``: input dtypes it is run on (others are skipped with ``skip_reason``).
    """

    name: str
    fn: Callable
    entropy: bool
    devices: tuple[str, ...] = ("cpu",)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    destroys_input: dict = field(default_factory=dict)  # dtype name -> bool
    skip_reason: str = ""
    note: str = ""


def _ours(logits, target, group, impl="auto"):
    from pipeline.ops import vocab_parallel_logprob_entropy

    out = vocab_parallel_logprob_entropy(logits, target, tp_group=group, impl=impl)
    return out.logprob, out.entropy


def _megatron(logits, target, group):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits, target), None


def _megatron_clone(logits, target, group):
    return _megatron(logits.clone(), target, group)


class _GatherVocab(torch.autograd.Function):
    """All-gather the vocab shards into [N, V]; backward keeps this rank's slice (no communication:
    every rank computes the same loss on the same gathered logits)."""

    @staticmethod
    def forward(ctx, shard, group):
        t = dist.get_world_size(group)
        ctx.rank, ctx.v_local = dist.get_rank(group), shard.shape[-1]
        out = torch.empty((t * shard.shape[0], shard.shape[1]), dtype=shard.dtype, device=shard.device)
        dist.all_gather_into_tensor(out, shard.contiguous(), group=group)
        return torch.cat(out.chunk(t, dim=0), dim=-1)

    @staticmethod
    def backward(ctx, grad):
        lo = ctx.rank * ctx.v_local
        return grad[:, lo : lo + ctx.v_local], None


def _naive(logits, target, group):
    full = _GatherVocab.apply(logits, group) if dist.get_world_size(group) > 1 else logits
    full = full.float()
    logp_all = torch.log_softmax(full, dim=-1)
    logp = logp_all.gather(-1, target[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in [
        Adapter("ours", _ours, entropy=True, devices=("cpu", "cuda"), note="logp + entropy"),
        Adapter(
            "ours_torch",
            partial(_ours, impl="torch"),
            entropy=True,
            devices=("cuda",),
            note="logp + entropy, torch path",
        ),
        Adapter(
            "megatron_ce+clone",
            _megatron_clone,
            entropy=False,
            devices=("cpu", "cuda"),
            dtypes=("fp32",),
            skip_reason="bf16 input is upcast to a new buffer and left intact: no clone needed",
            note="logp only; clone inside the call",
        ),
        Adapter(
            "megatron_ce",
            _megatron,
            entropy=False,
            devices=("cpu", "cuda"),
            destroys_input={"fp32": True},
            note="logp only; fp32: in place, input destroyed",
        ),
        Adapter("naive", _naive, entropy=True, devices=("cpu", "cuda"), note="all-gather + fp32 log_softmax"),
    ]
}

# (dtype, measured quantity, ours vs adapter, bound). The megatron row a caller that needs entropy can
# use: with fp32 input it must clone (megatron destroys the input), with bf16 it need not.
TARGETS = [
    ("bf16", "peak_fwdbwd", "megatron_ce", 0.5),
    ("bf16", "peak_fwdbwd", "naive", 0.2),
    ("bf16", "time_fwdbwd", "megatron_ce", 1.25),
    ("fp32", "peak_fwdbwd", "megatron_ce+clone", 1.0),
    ("fp32", "peak_fwdbwd", "naive", 0.2),
    ("fp32", "time_fwdbwd", "megatron_ce+clone", 1.25),
]
# Shown next to the targets, not gated: the in-place megatron row (fp32 input destroyed).
INFO_TARGETS = [
    ("fp32", "peak_fwdbwd", "megatron_ce"),
    ("fp32", "time_fwdbwd", "megatron_ce"),
]
# Absolute targets of issue 18 for `ours` (bf16, one TP=8 shard of Qwen2.5: 32768 x 19008, TP=1 run), by
# GPU name: forward and forward+backward ms; peak extra <= one bf16 gradient buffer + O(tokens).
GPU_TARGET_SHAPE = (32768, 19008)
GPU_TARGETS = {"H200": (0.5, 1.2), "H100": (0.7, 1.7)}
PEAK_SLACK_BYTES_PER_TOKEN = 256  # per-token vectors (outputs, statistics, upstream gradients)


# ------------------------------------------------------------------------------------------------------
# Instrumentation


class _Collectives:
    """Counts torch.distributed collectives (calls and bytes) while ``phase`` is set."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "_all_gather_base",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "_reduce_scatter_base",
    )

    def __init__(self):
        self.phase = None
        self.calls = {"fwd": 0, "bwd": 0}
        self.bytes = {"fwd": 0, "bwd": 0}
        for name in self.NAMES:
            orig = getattr(dist, name, None)
            if orig is not None:
                setattr(dist, name, self._wrap(orig))

    def _wrap(self, orig):
        def wrapped(*args, **kwargs):
            if self.phase is not None:
                self.calls[self.phase] += 1
                self.bytes[self.phase] += sum(
                    t.numel() * t.element_size()
                    for a in args
                    for t in (a if isinstance(a, list | tuple) else [a])
                    if isinstance(t, torch.Tensor)
                )
            return orig(*args, **kwargs)

        wrapped.__wrapped__ = orig
        return wrapped

    def reset(self):
        self.calls = {"fwd": 0, "bwd": 0}
        self.bytes = {"fwd": 0, "bwd": 0}

    @contextlib.contextmanager
    def counting(self, phase):
        self.phase = phase
        try:
            yield
        finally:
            self.phase = None


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints two log lines per profiler session on fd 2; hide them from the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _CpuOps:
    """Device-specific parts of the harness: peak memory, synchronisation, timing."""

    device = "cpu"

    @staticmethod
    def peak_extra(fn):
        """(result, peak bytes allocated inside fn beyond what existed before it)."""
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        )
        running = peak = 0
        for _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
        return result, peak

    @staticmethod
    def sync():
        pass

    @staticmethod
    def timed(fn):
        """(result, seconds) of fn, its device work included."""
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0

    @staticmethod
    def free():
        pass


class _CudaOps:
    device = "cuda"

    @staticmethod
    def peak_extra(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base

    @staticmethod
    def sync():
        torch.cuda.synchronize()

    @staticmethod
    def timed(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end) / 1e3

    @staticmethod
    def free():
        torch.cuda.empty_cache()


DEVICE_OPS = {"cpu": _CpuOps, "cuda": _CudaOps}


def _validate_memory_probe(ops):
    """The peak of a known allocation pattern must come out exactly: 4 MB kept + 8 MB freed -> 12 MB."""

    def known():
        a = torch.empty(1 << 20, dtype=torch.float32, device=ops.device)
        b = torch.empty(1 << 21, dtype=torch.float32, device=ops.device)
        del b
        c = torch.empty(1 << 19, dtype=torch.float32, device=ops.device)
        del c
        return a

    _, peak = ops.peak_extra(known)
    if peak != 12 << 20:
        raise RuntimeError(f"memory probe check failed: expected {12 << 20} bytes, measured {peak}")
    return peak


def _saved_tensors(inputs):
    """Context manager + record of the storages saved for backward: (new bytes, input-alias bytes)."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t):
        s = t.untyped_storage()
        seen.setdefault(s.data_ptr(), (s.nbytes(), s.data_ptr() in input_ptrs))
        return t

    ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    return ctx, seen


# ------------------------------------------------------------------------------------------------------
# One rank


def _make_inputs(n, v_local, rank, dtype, seed, device="cpu"):
    """This rank's shard (logits ~ 2 * N(0, 1)), global targets and upstream gradients (same on all
    ranks), made on `device` (a 16384 x 152064 fp32 shard is 10 GB: not something to copy from the host)."""
    g = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
    logits = torch.randn(n, v_local, generator=g, device=device).mul_(2.0).to(dtype)
    g_all = torch.Generator(device=device).manual_seed(seed)
    target = torch.randint(0, v_local * dist.get_world_size(), (n,), generator=g_all, device=device)
    g_logp = torch.randn(n, generator=g_all, device=device)
    g_ent = torch.randn(n, generator=g_all, device=device)
    return logits, target, g_logp, g_ent


def _reference(logits, target, group, rows=256):
    """float64 (lse, logp, entropy) per token from the gathered logits (the very bf16/fp32 values)."""
    n, v_local = logits.shape
    t = dist.get_world_size(group)
    lse, logp, ent = (torch.empty(n, dtype=torch.float64, device=logits.device) for _ in range(3))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        parts = [torch.empty(hi - lo, v_local, dtype=torch.float64, device=logits.device) for _ in range(t)]
        dist.all_gather(parts, logits[lo:hi].double().contiguous(), group=group)
        z = torch.cat(parts, dim=-1)
        lse_c = torch.logsumexp(z, dim=-1)
        p = torch.exp(z - lse_c[:, None])
        lse[lo:hi] = lse_c
        logp[lo:hi] = z.gather(1, target[lo:hi, None]).squeeze(1) - lse_c
        ent[lo:hi] = lse_c - (p * z).sum(-1)
    return lse, logp, ent


def _grad_error(grad, logits, target, ref, g_logp, g_ent, rank, rows=256):
    """max |grad - ref| and max |ref| over this shard; ref = g_l (1[y] - p) - g_H p (log p + H)."""
    lse, _, ent = ref
    n, v_local = logits.shape
    err = scale = 0.0
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        logp_all = logits[lo:hi].double() - lse[lo:hi, None]
        p = logp_all.exp()
        r = -g_logp[lo:hi, None].double() * p
        if g_ent is not None:
            r -= g_ent[lo:hi, None].double() * p * (logp_all + ent[lo:hi, None])
        local = target[lo:hi] - rank * v_local
        hit = ((local >= 0) & (local < v_local)).nonzero().squeeze(1)
        r[hit, local[hit]] += g_logp[lo:hi][hit].double()
        err = max(err, (grad[lo:hi].double() - r).abs().max().item())
        scale = max(scale, r.abs().max().item())
    return err, scale


def _call(adapter, x, target, group, g_logp, g_ent, backward, coll=None, saved_ctx=None):
    """One measured call: forward (+ backward with per-token upstream gradients); returns
    ((logp, entropy), grad). With ``coll``/``saved_ctx``, collectives are counted per phase and the
    tensors saved for backward recorded."""
    null = contextlib.nullcontext
    if not backward:
        with torch.no_grad(), coll.counting("fwd") if coll else null():
            return adapter.fn(x, target, group), None
    with coll.counting("fwd") if coll else null(), saved_ctx or null():
        logp, ent = adapter.fn(x, target, group)
    outs, grads = [logp], [g_logp]
    if adapter.entropy:
        outs.append(ent)
        grads.append(g_ent)
    with coll.counting("bwd") if coll else null():
        (grad,) = torch.autograd.grad(outs, [x], grads)
    return (logp, ent), grad


def _instrumented(a, dname, logits, target, g_logp, g_ent, ref, group, coll, ops, rank):
    """Peak memory (fwd, fwd+bwd), saved bytes, collectives and errors of one adapter on this rank."""
    n = logits.shape[0]
    r = {}
    for backward in (False, True):
        x = _fresh(a, dname, logits, backward)
        dist.barrier()
        coll.reset()
        saved_ctx, saved = _saved_tensors([x, logits, target])
        (out, grad), peak = ops.peak_extra(
            lambda x=x, backward=backward, saved_ctx=saved_ctx: _call(
                a, x, target, group, g_logp, g_ent, backward, coll, saved_ctx
            )
        )
        r["peak_fwdbwd" if backward else "peak_fwd"] = peak
        if not backward:
            continue
        r["saved_new_bytes"] = sum(b for b, alias in saved.values() if not alias)
        r["saved_alias_bytes"] = sum(b for b, alias in saved.values() if alias)
        r["coll_fwd"], r["coll_bwd"] = coll.calls["fwd"], coll.calls["bwd"]
        r["coll_fwd_bytes_per_token"] = coll.bytes["fwd"] / n
        r["coll_bwd_bytes_per_token"] = coll.bytes["bwd"] / n
        logp, ent = out
        r["err_logp"] = (logp.detach().double() - ref[1]).abs().max().item()
        r["err_entropy"] = (ent.detach().double() - ref[2]).abs().max().item() if ent is not None else None
        gerr, gscale = _grad_error(grad, logits, target, ref, g_logp, g_ent if a.entropy else None, rank)
        r["err_grad"], r["grad_max_abs"] = gerr, gscale
        r["grad_dtype"] = str(grad.dtype).replace("torch.", "")
    return r


def _fresh(adapter, dname, logits, backward):
    x = logits.clone() if adapter.destroys_input.get(dname, False) else logits.detach()
    return x.requires_grad_(backward)


def _quantiles(values):
    s = sorted(values)

    def q(f):
        k = (len(s) - 1) * f
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return q(0.5), q(0.1), q(0.9)


def _worker(rank, args, port):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    backend = "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.tp)
    try:
        _run_rank(rank, args)
    finally:
        dist.destroy_process_group()


def _log(rank, msg):
    if rank == 0:
        print(msg, flush=True)


def _median_time(ops, fn, runs=5):
    ops.sync()
    fn()  # warm-up
    return _quantiles([ops.timed(fn)[1] for _ in range(runs)])[0]


def spec_bandwidth(device_name: str) -> float | None:
    """HBM bandwidth at spec (bytes/s) for the GPUs the targets are written for, else None."""
    return next((bw for key, bw in SPEC_BANDWIDTH if key in device_name), None)


def _calibrate(ops, logits, gemm_hidden, device_name):
    """Bandwidth floors of this very tensor, and the lm_head GEMMs of its shape (bf16, `gemm_hidden`)."""
    n, v_local = logits.shape
    nbytes = logits.numel() * logits.element_size()
    t_read = _median_time(ops, lambda: logits.amax(dim=1))
    t_clone = _median_time(ops, lambda: logits.clone())
    cal = {
        "read_bw": nbytes / t_read,
        "clone_bw": 2 * nbytes / t_clone,
        "floor_fwd_ms": t_read * 1e3,  # one read
        "floor_fwdbwd_ms": 1.5 * t_clone * 1e3,  # two reads + one write
    }
    bw = spec_bandwidth(device_name)
    if bw:
        cal["spec_bw"] = bw
        cal["spec_floor_fwd_ms"] = nbytes / bw * 1e3
        cal["spec_floor_fwdbwd_ms"] = 3 * nbytes / bw * 1e3
    if gemm_hidden and logits.dtype == torch.bfloat16:
        g = torch.Generator(device=logits.device).manual_seed(0)
        x = torch.randn(n, gemm_hidden, generator=g, device=logits.device, dtype=torch.bfloat16)
        w = torch.randn(v_local, gemm_hidden, generator=g, device=logits.device, dtype=torch.bfloat16)
        dz = logits  # a [N, V_local] bf16 operand standing in for d(logits)
        cal["gemm_fwd_ms"] = _median_time(ops, lambda: x @ w.t(), runs=3) * 1e3
        cal["gemm_dx_ms"] = _median_time(ops, lambda: dz @ w, runs=3) * 1e3
        cal["gemm_dw_ms"] = _median_time(ops, lambda: dz.t() @ x, runs=3) * 1e3
        cal["gemm_hidden"] = gemm_hidden
        del x, w
    ops.free()
    return cal


def _calibration_line(cal, label):
    line = (
        f"{label} calibration: row-max read {cal['read_bw'] / 1e9:.1f} GB/s, clone {cal['clone_bw'] / 1e9:.1f} GB/s "
        f"(read+write); measured floors fwd {_fmt_ms(cal['floor_fwd_ms'])} ms, fwd+bwd "
        f"{_fmt_ms(cal['floor_fwdbwd_ms'])} ms"
    )
    if "spec_bw" in cal:
        line += (
            f"; at the spec {cal['spec_bw'] / 1e12:.2f} TB/s: {_fmt_ms(cal['spec_floor_fwd_ms'])} / "
            f"{_fmt_ms(cal['spec_floor_fwdbwd_ms'])} ms"
        )
    if "gemm_fwd_ms" in cal:
        line += (
            f"; lm_head GEMMs at h={cal['gemm_hidden']}: fwd {cal['gemm_fwd_ms']:.2f} ms, dX "
            f"{cal['gemm_dx_ms']:.2f} ms, dW {cal['gemm_dw_ms']:.2f} ms"
        )
    return line


def _baseline_adapter(path, ref):
    """`ours` as it was at git revision `ref` (its op module, loaded from `path`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"vocab_parallel_at_{abs(hash(ref))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def fn(logits, target, group):
        out = module.vocab_parallel_logprob_entropy(logits, target, tp_group=group)
        return out.logprob, out.entropy

    return Adapter(f"ours@{ref}", fn, entropy=True, devices=("cpu", "cuda"), note=f"logp + entropy, at {ref}")


def _run_rank(rank, args):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    group = parallel_state.get_tensor_model_parallel_group()
    ops = DEVICE_OPS[args.device]
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    device_name = (
        torch.cuda.get_device_name(device) if args.device == "cuda" else platform.processor() or "cpu"
    )
    _validate_memory_probe(ops)
    _log(rank, "memory probe validated: a known 4 MB + 8 MB allocation pattern measures 12 MiB exactly")
    _log(rank, f"device: {device_name}")
    coll = _Collectives()
    t = args.tp
    records, skipped = [], []
    adapters_all = [a for a in ADAPTERS.values() if args.device in a.devices]
    if args.baseline:
        adapters_all.insert(1, _baseline_adapter(args.baseline_path, args.baseline))
    for n, vocab in args.shapes:
        v_local = vocab // t
        for dname in args.dtypes:
            label = f"[{dname} {n}x{v_local}]"
            dtype = DTYPES[dname]
            logits, target, g_logp, g_ent = _make_inputs(n, v_local, rank, dtype, args.seed, device)
            shard_bytes = logits.numel() * logits.element_size()
            cal = _calibrate(ops, logits, args.gemm_hidden, device_name)
            _log(rank, _calibration_line(cal, label))
            ref = _reference(logits, target, group)
            for a in adapters_all:
                if dname not in a.dtypes:
                    _log(rank, f"{label} {a.name}: skipped ({a.skip_reason})")
            adapters = [a for a in adapters_all if dname in a.dtypes]
            _log(
                rank,
                f"{label} {n} tokens x {vocab} vocab, TP={t}: shard {n} x {v_local} = "
                f"{shard_bytes / 2**20:.0f} MiB per rank; adapters: {', '.join(a.name for a in adapters)}",
            )
            rec = {a.name: {} for a in adapters}
            # 1) instrumented calls: collectives, saved bytes, peak memory, errors
            for a in list(adapters):
                try:
                    rec[a.name].update(
                        _instrumented(a, dname, logits, target, g_logp, g_ent, ref, group, coll, ops, rank)
                    )
                except torch.OutOfMemoryError:
                    adapters.remove(a)
                    skipped.append(
                        {"adapter": a.name, "dtype": dname, "tokens": n, "vocab": vocab, "skipped": "OOM"}
                    )
                    _log(rank, f"{label} {a.name}: out of memory, skipped")
                    ops.free()
                    continue
                r = rec[a.name]
                _log(
                    rank,
                    f"{label} {a.name}: instrumented (peak fwd+bwd {r['peak_fwdbwd'] / shard_bytes:.2f}x shard, "
                    f"{r['coll_fwd']}+{r['coll_bwd']} collectives)",
                )
                ops.free()
            # 2) timing, adapters interleaved run by run
            for backward in (False, True):
                mode = "fwdbwd" if backward else "fwd"
                times = {a.name: [] for a in adapters}
                total = args.warmup + args.repeats
                for i in range(total):
                    for a in adapters:
                        x = _fresh(a, dname, logits, backward)
                        dist.barrier()
                        ops.sync()
                        (out, grad), dt = ops.timed(
                            partial(_call, a, x, target, group, g_logp, g_ent, backward)
                        )
                        del out, grad, x
                        if i >= args.warmup:
                            times[a.name].append(dt)
                    if args.device == "cpu" or i + 1 == total:
                        _log(
                            rank,
                            f"{label} timing {mode}: run {i + 1}/{total} (first {args.warmup} are warm-ups)",
                        )
                gathered = [None] * t
                dist.all_gather_object(gathered, times, group=group)
                for a in adapters:
                    worst = [max(g[a.name][k] for g in gathered) for k in range(args.repeats)]
                    med, p10, p90 = _quantiles(worst)
                    rec[a.name].update({f"time_{mode}_ms": med * 1e3, f"time_{mode}_p10_ms": p10 * 1e3})
                    rec[a.name][f"time_{mode}_p90_ms"] = p90 * 1e3
            # aggregate over ranks (max) and finish the records
            for a in adapters:
                r = rec[a.name]
                gathered = [None] * t
                dist.all_gather_object(gathered, r, group=group)
                merged = {}
                for k, v in r.items():
                    vals = [g[k] for g in gathered]
                    merged[k] = max(vals) if isinstance(v, int | float) and not isinstance(v, bool) else v
                merged.update(
                    adapter=a.name,
                    impl=_impl_of(a, args.device),
                    note=a.note,
                    dtype=dname,
                    tokens=n,
                    vocab=vocab,
                    v_local=v_local,
                    tp=t,
                    device=args.device,
                    device_name=device_name,
                    shard_bytes=shard_bytes,
                    repeats=args.repeats,
                    warmup=args.warmup,
                    outputs="logp+entropy" if a.entropy else "logp",
                    **{f"calib_{k}": v for k, v in cal.items()},
                )
                for k in ("peak_fwd", "peak_fwdbwd", "saved_new_bytes", "saved_alias_bytes"):
                    merged[k + "_x_shard"] = merged[k] / shard_bytes
                merged["saved_new_bytes_per_token"] = merged["saved_new_bytes"] / n
                merged["x_floor_fwd"] = merged["time_fwd_ms"] / cal["floor_fwd_ms"]
                merged["x_floor_fwdbwd"] = merged["time_fwdbwd_ms"] / cal["floor_fwdbwd_ms"]
                records.append(merged)
            del logits, target, g_logp, g_ent, ref
            ops.free()
    if rank == 0:
        _report(records, skipped, args, device_name)
    parallel_state.destroy_model_parallel()


def _impl_of(adapter, device):
    if adapter.name == "ours":
        from pipeline.ops.vocab_parallel import _triton_kernels

        return "triton" if device == "cuda" and _triton_kernels() is not None else "torch"
    return "torch" if adapter.name == "ours_torch" else "-"  # ours@REF: whatever REF's "auto" does


# ------------------------------------------------------------------------------------------------------
# Report


def _shape_key(r):
    return (r["tokens"], r["vocab"])


def _ratio(records, shape, dname, key, other):
    by = {(r["adapter"], r["dtype"], _shape_key(r)): r for r in records}
    ours, ref = by.get(("ours", dname, shape)), by.get((other, dname, shape))
    if ours is None or ref is None:
        return None, None, None
    k = key + "_ms" if key in ("time_fwd", "time_fwdbwd", "time_fwdbwd_p10") else key
    a, b = ours[k], ref[k]
    return a, b, (a / b if b > 0 else math.inf)


def _fmt_bytes(b):
    return f"{b / 2**20:.1f}" if b >= 2**20 / 10 else f"{b / 2**20:.3f}"


def _fmt_ms(ms):
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _table(records):
    head = (
        "| shape (N x V_local) | adapter | dtype | outputs | fwd ms (p10-p90) | fwd+bwd ms (p10-p90) | fwd+bwd x ours "
        "| fwd+bwd x floor | peak fwd MiB (x shard) | peak fwd+bwd MiB (x shard) | saved new (B/token) "
        "| saved alias (x shard) | coll fwd/bwd | B/token fwd | err logp | err H | err grad (grad dtype) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by = {(r["adapter"], r["dtype"], _shape_key(r)): r for r in records}
    for r in records:
        ours = by.get(("ours", r["dtype"], _shape_key(r)))
        rel = r["time_fwdbwd_ms"] / ours["time_fwdbwd_ms"] if ours else float("nan")
        ent = f"{r['err_entropy']:.1e}" if r["err_entropy"] is not None else "-"
        name = r["adapter"] + (f" ({r['impl']})" if r["impl"] != "-" else "")
        # CPU floors measure page faults and caches more than bandwidth (docs/benchmarks.md, finding 3)
        floor = f"{r['x_floor_fwdbwd']:.2f}" if r["device"] == "cuda" else "-"
        lines.append(
            f"| {r['tokens']} x {r['v_local']} | {name} | {r['dtype']} | {r['outputs']} "
            f"| {_fmt_ms(r['time_fwd_ms'])} ({_fmt_ms(r['time_fwd_p10_ms'])}-{_fmt_ms(r['time_fwd_p90_ms'])}) "
            f"| {_fmt_ms(r['time_fwdbwd_ms'])} ({_fmt_ms(r['time_fwdbwd_p10_ms'])}-{_fmt_ms(r['time_fwdbwd_p90_ms'])}) "
            f"| {rel:.2f} | {floor} "
            f"| {_fmt_bytes(r['peak_fwd'])} ({r['peak_fwd_x_shard']:.3f}) "
            f"| {_fmt_bytes(r['peak_fwdbwd'])} ({r['peak_fwdbwd_x_shard']:.3f}) "
            f"| {r['saved_new_bytes_per_token']:.1f} | {r['saved_alias_bytes_x_shard']:.2f} "
            f"| {r['coll_fwd']}/{r['coll_bwd']} | {r['coll_fwd_bytes_per_token']:.0f} "
            f"| {r['err_logp']:.1e} | {ent} | {r['err_grad']:.1e} ({r['grad_dtype']}) |"
        )
    return "\n".join(lines)


def gpu_target_lines(records, device_name):
    """PASS/FAIL lines for the absolute GPU targets (GPU_TARGETS) that apply to this device and run."""
    key = next((k for k in GPU_TARGETS if k in device_name), None)
    if key is None:
        return [f"  info: no absolute targets for {device_name!r} (written for {', '.join(GPU_TARGETS)})"]
    fwd_max, fwdbwd_max = GPU_TARGETS[key]
    rows = [
        r
        for r in records
        if r["adapter"] == "ours" and r["dtype"] == "bf16" and (r["tokens"], r["v_local"]) == GPU_TARGET_SHAPE
    ]
    if not rows:
        return [
            f"  [{key}] absolute targets: bf16 {GPU_TARGET_SHAPE[0]} x {GPU_TARGET_SHAPE[1]} not measured"
        ]
    r = rows[0]
    peak_max = r["shard_bytes"] + PEAK_SLACK_BYTES_PER_TOKEN * r["tokens"]
    checks = [
        ("fwd", r["time_fwd_ms"], fwd_max, "ms"),
        ("fwd+bwd", r["time_fwdbwd_ms"], fwdbwd_max, "ms"),
        ("peak fwd+bwd", r["peak_fwdbwd"] / 2**20, peak_max / 2**20, "MiB"),
    ]
    lines = []
    for what, value, bound, unit in checks:
        ok = value <= bound
        note = " (one bf16 gradient buffer + 256 B/token)" if unit == "MiB" else " (median)"
        lines.append(
            f"  {'PASS' if ok else 'FAIL'} [{key} bf16 {GPU_TARGET_SHAPE[0]}x{GPU_TARGET_SHAPE[1]}] ours {what}: "
            f"{value:.3f} {unit} (target <= {bound:.3f}{note})"
        )
    return lines


def _report(records, skipped, args, device_name):
    print()
    shapes = ", ".join(f"{n} x {v}" for n, v in args.shapes)
    print(
        f"## vocab-parallel log-prob/entropy: {shapes} (tokens x vocab), TP={args.tp}, {args.device} "
        f"({device_name}), median of {args.repeats} runs after {args.warmup} warm-ups (max over ranks)"
    )
    versions = f"torch {torch.__version__}"
    if args.device == "cuda":
        import triton

        versions += f", CUDA {torch.version.cuda}, Triton {triton.__version__}"
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}, {versions}")
    print(
        "load average (1/5/15 min) at the end: "
        + "/".join(f"{x:.2f}" for x in os.getloadavg())
        + f" on {os.cpu_count()} CPUs (timings are noisy when other jobs run)"
    )
    print()
    print(_table(records))
    for s in skipped:
        print(f"not measured: {s['adapter']} {s['dtype']} {s['tokens']} x {s['vocab']}: {s['skipped']}")
    print()
    print("Targets (ours vs the megatron row a caller that needs entropy would use; peak = fwd+bwd):")
    n_fail = 0
    for shape in args.shapes:
        tag = f"{shape[0]}x{shape[1]}" if len(args.shapes) > 1 else ""
        for dname, key, other, bound in TARGETS:
            if dname not in args.dtypes:
                continue
            a, b, ratio = _ratio(records, shape, dname, key, other)
            if ratio is None:
                print(f"  [{dname}{' ' + tag if tag else ''}] {key} vs {other}: not measured")
                continue
            ok = ratio <= bound
            n_fail += not ok
            unit = "ms" if key.startswith("time") else "MiB"
            av, bv = (a, b) if unit == "ms" else (a / 2**20, b / 2**20)
            extra = ""
            if unit == "ms":  # the fastest runs are the least disturbed by other jobs on a shared machine
                _, _, r10 = _ratio(records, shape, dname, "time_fwdbwd_p10", other)
                extra = f", medians; p10/p10 = {r10:.3f} (info)"
            print(
                f"  {'PASS' if ok else 'FAIL'} [{dname}{' ' + tag if tag else ''}] {key}: ours {av:.3f} {unit} / "
                f"{other} {bv:.3f} {unit} = {ratio:.3f} (target <= {bound}{extra})"
            )
        for dname, key, other in INFO_TARGETS:
            if dname not in args.dtypes:
                continue
            a, b, ratio = _ratio(records, shape, dname, key, other)
            if ratio is not None:
                print(
                    f"  info [{dname}{' ' + tag if tag else ''}] {key}: ours / {other} (in place, input destroyed) = {ratio:.3f}"
                )
    for r in records:
        if r["adapter"] == "ours":
            ok = r["saved_new_bytes_per_token"] <= 16 and r["coll_fwd"] <= 2 and r["coll_bwd"] == 0
            n_fail += not ok
            print(
                f"  {'PASS' if ok else 'FAIL'} [{r['dtype']} {r['tokens']}x{r['v_local']}] ours: saved new "
                f"{r['saved_new_bytes_per_token']:.1f} B/token (<= 16), collectives {r['coll_fwd']} fwd (<= 2) / "
                f"{r['coll_bwd']} bwd (0)"
            )
    if args.device == "cuda":
        for line in gpu_target_lines(records, device_name):
            n_fail += line.lstrip().startswith("FAIL")
            print(line)
    print(f"{n_fail} target(s) failed" if n_fail else "all targets met")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    with open(args.out, "w") as f:
        for r in records + skipped:
            r = dict(
                r, date=stamp, torch=torch.__version__, host_cpus=os.cpu_count(), machine=platform.machine()
            )
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(records) + len(skipped)} JSON lines to {args.out}")


# ------------------------------------------------------------------------------------------------------
# CLI


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_shapes(text):
    shapes = []
    for item in text.split(","):
        n, _, v = item.strip().lower().partition("x")
        if not (n.isdigit() and v.isdigit()) or int(n) < 1 or int(v) < 1:
            raise ValueError(item)
        shapes.append((int(n), int(v)))
    return shapes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--shapes",
        help="comma-separated TOKENSxVOCAB (global vocab, divisible by --tp); default: cpu "
        f"{DEVICE_DEFAULTS['cpu']['shapes']}, cuda {DEVICE_DEFAULTS['cuda']['shapes']}",
    )
    p.add_argument("--tokens", type=int, help="with --vocab: one shape (the CPU default is 4096 x 32768)")
    p.add_argument("--vocab", type=int, help="global vocabulary (divisible by --tp)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--repeats", type=int, help="timed runs per adapter and mode (cpu 5, cuda 20)")
    p.add_argument("--warmup", type=int, help="untimed runs first (cpu 2, cuda 3)")
    p.add_argument("--tp", type=int, help="tensor-parallel size = number of processes (cpu 2, cuda 1)")
    p.add_argument(
        "--gemm-hidden", type=int, help="hidden size of the lm_head GEMMs timed in the calibration (0 = none)"
    )
    p.add_argument(
        "--baseline", metavar="REF", help="also run the op as it was at git revision REF (e.g. main)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="small smoke shape (cpu 256 x 4096, cuda 4096 x 19008)"
    )
    p.add_argument("--out", default="outputs/bench_vocab_parallel.jsonl")
    args = p.parse_args(argv)
    defaults = DEVICE_DEFAULTS[args.device]
    for key in ("repeats", "warmup", "tp", "gemm_hidden"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if (args.tokens is None) != (args.vocab is None):
        p.error("--tokens and --vocab go together (or use --shapes)")
    shapes = args.shapes or defaults["shapes"]
    if args.tokens is not None:
        shapes = f"{args.tokens}x{args.vocab}"
    if args.quick:
        shapes = QUICK_SHAPES[args.device]
    try:
        args.shapes = _parse_shapes(shapes)
    except ValueError as e:
        p.error(f"--shapes: {e} is not TOKENSxVOCAB with positive integers (e.g. 32768x19008)")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        p.error(f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}")
    odd = [v for _, v in args.shapes if v % args.tp]
    if odd:
        p.error(f"vocab {odd[0]} must be divisible by --tp {args.tp}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device visible to torch (torch.cuda.is_available() is False)")
        if args.tp > torch.cuda.device_count():
            p.error(f"--tp {args.tp} needs {args.tp} GPUs; {torch.cuda.device_count()} visible")
    return args


def _export_baseline(ref, directory):
    """Write `pipeline/ops/vocab_parallel.py` as of git revision `ref` into `directory`; its path."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        ["git", "show", f"{ref}:pipeline/ops/vocab_parallel.py"], cwd=root, capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"bench_vocab_parallel: --baseline {ref}: {proc.stderr.strip()}")
    path = os.path.join(directory, "vocab_parallel_baseline.py")
    with open(path, "w") as f:
        f.write(proc.stdout)
    return path


def main(argv=None):
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    backend = "NCCL" if args.device == "cuda" else "gloo, 1 thread each"
    shapes = ", ".join(f"{n} x {v}" for n, v in args.shapes)
    print(
        f"bench_vocab_parallel: {shapes} on {args.device}, TP={args.tp} ({args.tp} processes, {backend}), "
        f"dtypes {','.join(args.dtypes)}, {args.repeats} runs + {args.warmup} warm-ups; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        args.baseline_path = _export_baseline(args.baseline, tmp) if args.baseline else None
        mp.spawn(_worker, args=(args, _free_port()), nprocs=args.tp, join=True)
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
