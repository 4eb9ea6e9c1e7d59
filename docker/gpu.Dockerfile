# The GPU container for a cluster (pyxis/enroot: `python -m pipeline submit --container-image ...`;
# or docker/apptainer). NGC's PyTorch image ships CUDA, cuDNN, NCCL, torch, Transformer Engine and apex;
# on top: megatron-core, Ray and the project's Python dependencies, and SGLang in a venv of its own
# (it pins its own torch). NEVER BUILT YET: no GPU machine was available (docs/cluster.md).
#
#   docker build -f docker/gpu.Dockerfile -t entropy-rl:gpu .
#   enroot import dockerd://entropy-rl:gpu        # -> entropy-rl+gpu.sqsh for --container-image
FROM nvcr.io/nvidia/pytorch:25.11-py3

ARG MEGATRON_CORE_VERSION=0.16.1
ARG SGLANG_VERSION=0.5.23
ARG ROUTER_VERSION=0.3.2

WORKDIR /opt/entropy-rl
COPY pyproject.toml setup.py constraints.txt ./
COPY pipeline ./pipeline
COPY megatron_patches ./megatron_patches
# The image's torch (it satisfies torch>=2.6), TE and apex stay: no constraints file here (it pins
# the CPU CI's torch wheel).
RUN pip install --no-cache-dir "megatron-core==${MEGATRON_CORE_VERSION}" && \
    pip install --no-cache-dir -e . "ray[default]==2.60.0"
RUN python -m venv /opt/sglang && \
    /opt/sglang/bin/pip install --no-cache-dir "sglang[all]==${SGLANG_VERSION}" "sglang-router==${ROUTER_VERSION}"
# In a recipe: rollout.python=/opt/sglang/bin/python; submit --python /usr/bin/python
ENV PYTHONUNBUFFERED=1 NCCL_CUMEM_ENABLE=0
