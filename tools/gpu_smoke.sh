#!/usr/bin/env bash
# The GPU smoke test, one command on a machine with one NVIDIA GPU:
#
#   bash tools/gpu_smoke.sh
#
# 1. the vocab-parallel op's GPU check (tools/gpu_check_vocab_parallel.sh: CUDA tests, benchmark,
#    node self-test; its outputs in <out>/op/)
# 2. the actor with the Transformer Engine layer spec against the local spec on a tiny model
# 3. actor offload: GPU memory freed, the continuation bit for bit
# 4. an SGLang server on the GPU with a tiny model (generation, memory release and resume)
# 5. a weight sync from the actor into that server through CUDA IPC handles (same GPU)
# 6. three RL steps of configs/gpu_smoke.yaml (colocated, memory saver, offload, CUDA IPC sync)
#
# Makes the GPU environments first if missing (tools/setup_gpu_env.sh). Everything it prints goes
# to runs/gpu_smoke/<time>/smoke.log as well; the last lines say which steps passed.
# NEVER RUN YET: no GPU machine was available when it was written (docs/cluster.md).
set -uo pipefail  # no -e: every step runs and reports, the exit code says whether all passed
cd "$(dirname "$0")/.." || exit 1

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_smoke: no NVIDIA GPU here (nvidia-smi); nothing to do on a CPU machine" >&2
    exit 2
fi
ACTOR_PY=${ACTOR_PY:-.venv-gpu/bin/python}
SGLANG_PY=${SGLANG_PY:-.venv-sglang/bin/python}
if [ ! -x "$ACTOR_PY" ] || [ ! -x "$SGLANG_PY" ]; then
    bash tools/setup_gpu_env.sh || { echo "gpu_smoke: tools/setup_gpu_env.sh failed" >&2; exit 1; }
fi
OUT=runs/gpu_smoke/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
exec > >(tee "$OUT/smoke.log") 2>&1
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 SGLANG_PYTHON="$PWD/$SGLANG_PY" CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
nvidia-smi -L
"$ACTOR_PY" -c "import torch, megatron.core; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', megatron.core.__version__)"

RESULTS=()
step() {  # name, command...
    local name=$1 rc t0=$SECONDS
    shift
    echo
    echo "==== $name ===="
    "$@"
    rc=$?
    RESULTS+=("$(printf '%-48s %s (%ss)' "$name" "$([ "$rc" -eq 0 ] && echo PASS || echo "FAIL ($rc)")" $((SECONDS - t0)))")
}
PYTEST=("$ACTOR_PY" -m pytest -q -s -p no:cacheprovider)
step "1 the op's GPU check" env PYTHON="$ACTOR_PY" OUT="$OUT/op" bash tools/gpu_check_vocab_parallel.sh
step "2 TE spec vs local spec" "${PYTEST[@]}" tests/gpu -k transformer_engine_spec
step "3 actor offload" "${PYTEST[@]}" tests/gpu -k offload
step "4 SGLang server on the GPU" "${PYTEST[@]}" tests/gpu -k sglang_serves
step "5 weight sync through CUDA IPC" "${PYTEST[@]}" tests/gpu -k cuda_ipc
step "6 three RL steps (configs/gpu_smoke.yaml)" "$ACTOR_PY" -m pipeline train --config configs/gpu_smoke.yaml \
    "trainer.run_dir=$OUT/run" "rollout.python=$PWD/$SGLANG_PY"

echo
echo "==== summary ($OUT/smoke.log) ===="
failed=0
for r in "${RESULTS[@]}"; do
    echo "$r"
    case "$r" in *FAIL*) failed=1 ;; esac
done
exit "$failed"
