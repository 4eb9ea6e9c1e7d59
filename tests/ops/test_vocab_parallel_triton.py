"""The Triton kernels of the vocab-parallel op (impl="triton") on the op's hard cases, against float64
and the torch path, at TP = 1 and 2: on CUDA where present, else on CPU through Triton's interpreter
(TRITON_INTERPRET=1; small shapes, tiles of 32 columns so that every row spans several tiles and a
ragged last one). Plus: the kernels compile for sm_80 and sm_90 without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.ops import vocab_parallel_logprob_entropy
from pipeline.ops.reference import reference
from tests.distributed import run_distributed
from tests.ops import test_vocab_parallel as op_tests

pytest.importorskip("triton", reason="Triton is not installed (tools/setup_env.sh installs it)")

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
BLOCK_V = 32  # columns per tile in these tests (the op's 96-column vocab: 3 tiles at TP 1, 2 at TP 2)
DTYPES = (torch.float32, torch.bfloat16)


def _device(rank=0):
    return f"cuda:{rank % torch.cuda.device_count()}" if CUDA else "cpu"


# ------------------------------------------------------------------------------------------------------
# Checks. Each runs in a spawned rank (tests/distributed.py): on CPU, TRITON_INTERPRET=1 must be in the
# environment before Triton is first imported (its standard library, tl.max/tl.sum, is @jit-compiled at
# import), which only a fresh process guarantees; the pytest process may have imported Triton already.


def _hard_cases(rank, tp, group):
    return op_tests._all_cases(rank, tp, group, DTYPES, (None,), "triton", (True, False), _device(rank))


def _paths_agree(rank, tp, group):
    """Same values as the torch path to fp32 rounding (different summation orders); gradients to one
    rounding step of the input dtype; zero gradient on vocab padding."""
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(21)
        z = (torch.randn(9, 80, generator=g) * 3).to(dtype).to(_device())
        t = torch.randint(0, 75, (9,), generator=g).to(_device())
        w = torch.randn(9, generator=g).to(_device())
        res = {}
        for impl in ("torch", "triton"):
            x = z.clone().requires_grad_()
            out = vocab_parallel_logprob_entropy(
                x, t, temperature=0.8, valid_vocab_size=75, influence=True, impl=impl
            )
            (grad,) = torch.autograd.grad((out.logprob * w).sum() - (out.entropy * w.flip(0)).sum(), x)
            res[impl] = (out, grad)
        (a, ga), (b, gb) = res["torch"], res["triton"]
        for x, y in zip(a, b):
            assert torch.allclose(x, y, rtol=2e-6, atol=2e-6), (dtype, x, y)
        assert gb.dtype == dtype
        step = 2e-6 if dtype == torch.float32 else 2**-8
        assert torch.allclose(ga.float(), gb.float(), rtol=step, atol=step * gb.float().abs().max().item())
        assert torch.count_nonzero(gb[:, 75:]) == 0
    return True


def _gradcheck_float64(rank, tp, group):
    """fp64 logits accumulate in fp64 inside the kernels: the analytic gradient passes gradcheck."""
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(3, 40, generator=g, dtype=torch.float64) * 2).to(_device()).requires_grad_()
    target = torch.tensor([0, 38, 20]).to(_device())

    def fn(x):
        out = vocab_parallel_logprob_entropy(x, target, temperature=0.7, valid_vocab_size=39, impl="triton")
        return out.logprob, out.entropy

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-8)
    out = vocab_parallel_logprob_entropy(
        z, target, temperature=0.7, valid_vocab_size=39, impl="triton", influence=True
    )
    for ours, r in zip(out, reference(z.detach().cpu(), target.cpu(), 0.7, 39)):
        assert ours.dtype == torch.float64
        assert torch.allclose(ours.cpu(), r, atol=1e-12, rtol=0)
    return True


def _dead_rows(rank, tp, group):
    return all(op_tests._check_dead_rows(rank, tp, group, "triton", d, _device(rank)) for d in DTYPES)


def _collectives_and_saved(rank, tp, group):
    return op_tests._count_collectives_and_saved(rank, tp, "triton", _device(rank))


def _odd_shapes(rank, tp, group):
    """Non-contiguous logits (no copy: the kernels take both strides), leading dims, N = 0 and 1."""
    dev = _device()
    z = torch.randn(40, 6, device=dev).t()  # [6, 40], column stride 6
    keep = z.clone()
    t = (torch.arange(6) * 5).to(dev)
    out = vocab_parallel_logprob_entropy(z, t, impl="triton")
    ref = reference(keep.cpu(), t.cpu())
    assert torch.equal(z, keep)
    assert torch.allclose(out.logprob.double().cpu(), ref[0], atol=1e-5)
    assert torch.allclose(out.entropy.double().cpu(), ref[1], atol=1e-5)
    z3 = torch.randn(2, 3, 50, device=dev, requires_grad=True)
    out3 = vocab_parallel_logprob_entropy(
        z3, torch.randint(0, 50, (2, 3)).to(dev), entropy=False, impl="triton"
    )
    assert out3.logprob.shape == (2, 3) and out3.entropy is None
    out3.logprob.sum().backward()
    assert z3.grad.shape == z3.shape and torch.isfinite(z3.grad).all()
    empty_z = torch.randn(0, 16, device=dev, requires_grad=True)
    empty = vocab_parallel_logprob_entropy(
        empty_z, torch.zeros(0, dtype=torch.long, device=dev), impl="triton"
    )
    assert empty.logprob.shape == (0,)
    (empty.logprob.sum() + empty.entropy.sum()).backward()
    assert empty_z.grad.shape == (0, 16)
    one = vocab_parallel_logprob_entropy(
        torch.randn(1, 16, device=dev), torch.tensor([3], device=dev), impl="triton"
    )
    assert one.logprob.shape == (1,)
    return True


CHECKS = {
    1: [_hard_cases, _paths_agree, _gradcheck_float64, _dead_rows, _odd_shapes],
    2: [_hard_cases, _dead_rows, _collectives_and_saved],
}


def _session(rank, world_size, block_v):
    """Every check of this TP size in one spawned rank; a failing check reports its traceback and
    does not hide the others."""
    from pipeline.ops import vocab_parallel_triton

    assert CUDA or vocab_parallel_triton.INTERPRETED
    vocab_parallel_triton.MAX_BLOCK_V = block_v
    group = dist.new_group(list(range(world_size))) if world_size > 1 else None
    results = {}
    for check in CHECKS[world_size]:
        try:
            results[check.__name__] = (True, check(rank, world_size, group))
        except Exception:
            results[check.__name__] = (False, traceback.format_exc())
    return results


@pytest.fixture(scope="module")
def sessions():
    """Runs the TP = 1 and TP = 2 sessions once, on first use, each in fresh processes."""
    cache = {}

    def get(tp):
        if tp not in cache:
            saved = os.environ.get("TRITON_INTERPRET")
            if not CUDA:
                os.environ["TRITON_INTERPRET"] = "1"  # inherited by the spawned ranks
            try:
                cache[tp] = run_distributed(_session, tp, BLOCK_V)
            finally:
                if saved is None:
                    os.environ.pop("TRITON_INTERPRET", None)
                else:
                    os.environ["TRITON_INTERPRET"] = saved
        return cache[tp]

    return get


def _result(sessions, tp, check):
    values = []
    for rank, results in enumerate(sessions(tp)):
        ok, value = results[check.__name__]
        assert ok, f"rank {rank}:\n{value}"
        values.append(value)
    return values


def test_tp1_matches_float64_reference_on_hard_cases(sessions):
    (results,) = _result(sessions, 1, _hard_cases)
    assert len(results) == 11 * 2 * 2  # cases x dtypes x with/without influence
    op_tests._assert_within_tolerance(results)


@pytest.mark.multiproc
def test_tp2_matches_float64_reference_on_hard_cases(sessions):
    for results in _result(sessions, 2, _hard_cases):
        op_tests._assert_within_tolerance(results)


def test_triton_and_torch_paths_agree(sessions):
    assert _result(sessions, 1, _paths_agree) == [True]


def test_gradcheck_float64(sessions):
    assert _result(sessions, 1, _gradcheck_float64) == [True]


def test_rows_without_any_finite_logit_give_nan_and_zero_gradient(sessions):
    assert _result(sessions, 1, _dead_rows) == [True]


@pytest.mark.multiproc
def test_rows_without_any_finite_logit_tp2(sessions):
    assert _result(sessions, 2, _dead_rows) == [True, True]


@pytest.mark.multiproc
def test_two_forward_collectives_none_in_backward_and_12_bytes_per_token_saved(sessions):
    for fwd, bwd, saved_per_token in _result(sessions, 2, _collectives_and_saved):
        assert fwd == 2 and bwd == 0, (fwd, bwd)
        assert saved_per_token <= 12, saved_per_token


def test_noncontiguous_input_leading_dims_empty_and_single_token(sessions):
    assert _result(sessions, 1, _odd_shapes) == [True]


@pytest.mark.skipif(CUDA, reason="checks the error a CPU machine without the interpreter gives")
def test_triton_on_cpu_without_interpreter_says_what_to_do():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\n"
        "from pipeline.ops import vocab_parallel_logprob_entropy as f\n"
        "f(torch.randn(2, 8), torch.tensor([0, 1]), impl='triton')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "needs CUDA tensors" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr[-2000:]


def test_kernels_compile_for_sm80_and_sm90_without_a_gpu():
    """Ahead-of-time compilation to cubin (Triton's own ptxas) of every kernel variant the op can
    launch: catches what the interpreter does not check (types, lowering, register spills)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "compile_vocab_parallel_kernels.py"), "--arch", "80,90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.strip("|").split(" | ") for line in proc.stdout.splitlines() if line.startswith("| sm_")]
    assert len(rows) == 2 * 4 * (2 + 3), proc.stdout  # 2 archs x 4 dtypes x (2 forward + 3 backward)
    for arch, kind, dtype, variant, load, store, _regs, spills in rows:
        assert spills.strip() == "0", (arch, kind, dtype, variant)
        if dtype != "fp64":  # the shard is streamed with 16-byte loads, the gradient with 16-byte stores
            assert load == "v4" and (kind == "forward" or store == "v4"), (arch, kind, dtype, variant)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_is_triton_on_cuda_and_syncs_once_per_call():
    z = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    a = vocab_parallel_logprob_entropy(z, t, impl="auto")
    b = vocab_parallel_logprob_entropy(z, t, impl="triton")
    assert torch.equal(a.logprob, b.logprob) and torch.equal(a.entropy, b.entropy)
    for impl in ("triton", "torch"):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with pytest.warns(UserWarning) as record:
                out = vocab_parallel_logprob_entropy(z, t, impl=impl, chunk_elements=64 * 1000 // 8)
                (out.logprob.sum() + out.entropy.sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in record if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, (impl, [str(w.message) for w in syncs])  # the target range check
