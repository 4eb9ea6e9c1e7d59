"""cuda_calls_to_cpu: run megatron-core's hard-coded CUDA allocations and synchronisations on CPU.

Reason: pipeline schedules, p2p buffers, the global memory buffer used by every local-spec
attention, RoPE, TP gathers, DDP grad buffers, the optimizers, grad clipping and the async
checkpoint writer create tensors with ``device="cuda"`` / ``torch.cuda.current_device()`` or call
``torch.cuda.synchronize()``; on a CPU build each raises ``AssertionError: Torch not compiled with
CUDA enabled``. Call sites (megatron-core 0.16.1; the same sites exist since about 0.9), e.g.
megatron/core/utils.py:631 (``GlobalMemoryBuffer.get_tensor``),
megatron/core/pipeline_parallel/schedules.py:596 (``total_num_tokens``),
megatron/core/optimizer/clip_grads.py:90; ``PROXIED_MODULES`` lists each module's sites, and
``KNOWN_CUDA_SITES`` in the test is every one reached.

Fix: the module-level name ``torch`` in each module of ``PROXIED_MODULES`` becomes a proxy that
returns the CPU device from ``torch.cuda.current_device()``, turns ``device="cuda"`` of the factory
functions into CPU, makes synchronize/streams/empty_cache no-ops, and maps the CUDA RNG calls to
the CPU generator. Everything else is the real ``torch``.

Checked on: ``common.TESTED_MEGATRON_VERSIONS`` (0.16.1).

Safe because: on CPU all work is synchronous (no stream can race), the real ``torch.cuda`` and every
other module are untouched, and each intercepted call is counted in ``HITS`` so an upgrade that adds
a site is visible. CPU builds only.

Test: tests/megatron_patches/test_patches.py (TP2, PP2, PP2xVPP2, DDP, distributed Adam, checkpoint
save; no site outside ``KNOWN_CUDA_SITES``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch

from megatron_patches.common import record, require_cpu_build

_CPU = torch.device("cpu")

# Modules whose `torch` name is proxied, with the call sites each one is known to reach (0.16.1).
PROXIED_MODULES = (
    "megatron.core.utils",  # :631 GlobalMemoryBuffer (any local-attention forward), :1207 l2norm
    "megatron.core.tensor_parallel.random",  # :235/237/238 CudaRNGStatesTracker.add
    "megatron.core.tensor_parallel.layers",  # :261, :873, :899, ... (use_cpu_initialization=False)
    "megatron.core.tensor_parallel.mappings",  # :91, :141, :148, :181, :442 gathers at TP>1
    "megatron.core.transformer.utils",  # :35 causal mask when attention_mask is None
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # :78, :162
    "megatron.core.pipeline_parallel.schedules",  # :596, :983, :2138 total_num_tokens
    "megatron.core.pipeline_parallel.p2p_communication",  # :313, :321 recv buffers, :398 sync
    "megatron.core.distributed.param_and_grad_buffer",  # :768, :783, :800, :806
    "megatron.core.distributed.distributed_data_parallel",  # :230, :584-611
    "megatron.core.distributed.finalize_model_grads",  # no CUDA call in 0.16.1
    "megatron.core.optimizer.optimizer",  # :473, :481, :485, :907, :1141
    "megatron.core.optimizer.distrib_optimizer",  # :791, :1077
    "megatron.core.optimizer.clip_grads",  # :90, :103, :115, :174, :207
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # :230 synchronize
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # :252
    "megatron.core.dist_checkpointing.strategies.fully_parallel",  # :272, :281 synchronize
    "megatron.core.dist_checkpointing.exchange_utils",  # :104, :110, :326 empty buffers
)


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class _NullStream:
    """Stands in for a CUDA stream: every method is a no-op (CPU work is synchronous)."""

    def __getattr__(self, name):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CudaProxy:
    """`torch.cuda` as seen by a proxied megatron module on a machine without CUDA."""

    def __init__(self, real):
        self._real = real

    def current_device(self):
        record()
        return _CPU

    def synchronize(self, *args, **kwargs):
        record()

    def empty_cache(self):
        record()

    def current_stream(self, *args, **kwargs):
        record()
        return _NullStream()

    default_stream = current_stream
    Stream = current_stream

    def stream(self, *args, **kwargs):
        record()
        return contextlib.nullcontext()

    # The RNG tracker (tensor_parallel/random.py) keeps "CUDA" generator states; on CPU the default
    # generator is the one that dropout and initialisation draw from.
    def manual_seed(self, seed):
        record()
        torch.manual_seed(seed)

    def get_rng_state(self, *args, **kwargs):
        record()
        return torch.get_rng_state()

    def set_rng_state(self, state, *args, **kwargs):
        record()
        torch.set_rng_state(state)

    def __getattr__(self, name):
        return getattr(self._real, name)


_FACTORIES = (
    "zeros",
    "ones",
    "empty",
    "full",
    "tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "as_tensor",
    "empty_strided",
)


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            record()
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    return wrapper


class _TorchProxy:
    """Forwards to the real `torch`, except `torch.cuda` and the factories' `device="cuda"`."""

    def __init__(self, real):
        self._real = real
        self.cuda = _CudaProxy(real.cuda)
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(real, name)))

    def __getattr__(self, name):
        return getattr(self._real, name)


def cuda_calls_to_cpu() -> None:
    """Proxy the name `torch` in each of `PROXIED_MODULES` (see the module docstring)."""
    require_cpu_build("cuda_calls_to_cpu")
    proxy = _TorchProxy(torch)
    for name in PROXIED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
