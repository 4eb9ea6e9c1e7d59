"""tools/selftest_vocab_parallel.py: the one-command node self-test runs through torchrun at TP=2 on
CPU (gloo), both implementations (Triton through its interpreter), prints its tables and exits 0; its
checker fails an op that is off by 1e-3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import selftest_vocab_parallel as selftest  # noqa: E402


@pytest.mark.multiproc
def test_quick_self_test_passes_on_cpu_with_both_implementations():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    impls = "torch,triton" if _has_triton() else "torch"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "selftest_vocab_parallel.py"),
            "--quick",
            "--cpu",
            "--impls",
            impls,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "TP=2 on CPU (gloo)" in out
    rows = [line for line in out.splitlines() if line.startswith("| 11 hard cases |")]
    assert len(rows) == 2 * len(impls.split(",")) and all(line.endswith("| PASS |") for line in rows), out
    timing = [line for line in out.splitlines() if line.startswith("| torch | ")]
    assert len(timing) == 2 and all("256 x 2048" in line for line in timing), out
    assert f"all {len(rows) + len(timing)} checks passed" in out


def _has_triton():
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _off_by_a_little(rank, world_size):
    """The self-test's correctness check on an op whose entropy is 1e-3 too high: it must fail."""
    import torch.distributed as dist

    import pipeline.ops

    op = pipeline.ops.vocab_parallel_logprob_entropy

    def biased(*args, **kwargs):
        out = op(*args, **kwargs)
        return out._replace(entropy=out.entropy + 1e-3)

    pipeline.ops.vocab_parallel_logprob_entropy = biased
    group = dist.new_group(list(range(world_size)))
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        _, ok, failed, n_cases = selftest._correctness(
            "torch", dtype, rank, world_size, group, torch.device("cpu")
        )
        results.append((ok, len(failed), n_cases))
    return results


@pytest.mark.multiproc
def test_correctness_check_fails_a_slightly_wrong_op():
    for per_rank in run_distributed(_off_by_a_little, 2):
        for ok, n_failed, n_cases in per_rank:
            assert not ok and n_failed == n_cases  # every case's entropy is off


def test_bad_arguments_get_one_line(capsys):
    with pytest.raises(SystemExit):
        selftest.parse_args(["--impls", "cuda"])
    assert "--impls: unknown ['cuda']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        selftest.parse_args(["--nproc", "0"])
    assert "--nproc must be >= 1" in capsys.readouterr().err
