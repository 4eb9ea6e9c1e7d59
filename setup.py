"""Entropy-control RL post-training pipeline: Megatron-core actor, SGLang rollout, vocab-parallel losses."""

from setuptools import find_packages, setup

setup(
    name="entropy-rl-pipeline",
    version="0.1.0",
    description="RL post-training for LLMs with exact, vocab-parallel entropy-control methods",
    python_requires=">=3.11",
    packages=find_packages(include=["pipeline", "pipeline.*", "megatron_patches", "megatron_patches.*"]),
    install_requires=[
        "torch>=2.6",  # pin with constraints.txt: torch==2.13.0 is the CPU build
        "megatron-core>=0.16.1",
        "numpy",
        "packaging",
        "psutil",  # undeclared dependency of megatron-core's dist_checkpointing
        "PyYAML",
        "tqdm",
        "transformers",  # tokenizers, chat templates, HF checkpoints, the in-process engine
        "safetensors",
        "math-verify",  # verifiable math rewards
        "pyarrow",  # parquet datasets
        "ray",  # orchestration: placement groups, actor and rollout groups
        "tensorboard",  # metrics
        "matplotlib",  # plots of entropy and reward curves
        "aiohttp",  # async client of the SGLang servers and sglang-router (pipeline/rollout)
    ],
    extras_require={
        # Everything the CPU test suite needs. Never Transformer Engine, apex or flash-attn:
        # importable on a CPU machine, they break megatron-core (see docs/megatron-cpu notes).
        # Triton runs the vocab-parallel kernels' tests on CPU through its interpreter.
        "test": ["pytest", "ruff", "triton"],
        # What a GPU cluster adds. Never installed on CPU machines.
        "gpu": ["transformer-engine[pytorch]", "triton"],
    },
    entry_points={"console_scripts": []},
)
