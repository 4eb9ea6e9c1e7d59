#!/usr/bin/env bash
# Install SGLang 0.5.23 and sglang-router 0.3.2 for the rollout tests on a CPU machine, into their own
# venv .venv/sglang-server (git-ignored with .venv/), without ever letting pip replace the CPU torch.
# See shared docs cpu-recipes.md, "SGLang on CPU". Why a second venv: sglang 0.5.23 needs transformers 5
# (it patches transformers-5-only classes at import), the project pins transformers 4.57.6; the servers
# are separate processes, and the pipeline talks to them over HTTP and a torch.distributed group only.
#   - torch==2.13.0 (the CPU build on local disk) first, every pip call with the project's constraints.
#   - sglang itself with --no-deps (its metadata pins torch 2.14.1 and CUDA wheels); its pure-Python
#     dependencies that the CPU text path imports are named below and pinned in constraints.txt.
#   - torchvision 0.28.0 --no-deps; its two unguarded register_fake("torchvision::nms"/"qnms") calls
#     are made conditional on torchvision.extension._has_ops() (PyPI's build has no ops beside CPU torch).
# sgl_kernel (CUDA-only) is never installed: tests put tests/support/sgl_kernel on the servers' PYTHONPATH.
# Idempotent; a second run only checks (about 3 s). Usage: bash tools/setup_sglang.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SGLANG_VENV:-.venv/sglang-server}  # SGLANG_VENV: elsewhere (e.g. to time a fresh install)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# The server venv's constraints: the project's, with the "# sglang-server:" pins replacing theirs.
CONSTRAINTS=$VENV/constraints.txt
mkdir -p "$VENV"
override=$(sed -n 's/^# sglang-server: //p' constraints.txt)
{
    grep -v -E "^($(echo "$override" | sed 's/==.*//' | paste -sd'|'))==" constraints.txt
    echo "$override"
} >"$CONSTRAINTS"

if ! "$VENV/bin/python" - 2>/dev/null <<'PY'
import importlib.metadata as md
want = {"sglang": "0.5.23", "sglang-router": "0.3.2", "torchvision": "0.28.0", "transformers": "5.19.0",
        "soundfile": "0.13.1"}
raise SystemExit(any(md.version(k) != v for k, v in want.items()))
PY
then
    fresh=1
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    PIP=("$VENV/bin/pip" install -q --disable-pip-version-check -c "$CONSTRAINTS")
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" transformers tokenizers huggingface-hub safetensors numpy packaging psutil PyYAML tqdm \
        aiohttp blobfile compressed-tensors dill distro einops fastapi gguf interegular ipython jsonschema \
        llguidance msgspec openai openai-harmony orjson partial-json-parser pillow prometheus-client \
        pybase64 pydantic python-multipart pyzmq regex requests scipy sentencepiece setproctitle soundfile \
        tiktoken uvicorn uvloop watchfiles xgrammar xxhash zstandard sglang-router
    # pip lists sglang's CUDA-only requirements as unmet here: expected, so that report goes to a log.
    "${PIP[@]}" --no-deps sglang torchvision 2>"$VENV/pip-no-deps.log" || { cat "$VENV/pip-no-deps.log"; exit 1; }
fi

# torchvision: register the nms/qnms fakes only where its C++ ops loaded (idempotent rewrite).
"$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
path = pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
old = '@torch.library.register_fake("torchvision::'
new = '@(torch.library.register_fake if torchvision.extension._has_ops() else lambda *a: lambda fn: fn)("torchvision::'
if old in src:
    path.write_text(src.replace(old, new))
PY

"$VENV/bin/python" - "${fresh:-0}" <<'PY'
import sys
import torch
assert torch.__version__.startswith("2.13.0") and not torch.version.cuda, f"pip replaced torch: {torch.__version__}"
if sys.argv[1] == "1":  # a full import takes ~10 s: only after an install
    import sglang, sglang_router, torchvision.transforms  # noqa: F401  (SGLang imports torchvision.transforms)
PY
