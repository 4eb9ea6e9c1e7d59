"""Padded rows vs packed micro-batches under a token budget: the actor's forward+backward on CPU.

    .venv/bin/python tools/bench_packing.py                 # 64 long-tailed samples, budget 4096
    .venv/bin/python tools/bench_packing.py --quick         # 16 short samples, a smoke run

The samples: prompts of 50-300 tokens and log-normal responses (median about 300, p99 about 4,000
tokens, capped at 4,096 as a generation limit would), RL's long tail. The model: a small random Qwen2 (made here with transformers, loaded by the
project's Megatron actor, TP=1, fp32, the local layer spec). Two layouts of the same samples, each in
a fresh process (so that peak memory is its own), one forward+backward of every micro-batch through
the model, the vocab-parallel op and a policy-gradient-like loss (-sum A log p - 0.01 H over the
response tokens):

- ``padded``: the layout before packing: prompts left-padded and responses right-padded to the longest
  in the batch, ``[rows, P + R]`` micro-batches of ``--rows`` samples with a dense ``[rows, 1, S, S]``
  mask (megatron's RoPE at the row's positions);
- ``packed``: `pipeline.actor.packing` as the actor uses it on the local spec: first-fit-decreasing
  micro-batches of at most ``--budget`` tokens, each as packed rows as long as its longest sample
  (short samples share a row) with a block-diagonal causal mask and per-sample RoPE positions;
- ``packed+pre-forward``: the same after a no-grad forward of every micro-batch, which the training
  step ran before this change for every loss method (now only for methods that select tokens by the
  current policy, and never on the on-policy mini-batch): what dropping it saves. Timed in the
  ``packed`` process, the two alternating pass by pass, so that a change of load hits both alike.

Reported per layout: micro-batches, token slots computed, real tokens, padding efficiency (real /
slots), the median over ``--repeats`` timed passes (after one warm-up) of the whole forward+backward,
time per real token, and the peak resident memory above the set-up (model, optimizer buffers and
batch already built): ``ru_maxrss`` of the process before and after. Targets (the issue): padding
efficiency >= 0.95 packed, time per real token >= 2x better than padded. On CPU the local spec
computes every score of a packed row (S x S, masked); Transformer Engine's THD layout would compute
only each sample's own (not run here: no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=2048, max_position_embeddings=32768)  # fmt: skip


def long_tailed(n: int, seed: int, quick: bool) -> list[tuple[int, int]]:
    """(prompt, response) lengths: 50-300 and log-normal (median e^5.7 = 299, p99 e^(5.7 + 2.33 x 1.1)
    = 3,860) capped at 4,096 tokens."""
    rng = random.Random(seed)
    if quick:
        return [(rng.randint(10, 40), int(min(400, rng.lognormvariate(3.5, 1.0))) + 1) for _ in range(n)]
    return [(rng.randint(50, 300), int(min(4095, rng.lognormvariate(5.7, 1.1))) + 1) for _ in range(n)]


def make_model(path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**MODEL, tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)


# ---- one layout, in its own process ------------------------------------------------------------------
def _padded(lengths, rows: int, vocab: int, g):
    """Micro-batches as before packing: [rows, P + R], prompt right-aligned, response left-aligned."""
    import torch

    p, r = max(a for a, _ in lengths), max(b for _, b in lengths)
    out = []
    for start in range(0, len(lengths), rows):
        part = lengths[start : start + rows]
        ids = torch.zeros(len(part), p + r, dtype=torch.long)
        keep = torch.zeros(len(part), p + r, dtype=torch.bool)
        resp = torch.zeros(len(part), p + r)
        for i, (n_p, n_r) in enumerate(part):
            ids[i, p - n_p : p + n_r] = torch.randint(0, vocab, (n_p + n_r,), generator=g)
            keep[i, p - n_p : p + n_r] = True
            resp[i, p : p + n_r] = 1.0
        causal = torch.ones(p + r, p + r, dtype=torch.bool).tril_()
        mask = ~(causal[None] & keep[:, None, :])[:, None]  # True = masked, as the old actor built it
        pos = (keep.long().cumsum(-1) - 1).clamp(min=0)
        out.append((ids, pos, mask, None, resp, int(keep.sum())))
    return out


def _packed(lengths, budget: int, vocab: int, g):
    """Micro-batches as the actor packs them on the local spec (`pipeline.actor.packing`)."""
    import torch

    from pipeline.actor.packing import micro_batches, packed_inputs, row_layout

    out = []
    for b in micro_batches([a + c for a, c in lengths], budget):
        rows = row_layout([sum(lengths[i]) for i in b], thd=False)
        b = [b[j] for row in rows for j in row]  # the samples in row order
        ids = torch.cat([torch.randint(0, vocab, (sum(lengths[i]),), generator=g) for i in b])
        cu = torch.tensor([0] + [sum(lengths[i]) for i in b]).cumsum(0)
        x = packed_inputs(ids, cu, row_sizes=[len(row) for row in rows], thd=False)
        resp = torch.zeros(x.input_ids.numel())
        resp[x.real] = torch.cat([torch.tensor([0.0] * lengths[i][0] + [1.0] * lengths[i][1]) for i in b])
        resp = resp.view_as(x.input_ids).float()
        out.append((x.input_ids, x.position_ids, x.attention_mask, x.position_ids, resp, ids.numel()))
    return out


def worker(args) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    import megatron_patches

    megatron_patches.apply_for_this_machine()
    from megatron.core import parallel_state as ps

    from pipeline.actor.actor import MegatronActor, initialize_parallel
    from pipeline.actor.config import ActorConfig
    from pipeline.actor.weights import unwrap
    from pipeline.hf_io import read_config
    from pipeline.ops import vocab_parallel_logprob_entropy

    hf = read_config(args.model)
    cfg = ActorConfig(max_tokens_per_micro_batch=args.budget)
    initialize_parallel(cfg, hf)
    actor = MegatronActor(cfg, hf, hf_dir=args.model)
    model, tp = actor.chunks[0], ps.get_tensor_model_parallel_group()
    rotary = unwrap(model).rotary_pos_emb
    lengths = long_tailed(args.samples, args.seed, args.quick)
    g = torch.Generator().manual_seed(args.seed)
    mbs = (_padded(lengths, args.rows, hf["vocab_size"], g) if args.layout == "padded"
           else _packed(lengths, args.budget, hf["vocab_size"], g))  # fmt: skip

    def one_pass(pre_forward: bool = False) -> float:
        t0 = time.perf_counter()
        if pre_forward:
            with torch.no_grad():
                for ids, pos, mask, seq_pos, *_ in mbs:
                    rotary.packed_positions = seq_pos
                    logits = model(ids, pos, mask)
                    vocab_parallel_logprob_entropy(logits[:, :-1], ids[:, 1:], tp_group=tp, entropy=True)
        for ids, pos, mask, seq_pos, resp, _ in mbs:
            rotary.packed_positions = seq_pos  # None: megatron's row positions (padded rows)
            logits = model(ids, pos, mask)
            out = vocab_parallel_logprob_entropy(logits[:, :-1], ids[:, 1:], tp_group=tp, entropy=True)
            w = resp[:, 1:]
            loss = -(out.logprob * w).sum() / w.sum() - 0.01 * (out.entropy * w).sum() / w.sum()
            loss.backward()
        return time.perf_counter() - t0

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    one_pass()  # warm-up
    variants = [False, True] if args.layout == "packed" else [False]
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            times[v].append(one_pass(v))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = {
        "micro_batches": len(mbs),
        "slots": sum(ids.numel() for ids, *_ in mbs),
        "real": sum(a + b for a, b in lengths),
        "peak_mib": (peak - base) / 1024,
    }
    dist.destroy_process_group()
    return [{**row, "layout": args.layout + ("+pre-forward" if v else ""), "seconds": sorted(t)[len(t) // 2]}
            for v, t in times.items()]  # fmt: skip


# ---- the driver -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--budget", type=int, default=4096, help="tokens per packed micro-batch")
    ap.add_argument("--rows", type=int, default=1, help="samples per padded micro-batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="16 short samples: a smoke run of a few seconds")
    ap.add_argument("--layout", choices=["padded", "packed"], help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.budget, args.repeats = 16, 1024, 1
    if args.layout:
        print(json.dumps(worker(args)))
        return 0
    lengths = long_tailed(args.samples, args.seed, args.quick)
    resp = sorted(b for _, b in lengths)
    print(f"{args.samples} samples: prompts {min(a for a, _ in lengths)}-{max(a for a, _ in lengths)} tokens, "
          f"responses median {resp[len(resp) // 2]}, max {resp[-1]}; budget {args.budget}, padded rows {args.rows}")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        make_model(model)
        for layout in ("padded", "packed"):
            print(f"running {layout} ...", flush=True)
            cmd = [sys.executable, __file__, "--layout", layout, "--model", str(model), "--samples", str(args.samples),
                   "--budget", str(args.budget), "--rows", str(args.rows), "--repeats", str(args.repeats),
                   "--seed", str(args.seed), *(["--quick"] if args.quick else [])]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows += json.loads(done.stdout.strip().splitlines()[-1])
    print("\n| layout | micro-batches | token slots | real tokens | padding efficiency | fwd+bwd s | µs / real token | peak RSS above set-up MiB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layout']} | {r['micro_batches']} | {r['slots']} | {r['real']} | {r['real'] / r['slots']:.3f} | "
              f"{r['seconds']:.2f} | {1e6 * r['seconds'] / r['real']:.1f} | {r['peak_mib']:.0f} |")  # fmt: skip
    padded, packed, pre = rows
    speedup = padded["seconds"] / packed["seconds"]
    eff = packed["real"] / packed["slots"]
    print(
        f"\nthe training step without the no-grad pre-forward: {1 - packed['seconds'] / pre['seconds']:.0%} less time"
    )
    if args.quick:
        print("--quick: a smoke run on short samples; the targets are for the default distribution")
        return 0
    print(
        f"\ntime per real token, padded / packed: {speedup:.2f}x (target >= 2): {'PASS' if speedup >= 2 else 'FAIL'}"
    )
    print(f"packed padding efficiency {eff:.3f} (target >= 0.95): {'PASS' if eff >= 0.95 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
