"""vocab_parallel_logprob_entropy against a float64 reference on the gathered logits, at TP = 1, 2, 4."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from pipeline.ops import vocab_parallel_logprob_entropy
from tests.distributed import run_distributed

V = 96  # global vocab: divisible by 1, 2, 4


def reference(z: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, valid: int | None = None):
    """float64 log p(target), entropy and influence on the full (gathered) logits."""
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


def make_cases():
    """Named hard cases: (name, full logits float64 [N, V], target [N], valid_vocab_size, temperature)."""
    g = torch.Generator().manual_seed(1234)
    n = 12
    cases = []

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def tgt(hi=V):
        return torch.randint(0, hi, (n,), generator=g)

    cases.append(("random", randn(n, V, scale=3.0), tgt(), None, 1.0))
    big = randn(n, V, scale=2.0) + 1e4
    big[: n // 2] -= 2e4  # +-1e4 offsets: max shifting and the cancellation in H
    cases.append(("magnitude_1e4", big, tgt(), None, 1.0))
    onehot = randn(n, V) * 0.1
    t = tgt()
    onehot[torch.arange(n), t] += 60.0  # H ~ 0, logp ~ 0
    t2 = t.clone()
    t2[::2] = (t2[::2] + 7) % V  # and targets far in the tail: logp ~ -60
    cases.append(("one_hot_like", onehot, t2, None, 1.0))
    cases.append(("uniform", torch.full((n, V), 0.5, dtype=torch.float64), tgt(), None, 1.0))
    cases.append(("vocab_padding", randn(n, V, scale=2.0), tgt(V - 13), V - 13, 1.0))
    cases.append(("padding_fills_last_rank", randn(n, V, scale=2.0), tgt(V // 4 - 3), V // 4 - 3, 1.0))
    cases.append(("temperature_0.6", randn(n, V, scale=2.0), tgt(), None, 0.6))
    last = torch.full((n,), V - 1)
    last[::3] = V - 2  # targets on the last rank, incl. the last id
    cases.append(("target_on_last_rank", randn(n, V, scale=2.0), last, None, 1.0))
    boundary = torch.tensor(
        [0, V // 4 - 1, V // 4, V // 2 - 1, V // 2, 3 * V // 4 - 1, 3 * V // 4, V - 1] * 2
    )[:n]
    cases.append(("shard_boundaries", randn(n, V, scale=2.0), boundary, None, 1.0))
    neg = randn(n, V, scale=2.0)
    neg[:, 5:40:3] = float("-inf")  # masked-out vocabulary entries
    tn = tgt()
    tn = torch.where(torch.isneginf(neg.gather(1, tn[:, None]).squeeze(1)), torch.full_like(tn, 4), tn)
    cases.append(("neg_inf_entries", neg, tn, None, 1.0))
    return cases


def _check_case(z_full, target, valid, temperature, dtype, rank, tp, group, chunk, seed):
    """Run the op on this rank's shard; return max errors vs the float64 reference."""
    v_local = z_full.shape[-1] // tp
    z_in = z_full.to(dtype)  # the values both the op and the reference see
    shard = z_in[..., rank * v_local : (rank + 1) * v_local].clone().requires_grad_()
    out = vocab_parallel_logprob_entropy(
        shard,
        target,
        tp_group=group,
        temperature=temperature,
        valid_vocab_size=valid,
        influence=True,
        chunk_elements=chunk,
    )
    zr = z_in.double().requires_grad_()
    r_lp, r_ent, r_inf = reference(zr, target, temperature, valid)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(target.shape, generator=gen, dtype=torch.float64)
    b = torch.randn(target.shape, generator=gen, dtype=torch.float64)
    errs = {
        "logprob": (out.logprob.double() - r_lp.detach()).abs().max().item(),
        "entropy": (out.entropy.double() - r_ent.detach()).abs().max().item(),
        "influence": (out.influence.double() - r_inf.detach()).abs().max().item(),
    }
    # gradient of logprob.sum(), then of (logprob * a + entropy * b).sum()
    for name, (ours, ref) in {
        "grad_logprob_sum": (out.logprob.sum(), r_lp.sum()),
        "grad_mixed": (
            (out.logprob.double() * a + out.entropy.double() * b).sum(),
            (r_lp * a + r_ent * b).sum(),
        ),
    }.items():
        (g_ours,) = torch.autograd.grad(ours, shard, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref, zr, retain_graph=True)
        full_ref = torch.zeros_like(z_in, dtype=torch.float64)
        full_ref[..., : g_ref.shape[-1]] = torch.nan_to_num(g_ref, posinf=0.0, neginf=0.0)
        ref_shard = full_ref[..., rank * v_local : (rank + 1) * v_local]
        assert g_ours.dtype == dtype, (g_ours.dtype, dtype)
        errs[name] = (g_ours.double() - ref_shard).abs().max().item()
        errs[name + "_scale"] = ref_shard.abs().max().item()
    errs["outputs_fp"] = [out.logprob.dtype, out.entropy.dtype, out.influence.dtype]
    return errs


def _all_cases(rank, tp, group, dtypes, chunks):
    results = {}
    for ci, (name, z, t, valid, temp) in enumerate(make_cases()):
        for dtype in dtypes:
            for chunk in chunks:
                key = f"{name}/{str(dtype).split('.')[-1]}/chunk{chunk}"
                results[key] = _check_case(z, t, valid, temp, dtype, rank, tp, group, chunk, seed=ci)
    return results


def _worker(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    return _all_cases(rank, world_size, group, (torch.float32, torch.bfloat16), (1 << 17, 40))


def _assert_within_tolerance(results):
    for key, e in results.items():
        if "/float32/" in key:
            tol_val, tol_grad = 1e-5, 1e-5
        else:  # bf16 input, fp32 accumulation: values 1e-4, gradients to bf16 rounding (2^-8 relative)
            tol_val, tol_grad = 1e-4, None
        for field in ("logprob", "entropy", "influence"):
            assert e[field] <= tol_val, f"{key}: {field} error {e[field]:.3g} > {tol_val}"
        for field in ("grad_logprob_sum", "grad_mixed"):
            tol = tol_grad if tol_grad is not None else 2**-8 * max(1.0, e[field + "_scale"])
            assert e[field] <= tol, f"{key}: {field} error {e[field]:.3g} > {tol:.3g}"
        assert e["outputs_fp"] == [torch.float32] * 3, key


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


def _count_collectives_and_saved(rank, world_size):
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
    shard = torch.randn(n_tok, v_local, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, v_local * world_size, (n_tok,))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for name in names:
        setattr(dist, name, counting(originals[name]))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = vocab_parallel_logprob_entropy(shard, target, tp_group=group, influence=True)
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
        # 3 fp32 statistics and 1 flag per token: nothing proportional to V_local
        assert saved_per_token <= 16, saved_per_token
