"""Self-test of the vocab-parallel log-prob/entropy op on this node: correctness against float64 and
timing, at TP = every local GPU over NCCL, or TP = N CPU processes over gloo where there is no GPU.

    python tools/selftest_vocab_parallel.py              # all local GPUs (torchrun), else 2 CPU processes
    python tools/selftest_vocab_parallel.py --nproc 4    # TP = 4 (GPUs or CPU processes)
    python tools/selftest_vocab_parallel.py --impls torch,triton   # on CPU: Triton via its interpreter

It starts ``torchrun`` itself (one process per rank, rendezvous on 127.0.0.1) and prints two tables:

- correctness: every hard case of ``pipeline/ops/reference.py`` (large offsets, near one-hot, uniform,
  vocab padding, targets on every shard boundary, -inf entries, whole shards masked, temperature) for
  each implementation and input dtype, log-prob, entropy, influence and the gradient against float64 on
  the gathered logits, with the op's test tolerances (fp32 1e-5; bf16 1e-4 and one bf16 rounding step);
- timing at a realistic per-rank shard (GPU: 16384 tokens x 19008 columns, one TP=8 shard of
  Qwen2.5's vocabulary; CPU: 1024 x 8192): forward and forward+backward medians (max over ranks, the
  two collectives included), effective bandwidth, peak extra GPU memory, and the log-prob/entropy
  error against float64 there.

Exit status 0 when every check passes, 1 otherwise. Timing is reported, not judged (the absolute GPU
targets are checked by ``tools/bench_vocab_parallel.py --device cuda``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, help="TP size = processes (default: every GPU, else 2 CPU processes)")
    p.add_argument(
        "--impls", help="comma-separated: auto, torch, triton (default: GPU auto,torch; CPU torch)"
    )
    p.add_argument("--tokens", type=int, help="tokens of the timing shard (GPU 16384, CPU 1024)")
    p.add_argument("--v-local", type=int, help="columns of the timing shard per rank (GPU 19008, CPU 8192)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per implementation, dtype and mode")
    p.add_argument("--quick", action="store_true", help="small timing shard (256 x 2048), 3 runs")
    p.add_argument("--cpu", action="store_true", help="use CPU processes even when GPUs are present")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    if args.nproc is not None and args.nproc < 1:
        p.error("--nproc must be >= 1")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    impls = [i.strip() for i in (args.impls or "").split(",") if i.strip()]
    bad = [i for i in impls if i not in ("auto", "torch", "triton")]
    if bad:
        p.error(f"--impls: unknown {bad}; choose from auto, torch, triton")
    args.impls = impls or None
    return args


# ------------------------------------------------------------------------------------------------------
# Launcher


def launch(args) -> int:
    import torch

    gpus = 0 if args.cpu else torch.cuda.device_count()
    nproc = args.nproc or gpus or 2
    if gpus and nproc > gpus:
        print(
            f"selftest: --nproc {nproc} but {gpus} GPU(s) visible; use --cpu for CPU processes",
            file=sys.stderr,
        )
        return 2
    impls = args.impls or (["auto", "torch"] if gpus else ["torch"])
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    if not gpus and "triton" in impls:
        env["TRITON_INTERPRET"] = "1"  # before Triton is imported in the ranks: its interpreter on CPU
    where = f"{nproc} GPU(s), NCCL" if gpus else f"{nproc} CPU process(es), gloo"
    print(f"selftest_vocab_parallel: TP={nproc} on {where}; implementations {', '.join(impls)}", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        "--tee=0",
        str(Path(__file__).resolve()),
        "--worker",
        f"--impls={','.join(impls)}",
        f"--repeats={args.repeats}",
    ]
    cmd += ["--cpu"] if not gpus else []
    cmd += ["--quick"] if args.quick else []
    cmd += [f"--tokens={args.tokens}"] if args.tokens else []
    cmd += [f"--v-local={args.v_local}"] if args.v_local else []
    t0 = time.time()
    # torchrun owns its ranks: it stops them all when one fails or when it is interrupted
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return proc.returncode


# ------------------------------------------------------------------------------------------------------
# Worker (one rank under torchrun)


def _correctness(impl, dtype, rank, tp, group, device):
    """Worst errors over the hard cases against float64, whether all are within the op's test
    tolerances, the names of the failing cases, and the number of cases."""
    from pipeline.ops.reference import case_errors, hard_cases, tolerance_failures

    cases = hard_cases(n=12, vocab=48 * tp, max_tp=tp)
    worst = {"logp": 0.0, "H": 0.0, "influence": 0.0, "grad": 0.0}
    failed = []
    for ci, (name, z, target, valid, temp) in enumerate(cases):
        errs = case_errors(z, target, valid, temp, dtype, rank, tp, group, impl=impl, device=device, seed=ci)
        if tolerance_failures(errs, dtype):
            failed.append(name)
        for key, field in (
            ("logp", "logprob"),
            ("H", "entropy"),
            ("influence", "influence"),
            ("grad", "grad_mixed"),
        ):
            worst[key] = max(worst[key], errs[field])
    return worst, not failed, failed, len(cases)


def _timing(impl, dtype, n, v_local, repeats, rank, tp, group, device):
    """Median fwd / fwd+bwd ms (max over ranks), peak extra GPU memory, logp/H error vs float64."""
    import torch
    import torch.distributed as dist

    from pipeline.ops import vocab_parallel_logprob_entropy
    from pipeline.ops.reference import reference

    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    logits = torch.randn(n, v_local, generator=gen, device=device).mul_(2.0).to(dtype)
    g_all = torch.Generator(device=device).manual_seed(0)
    target = torch.randint(0, v_local * tp, (n,), generator=g_all, device=device)
    g_logp, g_ent = (torch.randn(n, generator=g_all, device=device) for _ in range(2))
    cuda = device.type == "cuda"

    def run(backward):
        x = logits.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            out = vocab_parallel_logprob_entropy(x, target, tp_group=group, impl=impl)
        if backward:
            torch.autograd.grad([out.logprob, out.entropy], [x], [g_logp, g_ent])
        return out

    def timed(backward):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier(group)
        t0 = time.perf_counter()
        run(backward)
        if cuda:
            torch.cuda.synchronize()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)
        return dt.item()

    result = {}
    for backward, key in ((False, "fwd"), (True, "fwdbwd")):
        for _ in range(2):
            timed(backward)  # warm-up (Triton compiles on first use)
        times = sorted(timed(backward) for _ in range(repeats))
        result[key] = times[len(times) // 2] * 1e3
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    out = run(False)
    err_lp = err_h = 0.0
    for lo in range(0, n, 256):  # float64 reference on the gathered rows, 256 at a time
        hi = min(n, lo + 256)
        parts = [torch.empty(hi - lo, v_local, dtype=torch.float64, device=device) for _ in range(tp)]
        dist.all_gather(parts, logits[lo:hi].double().contiguous(), group=group)
        r_lp, r_h, _ = reference(torch.cat(parts, 1), target[lo:hi])
        err_lp = max(err_lp, (out.logprob[lo:hi].double() - r_lp).abs().max().item())
        err_h = max(err_h, (out.entropy[lo:hi].double() - r_h).abs().max().item())
    result.update(peak=peak, err_logp=err_lp, err_h=err_h, shard_bytes=logits.numel() * logits.element_size())
    return result


def worker(args) -> int:
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rank, tp = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.cpu:
        device, backend = torch.device("cpu"), "gloo"
    else:
        device, backend = torch.device("cuda", int(os.environ["LOCAL_RANK"])), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    group = dist.group.WORLD
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    from pipeline.ops.vocab_parallel import _use_triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    say(f"device: {name}; torch {torch.__version__}")
    impls = []
    for impl in args.impls:
        try:
            resolved = "triton" if _use_triton(impl, torch.empty(0, device=device)) else "torch"
            impls.append((impl, resolved))
        except (RuntimeError, ValueError) as e:
            say(f"{impl}: not available here ({e})")
    failures = 0
    rows = [
        "| check | impl | dtype | TP | err logp | err H | err influence | err grad | result |",
        "|---" * 9 + "|",
    ]
    for impl, resolved in impls:
        for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            worst, ok, failed, n_cases = _correctness(
                impl, dtype, rank, tp, group if tp > 1 else None, device
            )
            flags = torch.tensor([0 if ok else 1], device=device)
            dist.all_reduce(flags, group=group)
            ok = flags.item() == 0
            failures += not ok
            label = f"{impl} ({resolved})" if impl == "auto" else impl
            verdict = "PASS" if ok else f"FAIL ({', '.join(failed) or 'another rank'})"
            rows.append(
                f"| {n_cases} hard cases | {label} | {dname} | {tp} | {worst['logp']:.1e} | {worst['H']:.1e} "
                f"| {worst['influence']:.1e} | {worst['grad']:.1e} | {verdict} |"
            )
            say(f"correctness {label} {dname}: {'PASS' if ok else 'FAIL'}")
    n = args.tokens or (256 if args.quick else 16384 if device.type == "cuda" else 1024)
    v_local = args.v_local or (2048 if args.quick else 19008 if device.type == "cuda" else 8192)
    repeats = 3 if args.quick else args.repeats
    trows = [
        "| impl | dtype | shard (N x V_local) | fwd ms | fwd+bwd ms | fwd+bwd GB/s | peak extra MiB (x shard) "
        "| err logp | err H | result |",
        "|---" * 10 + "|",
    ]
    for impl, resolved in impls:
        if resolved == "triton" and device.type == "cpu":
            say(f"timing {impl}: skipped (Triton's interpreter on CPU checks logic, not speed)")
            continue
        for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            r = _timing(impl, dtype, n, v_local, repeats, rank, tp, group if tp > 1 else None, device)
            ok = max(r["err_logp"], r["err_h"]) <= 1e-4  # |lse| ~ 12 here: 1e-5 x |lse| for fp32, 1e-4 bf16
            failures += not ok
            gbs = 3 * r["shard_bytes"] / (r["fwdbwd"] / 1e3) / 1e9
            peak = (
                f"{r['peak'] / 2**20:.0f} ({r['peak'] / r['shard_bytes']:.2f})"
                if r["peak"] is not None
                else "-"
            )
            label = f"{impl} ({resolved})" if impl == "auto" else impl
            trows.append(
                f"| {label} | {dname} | {n} x {v_local} | {r['fwd']:.3f} | {r['fwdbwd']:.3f} | {gbs:.1f} | {peak} "
                f"| {r['err_logp']:.1e} | {r['err_h']:.1e} | {'PASS' if ok else 'FAIL'} |"
            )
            say(f"timing {label} {dname}: fwd {r['fwd']:.3f} ms, fwd+bwd {r['fwdbwd']:.3f} ms")
    say("")
    say(f"## vocab-parallel op self-test: TP={tp} on {name} ({'NCCL' if backend == 'nccl' else 'gloo'})")
    say("")
    say("\n".join(rows))
    say("")
    say("\n".join(trows))
    say("")
    total = len(rows) - 2 + len(trows) - 2
    say(f"{total - failures} of {total} checks passed" if failures else f"all {total} checks passed")
    dist.destroy_process_group()
    return 1 if failures else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    sys.exit(main())
