"""Smoke test of tools/bench_vocab_parallel.py: the --quick shape runs end to end (TP=2, gloo) and
writes one finite JSON line per (adapter, dtype). Not a timed test: no performance number is checked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.multiproc
def test_quick_run_writes_all_adapters(tmp_path):
    out = tmp_path / "bench.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_vocab_parallel.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| adapter |" in proc.stdout and ("PASS" in proc.stdout or "FAIL" in proc.stdout)
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    got = {(r["adapter"], r["dtype"]) for r in records}
    expected = {(a, d) for a in ("ours", "megatron_ce", "naive") for d in ("fp32", "bf16")}
    expected.add(("megatron_ce+clone", "fp32"))
    assert got == expected
    for r in records:
        numbers = {k: v for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for key in ("time_fwd_ms", "time_fwdbwd_ms", "peak_fwd", "peak_fwdbwd", "err_logp", "err_grad"):
            assert key in numbers, (r["adapter"], key)
        bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
        assert not bad, (r["adapter"], r["dtype"], bad)
        assert r["time_fwd_ms"] > 0 and r["time_fwdbwd_ms"] > 0 and r["peak_fwdbwd"] >= 0
        assert r["err_logp"] < 1e-4, r
        if r["outputs"] == "logp+entropy":
            assert r["err_entropy"] is not None and r["err_entropy"] < 1e-4, r
        else:
            assert r["err_entropy"] is None
    ours = {r["dtype"]: r for r in records if r["adapter"] == "ours"}
    for r in ours.values():  # the op's device-independent contract, as the benchmark measures it
        assert r["coll_fwd"] == 2 and r["coll_bwd"] == 0
        assert r["saved_new_bytes_per_token"] <= 16
