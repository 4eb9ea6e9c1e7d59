"""What scoring rewards in worker processes costs on the CPU demo, side by side with scoring in the driver.

    .venv/bin/python tools/bench_rewards.py              # the demo's batches: 128 and 400 responses
    .venv/bin/python tools/bench_rewards.py --quick      # fewer repeats

The responses are the demo's kind (`a+b=c` then `#### c`, right or off by one, from the prompts of
runs/tiny/train.jsonl or made up when it is missing), scored with the demo's reward (`math`,
math-verify). For each batch size it prints the median, p10 and p90 over the repeats of:

- `driver`: `RewardPool(workers=0)`, scoring in the calling process, as every run did before the
  pool (no timeouts possible);
- `pool N`: N spawned workers with the per-response deadline (`reward.workers=N`).

Modes are interleaved repeat by repeat so that the machine's load hits them alike, and every mode's
scores are checked equal to the driver's. It also prints how long starting the pool takes (the
workers start while the driver starts Ray and the Megatron ranks, so a run pays it at most once).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.rewards import RewardPool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def demo_batch(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    path = REPO / "runs" / "tiny" / "train.jsonl"
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()[:2000]]
    else:
        rows = [
            {"prompt": f"{a}+{b}=?", "answer": str(a + b)} for a, b in ((i % 97, i % 89) for i in range(2000))
        ]
    responses, truths = [], []
    for row in rng.choices(rows, k=n):
        got = int(row["answer"]) + rng.choice((0, 0, 1, -1))
        responses.append(f"{row['prompt'][:-2]}={got}\n#### {got}")
        truths.append(row["answer"])
    return responses, truths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 400], help="responses per batch")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats

    t0 = time.perf_counter()
    pools = {"driver": RewardPool("math", workers=0)}
    starts = {}
    for n in args.workers:
        t = time.perf_counter()
        pools[f"pool {n}"] = RewardPool("math", workers=n)
        pools[f"pool {n}"].wait_ready()
        starts[n] = time.perf_counter() - t
    print(
        "pool start-up (spawn + import math-verify): "
        + ", ".join(f"{n} workers {s:.2f} s" for n, s in starts.items())
    )
    try:
        for size in args.sizes:
            responses, truths = demo_batch(size)
            times: dict[str, list[float]] = {name: [] for name in pools}
            reference = None
            for r in range(repeats + 1):  # the first round warms every mode up (sympy's caches)
                for name, pool in pools.items():
                    t = time.perf_counter()
                    scores = [s.acc for s in pool.score(responses, truths)]
                    took = time.perf_counter() - t
                    reference = reference or scores
                    assert scores == reference, f"{name} scores differ from the driver's"
                    if r:
                        times[name].append(took)
            print(f"\n{size} responses ({sum(reference):.0f} correct), {repeats} repeats, seconds per batch:")
            print("| mode | median | p10 | p90 | vs driver |\n|---|---|---|---|---|")
            base = statistics.median(times["driver"])
            for name, ts in times.items():
                q = statistics.quantiles(ts, n=10) if len(ts) > 1 else [ts[0]] * 9
                med = statistics.median(ts)
                print(f"| {name} | {med:.3f} | {q[0]:.3f} | {q[-1]:.3f} | {med / base:.2f}x |")
    finally:
        for pool in pools.values():
            pool.close()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
