"""Test double for `sgl_kernel`, SGLang's CUDA-only kernel package (no CPU build exists on any registry).

Why it exists: with `SGLANG_USE_CPU_ENGINE=1`, SGLang 0.5.23 imports a handful of names from
`sgl_kernel` at module import. This module is put on `PYTHONPATH` only for the SGLang server
processes that tests start (see `pipeline.rollout.config.RolloutConfig.pythonpath`); it is never
installed and never imported by the pipeline itself.

What it does: implements in plain PyTorch the few ops the CPU path really calls
(`assign_req_to_token_pool_cpu`, `silu_and_mul`, `gelu_and_mul`, `gelu_tanh_and_mul`). Every other
name resolves to a function that raises `NotImplementedError` *when called*, so importing modules that
merely name a kernel keeps working and every layer takes its `forward_native` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def assign_req_to_token_pool_cpu(
    req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len
):
    """req_to_token[req_pool_indices[i], start[i]:end[i]] = the i-th consecutive slice of out_cache_loc."""
    offset = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def _act_and_mul(act, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    d = x.shape[-1] // 2
    y = act(x[..., :d]) * x[..., d:]
    if out is None:
        return y
    out.copy_(y)
    return out


def silu_and_mul(x, out=None):
    return _act_and_mul(F.silu, x, out)


def gelu_and_mul(x, out=None):
    return _act_and_mul(F.gelu, x, out)


def gelu_tanh_and_mul(x, out=None):
    return _act_and_mul(lambda t: F.gelu(t, approximate="tanh"), x, out)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: CUDA-only kernel, not in the CPU test double")

    missing.__name__ = name
    return missing
