"""vocab_parallel_logprob_entropy against a float64 reference on the gathered logits, at TP = 1, 2, 4."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.ops import vocab_parallel_logprob_entropy
from pipeline.ops.reference import case_errors, hard_cases, reference, tolerance_failures
from pipeline.ops.vocab_parallel import default_chunk_elements
from tests.distributed import run_distributed

V = 96  # global vocab: divisible by 1, 2, 4


def make_cases():
    return hard_cases(n=12, vocab=V, max_tp=4)


def _all_cases(rank, tp, group, dtypes, chunks, impl="torch", influences=(True,), device="cpu"):
    results = {}
    for ci, (name, z, t, valid, temp) in enumerate(make_cases()):
        for dtype in dtypes:
            for chunk in chunks:
                for infl in influences:
                    key = f"{name}/{str(dtype).split('.')[-1]}/chunk{chunk}/{impl}/influence={infl}"
                    results[key] = case_errors(
                        z,
                        t,
                        valid,
                        temp,
                        dtype,
                        rank,
                        tp,
                        group,
                        impl=impl,
                        influence=infl,
                        device=device,
                        chunk=chunk,
                        seed=ci,
                    )
                    results[key]["dtype"] = dtype
    return results


def _worker(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    return _all_cases(rank, world_size, group, (torch.float32, torch.bfloat16), (1 << 17, 40))


def _assert_within_tolerance(results):
    for key, e in results.items():
        bad = tolerance_failures(e, e["dtype"])
        assert not bad, f"{key}: {'; '.join(bad)}"


def test_tp1_matches_float64_reference_on_hard_cases():
    results = _all_cases(0, 1, None, (torch.float32, torch.bfloat16), (1 << 17, 40))
    _assert_within_tolerance(results)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_float64_reference_on_hard_cases(tp):
    per_rank = run_distributed(_worker, tp)
    for results in per_rank:
        _assert_within_tolerance(results)


def test_float64_input_gives_float64_outputs_exact_to_rounding():
    for name, z, t, valid, temp in make_cases():
        zz = z.clone().requires_grad_()
        out = vocab_parallel_logprob_entropy(zz, t, temperature=temp, valid_vocab_size=valid, influence=True)
        ref = reference(z, t, temp, valid)
        for ours, r in zip(out, ref):
            assert ours.dtype == torch.float64
            assert torch.allclose(ours, r, atol=1e-10, rtol=0), name


class _ShardWithGatheredGrad(torch.autograd.Function):
    """Test helper: slice this rank's shard of identical full logits; backward all-gathers the shard
    gradients so the Jacobian w.r.t. the full tensor is complete on every rank (for gradcheck)."""

    @staticmethod
    def forward(ctx, full, rank, tp, group):
        ctx.rank, ctx.tp, ctx.group = rank, tp, group
        v = full.shape[-1] // tp
        return full[..., rank * v : (rank + 1) * v].clone()

    @staticmethod
    def backward(ctx, g):
        parts = [torch.empty_like(g) for _ in range(ctx.tp)]
        dist.all_gather(parts, g.contiguous(), group=ctx.group)
        return torch.cat(parts, -1), None, None, None


def _gradcheck(rank, tp, group):
    g = torch.Generator().manual_seed(7)
    n, v = 3, 8
    full = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).requires_grad_()
    target = torch.tensor([0, v - 2, v // 2])

    def fn(z):
        shard = _ShardWithGatheredGrad.apply(z, rank, tp, group) if tp > 1 else z
        out = vocab_parallel_logprob_entropy(
            shard, target, tp_group=group, temperature=0.7, valid_vocab_size=v - 1, chunk_elements=5
        )
        return out.logprob, out.entropy

    return torch.autograd.gradcheck(fn, (full,), eps=1e-6, atol=1e-8)


def _gradcheck_worker(rank, world_size):
    return _gradcheck(rank, world_size, dist.new_group(list(range(world_size))))


def test_gradcheck_float64_tp1():
    assert _gradcheck(0, 1, None)


@pytest.mark.multiproc
def test_gradcheck_float64_tp2():
    assert all(run_distributed(_gradcheck_worker, 2))


def test_influence_predicts_entropy_change_of_a_small_policy_gradient_step():
    """Tabular softmax (the logits are the parameters): dH of one plain PG step = -eta * A * influence."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 40, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 40, (5,), generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.3], dtype=torch.float64)
    out = vocab_parallel_logprob_entropy(z, y, influence=True)
    for eta in (1e-2, 1e-3):
        zz = z.clone().requires_grad_()
        logp = vocab_parallel_logprob_entropy(zz, y, entropy=False).logprob
        (grad,) = torch.autograd.grad((adv * logp).sum(), zz)  # ascent direction of A * log p_y
        h0 = reference(z, y)[1]
        h1 = reference(z + eta * grad, y)[1]
        predicted = -eta * adv * out.influence
        measured = h1 - h0
        # first order: the error shrinks like eta^2
        assert torch.allclose(predicted, measured, rtol=0, atol=5 * eta**2), (predicted, measured)
        assert (measured - predicted).abs().max() < 0.05 * measured.abs().max()


