"""Patches that are safe on any machine, CUDA or not; each acts only where upstream would fail.

``megatron_patches.PORTABLE_PATCHES`` lists them (``apply_for_this_machine`` applies them on a CUDA
machine); a CPU machine gets them too, after the CPU-only ones. Each module's docstring says exactly
when it acts (only on gloo groups, only with torch's own Adam, only for the local spec's torch norms
under sequence parallelism). One module per patch; the registry is ``megatron_patches.PATCHES``.
"""
