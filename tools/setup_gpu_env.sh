#!/usr/bin/env bash
# The GPU environments of a cluster node (never run on the CPU machines, where tools/setup_env.sh
# makes .venv): two virtual environments beside the checkout, because SGLang pins its own torch.
#
#   .venv-gpu      the driver, Ray and the Megatron actor: CUDA torch, megatron-core, Transformer
#                  Engine (WITH_TE=0 to skip), apex (WITH_APEX=1 to build it; optional), this project
#   .venv-sglang   the SGLang servers and sglang-router (rollout.python in the GPU recipes)
#
#   bash tools/setup_gpu_env.sh          # on a GPU node with the CUDA toolkit (nvcc) for TE's build
#   sbatch --gpus-per-node=1 --wrap "bash tools/setup_gpu_env.sh"   # or as a job
#
# The checkout must be on storage every node sees (the job runs these interpreters everywhere).
# Without nvcc, or to skip the build: the container recipe docker/gpu.Dockerfile (NGC PyTorch,
# which ships Transformer Engine and apex), then `submit --container-image`.
# Versions: the ones the CPU suite tests the code with, where they exist for CUDA. Idempotent.
# NEVER RUN YET: no GPU machine was available when it was written (docs/cluster.md).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "setup_gpu_env: no NVIDIA GPU here (nvidia-smi): this installs CUDA builds for GPU nodes only;" \
        "on a CPU machine use tools/setup_env.sh" >&2
    exit 2
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
ACTOR_VENV=${ACTOR_VENV:-.venv-gpu}
SGLANG_VENV=${SGLANG_VENV:-.venv-sglang}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}        # PyPI's Linux wheel is the CUDA build
MEGATRON_CORE_VERSION=${MEGATRON_CORE_VERSION:-0.16.1}  # megatron_patches were checked against it
TE_VERSION=${TE_VERSION:-2.20.2}
SGLANG_VERSION=${SGLANG_VERSION:-0.5.23}
ROUTER_VERSION=${ROUTER_VERSION:-0.3.2}
WITH_TE=${WITH_TE:-1}
WITH_APEX=${WITH_APEX:-0}

step() { echo "[setup_gpu_env $(date +%T)] $*"; }

# ---- the actor's environment ----
[ -x "$ACTOR_VENV/bin/python" ] || "$PY" -m venv "$ACTOR_VENV"
APIP=("$ACTOR_VENV/bin/pip" install -q --disable-pip-version-check)
step "torch $TORCH_VERSION (CUDA), megatron-core $MEGATRON_CORE_VERSION, the project into $ACTOR_VENV"
"${APIP[@]}" "torch==$TORCH_VERSION"
"${APIP[@]}" "megatron-core==$MEGATRON_CORE_VERSION"
# The project's pins, except torch (constraints.txt names the CPU wheel's version, the same number).
"${APIP[@]}" -c constraints.txt -e '.[test]'
if [ "$WITH_TE" = 1 ]; then
    step "Transformer Engine $TE_VERSION (builds its torch extension against this torch: needs nvcc, cuDNN)"
    "${APIP[@]}" --no-build-isolation "transformer-engine[pytorch]==$TE_VERSION"
fi
if [ "$WITH_APEX" = 1 ]; then
    step "apex from source (optional: megatron-core runs without it)"
    rm -rf /tmp/apex-build && git clone --depth 1 https://github.com/NVIDIA/apex /tmp/apex-build
    "${APIP[@]}" -v --no-build-isolation --config-settings "--build-option=--cpp_ext" \
        --config-settings "--build-option=--cuda_ext" /tmp/apex-build
fi

# ---- the SGLang servers' environment ----
[ -x "$SGLANG_VENV/bin/python" ] || "$PY" -m venv "$SGLANG_VENV"
step "sglang $SGLANG_VERSION (its own CUDA torch, sgl-kernel, flashinfer, torch_memory_saver) into $SGLANG_VENV"
"$SGLANG_VENV/bin/pip" install -q --disable-pip-version-check "sglang[all]==$SGLANG_VERSION" \
    "sglang-router==$ROUTER_VERSION"

# ---- checks: what the job needs from each ----
step "checking"
"$ACTOR_VENV/bin/python" - "$WITH_TE" <<'PY'
import sys
import torch
assert torch.cuda.is_available(), "torch sees no GPU"
import megatron.core, ray  # noqa: F401
from megatron.core.models.gpt import gpt_layer_specs
if sys.argv[1] == "1":
    import transformer_engine.pytorch  # noqa: F401
    assert gpt_layer_specs.HAVE_TE, "megatron-core does not see Transformer Engine"
print(f"actor: torch {torch.__version__} CUDA {torch.version.cuda}, megatron-core {megatron.core.__version__},"
      f" TE {'yes' if gpt_layer_specs.HAVE_TE else 'no'}, {torch.cuda.device_count()} GPU(s)")
PY
"$SGLANG_VENV/bin/python" - <<'PY'
import torch
assert torch.cuda.is_available(), "SGLang's torch sees no GPU"
import sglang, sgl_kernel, sglang_router, torch_memory_saver  # noqa: F401
print(f"sglang {sglang.__version__}: torch {torch.__version__} CUDA {torch.version.cuda}")
PY
step "done: $ACTOR_VENV (submit --python $PWD/$ACTOR_VENV/bin/python), $SGLANG_VENV (rollout.python)"