def test_gradient_comes_back_in_input_dtype_and_padding_gets_none():
    z = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    t = torch.tensor([0, 1, 2, 20])
    out = vocab_parallel_logprob_entropy(z, t, valid_vocab_size=21)
    (out.logprob.sum() + out.entropy.sum()).backward()
    assert z.grad.dtype == torch.bfloat16
    assert torch.count_nonzero(z.grad[:, 21:]) == 0


def test_inputs_are_not_modified_and_noncontiguous_input_works():
    base = torch.randn(32, 6, dtype=torch.float32)
    z = base.t()  # [6, 32], non-contiguous
    keep = z.clone()
    t = torch.arange(6) * 5
    out = vocab_parallel_logprob_entropy(z, t)
    ref = reference(keep, t)
    assert torch.equal(z, keep)
    assert torch.allclose(out.logprob.double(), ref[0], atol=1e-5)
    assert torch.allclose(out.entropy.double(), ref[1], atol=1e-5)


def test_leading_dims_and_empty_and_single_token():
    z = torch.randn(2, 3, 16)
    t = torch.randint(0, 16, (2, 3))
    out = vocab_parallel_logprob_entropy(z, t, entropy=False)
    assert out.logprob.shape == (2, 3) and out.entropy is None and out.influence is None
    empty = vocab_parallel_logprob_entropy(
        torch.randn(0, 16, requires_grad=True), torch.zeros(0, dtype=torch.long)
    )
    assert empty.logprob.shape == (0,)
    one = vocab_parallel_logprob_entropy(torch.randn(1, 16), torch.tensor([3]))
    assert one.logprob.shape == (1,)


def test_unused_entropy_output_costs_no_entropy_gradient():
    z = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 2, 3])
    out = vocab_parallel_logprob_entropy(z, t)
    (g,) = torch.autograd.grad(out.logprob.sum(), z)
    ref = torch.nn.functional.one_hot(t, 10) - torch.softmax(z.detach(), -1)
    assert torch.allclose(g, ref, atol=1e-12)


