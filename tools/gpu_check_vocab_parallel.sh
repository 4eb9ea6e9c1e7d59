#!/usr/bin/env bash
# Every GPU check of the vocab-parallel op in one command, for a machine with a CUDA GPU:
#   1. the op's tests on CUDA (the Triton kernels compiled, not interpreted; the CUDA-only tests),
#   2. tools/bench_vocab_parallel.py --device cuda at the doc's shapes (calibration, Triton, torch,
#      megatron-core, naive; bf16 and fp32),
#   3. the node self-test (tools/selftest_vocab_parallel.py) on every local GPU.
# Everything printed is also written to $OUT (default outputs/gpu_check/): device.txt, tests.txt,
# bench.txt + bench.jsonl, selftest.txt — what docs/benchmarks.md records. About 5-8 minutes on one
# H100/H200; each step has its own time limit so that one hung step cannot eat the others' time.
#   Usage: bash tools/gpu_check_vocab_parallel.sh            (PYTHON=... to pick the interpreter)
# Needs a Python with a CUDA build of torch, Triton, megatron-core and the project's dependencies;
# nothing is installed here (GPU machines may have no network).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
unset TRITON_INTERPRET

if ! "$PY" - <<'PY' 2>&1 | tee "$OUT/device.txt"; then
import datetime, sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: {sys.executable} has torch {torch.__version__} without a usable CUDA device")
import megatron.core, triton
print(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {triton.__version__}, megatron-core {megatron.core.__version__}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
PY
    exit 1
fi

status=0
run() {  # run NAME LIMIT_SECONDS CMD...: tee to $OUT/NAME.txt, remember a failure, go on
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee "$OUT/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$OUT/$name.txt"
    [ "$rc" -eq 0 ] || status=1
}

run tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_vocab_parallel_triton.py \
    tests/tools/test_bench_vocab_parallel.py::test_cuda_quick_run
run bench 360 "$PY" tools/bench_vocab_parallel.py --device cuda --out "$OUT/bench.jsonl"
run selftest 180 "$PY" tools/selftest_vocab_parallel.py
echo "gpu_check: outputs in $OUT; $([ $status -eq 0 ] && echo 'every step passed' || echo 'a step FAILED')"
exit $status
