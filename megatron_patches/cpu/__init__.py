"""Patches for CPU-only machines (a torch build without CUDA: tests, CI, the CPU demo).

Each one refuses to apply where CUDA is available (``common.require_cpu_build``): on a CUDA
machine megatron-core's real code paths run. ``megatron_patches.CPU_PATCHES`` lists them first, then
the portable ones. One module per patch; the registry is ``megatron_patches.PATCHES``.
"""
