"""Peak CPU memory of one forward+backward of the Megatron actor with and without activation recompute.

    python tools/bench_recompute_memory.py [--hidden 768 --layers 6 --seq 1024 --micro-batch 1]

Each variant (none, selective core attention, selective core attention + MLP, full uniform 1 layer,
full block of half the layers) runs in a fresh process: the real `MegatronActor.train_step` (TP1,
fp32, local layer spec, random weights) on the same batch, a warm-up step first (optimizer state,
buffers), then the peak resident memory of a second step above what was resident before it
(Linux's VmHWM, reset through /proc/self/clear_refs). Prints the variants side by side with their
loss and gradient norm, which must agree exactly: recompute changes memory, never the numbers.

On CPU megatron's local attention keeps the full softmax (heads x seq x seq per layer), which
Transformer Engine's fused attention on a GPU never stores: "selective" saves far more here than
it would there. Timings are of a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "none": {},
    "selective (core_attn)": dict(recompute_granularity="selective"),
    "selective (core_attn, mlp)": dict(
        recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]
    ),
    "full, uniform 1 layer": dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    ),
    "full, block half": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=-1),
}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def one(args, variant: str) -> dict:
    """Run in a fresh process: build the actor, warm up, measure the second step."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=0, world_size=1)
    import megatron_patches

    megatron_patches.apply_for_this_machine()
    from pipeline.actor.actor import MegatronActor, initialize_parallel
    from pipeline.actor.config import ActorConfig
    from pipeline.algorithms.config import LossConfig

    heads = args.hidden // 64
    hf = {
        "model_type": "qwen2", "vocab_size": args.vocab, "hidden_size": args.hidden,
        "intermediate_size": int(args.hidden * 8 / 3) // 64 * 64, "num_hidden_layers": args.layers,
        "num_attention_heads": heads, "num_key_value_heads": heads // 4, "max_position_embeddings": args.seq,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    }  # fmt: skip
    kwargs = dict(VARIANTS[variant])
    if kwargs.get("recompute_num_layers") == -1:
        kwargs["recompute_num_layers"] = args.layers // 2
    cfg = ActorConfig(micro_batch_size=args.micro_batch, lr=1e-4, **kwargs)
    initialize_parallel(cfg, hf)
    actor = MegatronActor(cfg, hf)
    g = torch.Generator().manual_seed(0)
    b, s, r = args.micro_batch, args.seq, args.seq // 2
    batch = {
        "input_ids": torch.randint(0, args.vocab, (b, s), generator=g),
        "response_mask": torch.ones(b, r),
        "advantages": torch.randn(b, r, generator=g),
    }
    batch["old_log_prob"] = actor.compute_log_prob(batch, entropy=False)["log_prob"]
    loss = LossConfig(method="ppo")
    actor.train_step(batch, loss)  # warm-up: Adam state, DDP buffers, allocator
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    metrics = actor.train_step(batch, loss)
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    dist.destroy_process_group()
    return {
        "variant": variant,
        "peak_above_resident_mib": (peak - before) / 1024,
        "resident_mib": before / 1024,
        "seconds": seconds,
        "loss": metrics["loss"],
        "grad_norm": metrics["grad_norm"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant here
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args, args.one)))
        return 0
    from tqdm import tqdm

    from pipeline.rollout.server import free_port

    rows = []
    for variant in tqdm(args.variants, desc="variants (a fresh process each)"):
        cmd = [sys.executable, __file__, "--one", variant, "--port", str(free_port()),
               "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
               "--seq", str(args.seq), "--micro-batch", str(args.micro_batch)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"\nforward+backward, TP1 fp32 CPU: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{args.micro_batch} x {args.seq} tokens")  # fmt: skip
    print(
        f"{'recompute':<28} {'peak above resident':>20} {'resident':>10} {'step':>8} {'loss':>14} {'grad norm':>12}"
    )
    base = rows[0]
    for row in rows:
        print(f"{row['variant']:<28} {row['peak_above_resident_mib']:>16.0f} MiB {row['resident_mib']:>6.0f} MiB "
              f"{row['seconds']:>7.1f}s {row['loss']:>14.8f} {row['grad_norm']:>12.6f}")  # fmt: skip
    same = all(r["loss"] == base["loss"] and r["grad_norm"] == base["grad_norm"] for r in rows)
    print(f"losses and gradient norms identical across variants: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
