#!/usr/bin/env bash
# Create .venv with everything the project and its CPU test suite need, on a fresh Debian machine.
# Idempotent: a second run only checks. Usage: bash tools/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages (none of the Python wheels below need a compiler today; git for provenance).
if ! command -v git >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq git
fi
# Slurm launch tests (tests/slurm): a local Slurm, munge and shellcheck from Debian.
if ! command -v sbatch >/dev/null || [ ! -x /usr/sbin/munged ] || ! command -v shellcheck >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge shellcheck
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch first (the CPU build on local disk), then everything else under the same constraints,
# so that no dependency can drag in a CUDA torch.
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
# Transformer Engine, apex and flash-attn break megatron-core when importable on CPU: refuse them.
.venv/bin/python - <<'PY'
import importlib.util, sys
bad = [m for m in ("transformer_engine", "apex", "flash_attn") if importlib.util.find_spec(m)]
if bad:
    sys.exit(f"setup_env: {bad} importable in .venv; they break megatron-core on CPU. Uninstall them.")
import torch
assert torch.__version__.startswith("2.13.0") and not torch.version.cuda, torch.__version__
import triton  # the kernels' CPU tests run through its interpreter (TRITON_INTERPRET=1)
PY
# SGLang servers for the rollout tests, in their own venv (.venv/sglang-server; see the script).
bash tools/setup_sglang.sh