@pytest.mark.parametrize(
    "logits, target, kwargs, match",
    [
        (torch.randn(3, 8), torch.zeros(4, dtype=torch.long), {}, "shape"),
        (torch.randint(0, 5, (3, 8)), torch.zeros(3, dtype=torch.long), {}, "floating"),
        (torch.randn(3, 8), torch.zeros(3), {}, "int64"),
        (torch.randn(3, 8), torch.tensor([0, 8, 1]), {}, "out of range"),
        (torch.randn(3, 8), torch.tensor([0, -1, 1]), {}, "out of range"),
        (torch.randn(3, 8), torch.tensor([0, 6, 1]), {"valid_vocab_size": 6}, "padding"),
        (torch.randn(3, 8), torch.tensor([0, 1, 1]), {"valid_vocab_size": 9}, "outside the global"),
        (torch.randn(3, 8), torch.tensor([0, 1, 1]), {"valid_vocab_size": 0}, "outside the global"),
        (torch.randn(3, 8), torch.tensor([0, 1, 1]), {"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_input_gets_a_clear_error(logits, target, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        vocab_parallel_logprob_entropy(logits, target, **kwargs)


def test_uniform_entropy_is_log_v():
    z = torch.zeros(2, 1000)
    out = vocab_parallel_logprob_entropy(z, torch.tensor([0, 899]), valid_vocab_size=900)
    assert torch.allclose(out.entropy, torch.full((2,), math.log(900)), atol=1e-6)


def _count_collectives_and_saved(rank, world_size, impl="torch", device="cpu"):
    """Two forward collectives, none in backward; O(tokens) saved beyond references to the inputs."""
    group = dist.new_group(list(range(world_size)))
    calls = {"n": 0}
    names = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "broadcast",
    )
    originals = {name: getattr(dist, name) for name in names}

    def counting(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)

        return wrapped

    n_tok, v_local = 64, 48
    shard = torch.randn(n_tok, v_local, dtype=torch.bfloat16, device=device, requires_grad=True)
    target = torch.randint(0, v_local * world_size, (n_tok,)).to(device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for name in names:
        setattr(dist, name, counting(originals[name]))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = vocab_parallel_logprob_entropy(shard, target, tp_group=group, influence=True, impl=impl)
        fwd = calls["n"]
        (out.logprob.sum() + out.entropy.sum()).backward()
        bwd = calls["n"] - fwd
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    inputs = {shard.untyped_storage().data_ptr(), target.untyped_storage().data_ptr()}
    new_bytes = sum(
        t.untyped_storage().nbytes() for t in saved if t.untyped_storage().data_ptr() not in inputs
    )
    return fwd, bwd, new_bytes / n_tok


@pytest.mark.multiproc
def test_two_forward_collectives_none_in_backward_and_o_tokens_saved():
    for fwd, bwd, saved_per_token in run_distributed(_count_collectives_and_saved, 2):
        assert fwd == 2 and bwd == 0, (fwd, bwd)
        # 3 fp32 statistics per token: nothing proportional to V_local
        assert saved_per_token <= 12, saved_per_token


# Aten ops that make the host wait for the device (a value read back, or a data-dependent shape).
_SYNCING_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "unique", "equal", "item")


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_torch_path_has_no_host_sync_per_chunk():
    """Forward and backward over 32 chunks with -inf logits and vocab padding: no op that reads a
    device value back to the host (the one range check of the ids uses tolist, outside aten)."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(64, 48, generator=g)
    z[::3, 7:20] = float("-inf")
    z.requires_grad_()
    t = torch.randint(20, 45, (64,), generator=g)
    with _OpRecorder() as rec:
        out = vocab_parallel_logprob_entropy(z, t, influence=True, chunk_elements=2 * 48, valid_vocab_size=45)
        (out.logprob.sum() + out.entropy.sum()).backward()
    assert rec.ops.count("exp") + rec.ops.count("exp_") >= 64  # it did run chunk by chunk, both ways
    syncing = [op for op in rec.ops if op in _SYNCING_OPS]
    assert not syncing, syncing
    assert torch.isfinite(z.grad).all()


def test_chunk_size_by_device_and_shape():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert default_chunk_elements(cpu, 32768, 19008) == 1 << 17  # L2-resident on CPUs
    assert default_chunk_elements(gpu, 32768, 19008) == 1 << 24  # 38 chunks, not ~10,000
    assert default_chunk_elements(gpu, 4096, 19008) == 4096 * 19008 // 8  # workspace < the gradient
    assert default_chunk_elements(gpu, 16, 1000) == 1 << 20  # small shards: one chunk
    z = torch.randn(8, 16, requires_grad=True)
    t = torch.randint(0, 16, (8,))
    ref = vocab_parallel_logprob_entropy(z, t, chunk_elements=16)
    auto = vocab_parallel_logprob_entropy(z, t)  # None: by device and shape
    assert torch.allclose(ref.entropy, auto.entropy, atol=1e-6)


def _dead_rows_case(dtype):
    """Row 1: every logit -inf (no distribution); row 2: the first half (whole shards at TP 2 and 4)."""
    g = torch.Generator().manual_seed(11)
    z = (torch.randn(4, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    z[1] = float("-inf")
    z[2, : V // 2] = float("-inf")
    target = torch.tensor([3, 5, V - 1, 60])
    return z, target


def _check_dead_rows(rank, tp, group, impl, dtype, device="cpu"):
    """NaN outputs and a zero gradient on the dead row; the other rows match float64 exactly as usual."""
    z, target = _dead_rows_case(dtype)
    v_local = V // tp
    shard = z[:, rank * v_local : (rank + 1) * v_local].to(device).requires_grad_()
    out = vocab_parallel_logprob_entropy(shard, target.to(device), tp_group=group, influence=True, impl=impl)
    out = type(out)(*(o.cpu() for o in out))
    live = torch.tensor([0, 2, 3])
    ref = reference(z[live], target[live])
    for ours, r in zip(out, ref):
        assert torch.isnan(ours[1]), out
        assert (ours[live].double() - r).abs().max() < (1e-5 if dtype == torch.float32 else 1e-4), (ours, r)
    w = torch.tensor([1.0, 2.0, -1.0, 0.5])
    (grad,) = torch.autograd.grad((out.logprob * w).sum() + (out.entropy * w).sum(), shard)
    grad, shard = grad.cpu(), shard.detach().cpu()
    assert torch.isfinite(grad).all(), grad
    assert torch.count_nonzero(grad[1]) == 0
    assert torch.count_nonzero(grad[2][torch.isneginf(shard[2])]) == 0
    return True


def _dead_rows_worker(rank, world_size, impl, device="cpu"):
    group = dist.new_group(list(range(world_size)))
    return _check_dead_rows(rank, world_size, group, impl, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_any_finite_logit_give_nan_and_zero_gradient(dtype):
    assert _check_dead_rows(0, 1, None, "torch", dtype)


@pytest.mark.multiproc
def test_rows_without_any_finite_logit_tp2():
    assert all(run_distributed(_dead_rows_worker, 2, "torch"))


def test_impl_must_be_known():
    with pytest.raises(ValueError, match="impl must be one of"):
        vocab_parallel_logprob_entropy(torch.randn(2, 4), torch.tensor([0, 1]), impl="cuda")


def test_auto_is_the_torch_path_on_cpu():
    z = torch.randn(5, 32, requires_grad=True)
    t = torch.randint(0, 32, (5,))
    a = vocab_parallel_logprob_entropy(z, t, impl="auto")
    b = vocab_parallel_logprob_entropy(z, t, impl="torch")
    assert torch.equal(a.logprob, b.logprob) and torch.equal(a.entropy, b.entropy)
