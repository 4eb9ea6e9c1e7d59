"""Small, named, explicitly applied patches of megatron-core (nothing is patched at import time).

megatron-core 0.16.1 (the newest release for Python 3.11) assumes CUDA in a handful of places; on
our CPU machines and in CI it runs with the patches below (``../shared/docs/megatron-cpu.md`` has the
measurements). Each patch is one function whose docstring says what upstream behaviour it changes,
for which versions, and why that is safe. Use

    import megatron_patches
    megatron_patches.apply(megatron_patches.CPU_PATCHES)   # after init_process_group, before models

``apply`` is idempotent. Every CUDA call that a patch intercepts at run time is counted in ``HITS``
under the caller's ``file:line`` (``megatron/core/utils.py:631``), so a test can fail when an upgrade
adds a call site nobody has looked at (``tests/megatron_patches``). ``CONTIGUOUS_HITS`` does the same
for gloo collectives that were handed non-contiguous tensors.

Never applied on a CUDA machine: there the real code paths run (the CPU patches refuse to apply when
CUDA is available; the two gloo ones only act on gloo groups, and the Adam-step one only where
torch's own Adam is used).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import importlib
import inspect
import sys
import textwrap
import warnings

import torch

TESTED_MEGATRON_VERSIONS = ("0.16.1",)

HITS: collections.Counter[str] = collections.Counter()
CONTIGUOUS_HITS: collections.Counter[str] = collections.Counter()
_APPLIED: list[str] = []

_CPU = torch.device("cpu")


def _site(depth: int) -> str:
    """`file:line` of the frame `depth` levels above the caller, shortened to start at megatron/."""
    frame = sys._getframe(depth + 1)
    path = frame.f_code.co_filename
    for marker in ("/megatron/", "/torch/"):
        i = path.rfind(marker)
        if i >= 0:
            path = path[i + 1 :]
            break
    return f"{path}:{frame.f_lineno}"


def _record(depth: int = 1) -> None:
    HITS[_site(depth + 1)] += 1


def reset_hits() -> None:
    HITS.clear()
    CONTIGUOUS_HITS.clear()


def applied() -> list[str]:
    """Names of the patches applied in this process, in order."""
    return list(_APPLIED)


# --------------------------------------------------------------------------------------------------
# The `torch` proxy that replaces the module-level name `torch` inside selected megatron modules.


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
        _record()
        return _CPU

    def synchronize(self, *args, **kwargs):
        _record()

    def empty_cache(self):
        _record()

    def current_stream(self, *args, **kwargs):
        _record()
        return _NullStream()

    default_stream = current_stream
    Stream = current_stream

    def stream(self, *args, **kwargs):
        _record()
        return contextlib.nullcontext()

    # The RNG tracker (tensor_parallel/random.py) keeps "CUDA" generator states; on CPU the default
    # generator is the one that dropout and initialisation draw from.
    def manual_seed(self, seed):
        _record()
        torch.manual_seed(seed)

    def get_rng_state(self, *args, **kwargs):
        _record()
        return torch.get_rng_state()

    def set_rng_state(self, state, *args, **kwargs):
        _record()
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
            _record()
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


# Modules whose `torch` name is proxied, with the call sites each one is known to reach (0.16.1).
_PROXIED_MODULES = (
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
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",  # :473, :481, :485, :907, :1141
    "megatron.core.optimizer.distrib_optimizer",  # :791, :1077
    "megatron.core.optimizer.clip_grads",  # :90, :103, :115, :174, :207
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # :230 synchronize
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
)


def _require_cpu_build(name: str) -> None:
    if torch.cuda.is_available():
        raise RuntimeError(f"megatron_patches.{name} is a CPU-only patch; CUDA is available here")


# --------------------------------------------------------------------------------------------------
# The patches.


def cuda_calls_to_cpu() -> None:
    """Run megatron-core's hard-coded CUDA allocations and synchronisations on CPU.

    Upstream (megatron-core 0.16.1; the same sites exist since about 0.9): pipeline schedules,
    p2p buffers, the global memory buffer used by every local-spec attention, RoPE, TP gathers,
    DDP grad buffers, the optimizers, grad clipping and the async checkpoint writer create tensors
    with ``device="cuda"``/``torch.cuda.current_device()`` or call ``torch.cuda.synchronize()``;
    on a CPU build each raises ``AssertionError: Torch not compiled with CUDA enabled``.

    Fix: the module-level name ``torch`` in each module of ``_PROXIED_MODULES`` becomes a proxy
    that returns the CPU device from ``torch.cuda.current_device()``, turns ``device="cuda"`` of the
    factory functions into CPU, makes synchronize/streams/empty_cache no-ops, and maps the CUDA
    RNG calls to the CPU generator. Everything else is the real ``torch``.

    Safe because: on CPU all work is synchronous (no stream can race), the real ``torch.cuda`` and
    every other module are untouched, and each intercepted call is counted in ``HITS`` so an
    upgrade that adds a site is visible. CPU builds only.
    """
    _require_cpu_build("cuda_calls_to_cpu")
    proxy = _TorchProxy(torch)
    for name in _PROXIED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy


def rng_tracker_on_cpu() -> None:
    """Let megatron's CUDA RNG tracker fork and restore the CPU generator instead.

    Upstream (megatron-core 0.16.1, tensor_parallel/random.py:41/72): ``_get_cuda_rng_state`` and
    ``_set_cuda_rng_state`` read and (lazily, so on CPU *never*) write the CUDA generator. Every
    attention dropout goes through ``get_cuda_rng_tracker().fork()``, so the tracker cannot be
    skipped; ``CudaRNGStatesTracker.add`` (random.py:235) is covered by ``cuda_calls_to_cpu``.

    Fix: the two module functions use ``torch.get_rng_state``/``torch.set_rng_state``.

    Safe because: on a CPU build the default (CPU) generator is the one dropout draws from, so the
    tracker's fork/restore has the same meaning it has on GPU. CPU builds only. (With dropout > 0,
    ``fork`` logs "CPU RNG state changed within GPU RNG context": expected here, the forked
    generator *is* the CPU one; the state is restored on exit all the same.)
    """
    _require_cpu_build("rng_tracker_on_cpu")
    random = importlib.import_module("megatron.core.tensor_parallel.random")

    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        _record()
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        _record()
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state = _get_cuda_rng_state
    random._set_cuda_rng_state = _set_cuda_rng_state


def tensor_cuda_is_noop() -> None:
    """Make ``Tensor.cuda()`` return the tensor itself on a CPU build.

    Upstream (megatron-core 0.16.1): ``language_module.py:244`` moves the tied embedding weight with
    ``weight.data.cuda()`` at PP>1; ``optimizer.py:375/380`` and ``distrib_optimizer.py:1089`` do the
    same when loading optimizer state. These are method calls on tensors, which no module proxy sees.

    Safe because: it is applied only where CUDA does not exist, so no working code path is changed,
    and every call is counted in ``HITS``. This is the only process-wide change of the set.
    """
    _require_cpu_build("tensor_cuda_is_noop")

    def cuda(self, *args, **kwargs):
        _record()
        return self

    torch.Tensor.cuda = cuda


def _recompile(owner, name: str, replacements: dict[str, str]) -> None:
    """Re-create `owner.name` from its source with textual replacements, keeping line numbers."""
    raw = inspect.getattr_static(owner, name)
    func = raw.__func__ if isinstance(raw, classmethod | staticmethod) else raw
    lines, start = inspect.getsourcelines(func)
    source = textwrap.dedent("".join(lines))
    if not any(old in source for old in replacements):
        raise RuntimeError(f"megatron_patches: {owner.__name__}.{name} has none of {list(replacements)}")
    for old, new in replacements.items():
        source = source.replace(old, new)
    if isinstance(raw, classmethod | staticmethod) and not source.lstrip().startswith("@"):
        source = f"@{type(raw).__name__}\n" + source
        start -= 1
    namespace: dict = {}
    module = sys.modules[func.__module__]
    code = compile("\n" * (start - 1) + source, inspect.getsourcefile(func), "exec")
    exec(code, module.__dict__, namespace)
    setattr(owner, name, namespace[name])


_TYPE_STRINGS = {
    "'torch.cuda.FloatTensor'": "'torch.FloatTensor'",
    "'torch.cuda.HalfTensor'": "'torch.HalfTensor'",
    "'torch.cuda.BFloat16Tensor'": "'torch.BFloat16Tensor'",
}


def cuda_type_strings_on_cpu() -> None:
    """Accept CPU tensors where megatron's optimizer checks ``param.type() == 'torch.cuda.*Tensor'``.

    Upstream (megatron-core 0.16.1): ``clip_grads.py:167`` asserts fp32 grads are
    ``'torch.cuda.FloatTensor'`` (``clip_grad_by_total_norm_fp32``, also imported by name into
    ``optimizer/optimizer.py``); ``distrib_optimizer.py:361,420`` (``DistributedOptimizer.
    _build_model_and_main_param_groups``) and ``optimizer.py:671,690``
    (``Float16OptimizerWithFloat16Params.__init__``) dispatch on the same strings. No proxy can
    change a string literal.

    Fix: those functions are re-compiled from their own source with ``torch.cuda.XTensor`` ->
    ``torch.XTensor`` (zero-argument ``super()`` rewritten to its two-argument form); line numbers
    are kept. Raises if the source no longer contains the strings (an upgrade to review).

    Safe because: the checks are about dtype; the same dtype on CPU has the same meaning.
    CPU builds only.
    """
    _require_cpu_build("cuda_type_strings_on_cpu")
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")

    _recompile(clip_grads, "clip_grad_by_total_norm_fp32", _TYPE_STRINGS)
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    _recompile(distrib.DistributedOptimizer, "_build_model_and_main_param_groups", _TYPE_STRINGS)
    cls = optimizer.Float16OptimizerWithFloat16Params
    _recompile(
        cls,
        "__init__",
        {**_TYPE_STRINGS, "super().__init__(": "super(Float16OptimizerWithFloat16Params, self).__init__("},
    )


class _DoneWork:
    """A finished collective (what `async_op=True` returns when we ran it synchronously)."""

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


_GLOO_COLLECTIVES = (
    "broadcast",
    "all_reduce",
    "reduce",
    "all_gather",
    "gather",
    "scatter",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "all_to_all_single",
)


def _is_gloo(group) -> bool:
    import torch.distributed as dist

    try:
        return dist.get_backend(group) == "gloo"
    except (RuntimeError, ValueError):
        return False


def _contiguous_collective(fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        fixes = []  # (original, contiguous copy) pairs to copy back after the call

        def fix(value):
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                copy_ = value.contiguous()
                fixes.append((value, copy_))
                return copy_
            if isinstance(value, list) and any(
                isinstance(v, torch.Tensor) and not v.is_contiguous() for v in value
            ):
                return [fix(v) for v in value]
            return value

        if not _is_gloo(bound.arguments.get("group")):
            return fn(*args, **kwargs)
        for key, value in list(bound.arguments.items()):
            bound.arguments[key] = fix(value)
        if not fixes:
            return fn(*args, **kwargs)
        CONTIGUOUS_HITS[f"{_site(1)} {fn.__name__}"] += 1
        async_op = bound.arguments.get("async_op", False)
        if async_op:
            bound.arguments["async_op"] = False
        result = fn(*bound.args, **bound.kwargs)
        for original, copy_ in fixes:
            if original.data_ptr() != copy_.data_ptr():
                original.copy_(copy_)
        return _DoneWork() if async_op else result

    wrapper.__wrapped_collective__ = fn
    return wrapper


def gloo_contiguous_collectives() -> None:
    """Hand gloo collectives contiguous tensors, and copy results back into the caller's tensors.

    Upstream: torch 2.13's gloo backend silently delivers wrong data for non-contiguous tensors
    (measured for ``scatter`` of ``torch.chunk(w, 2, dim=1)`` pieces: megatron-bridge's TP=2 weight
    load came out wrong by 0.69 in the logits, no error). NCCL raises instead. Any
    megatron-core/our code path that passes a view (a column slice, a transposed tensor) is
    exposed, in every megatron-core version.

    Fix: ``torch.distributed.<collective>`` (the public names, not c10d's internal ones) is wrapped:
    for a gloo group, non-contiguous tensor arguments are replaced by contiguous copies and, after
    the call (run synchronously when ``async_op=True``), copied back in place. Counted in
    ``CONTIGUOUS_HITS``.

    Safe because: contiguous inputs, and non-gloo groups, take the untouched path; for the rest the
    result is what the collective promises. It costs one copy only where gloo would be wrong.
    """
    import torch.distributed as dist

    for name in _GLOO_COLLECTIVES:
        fn = getattr(dist, name)
        if not hasattr(fn, "__wrapped_collective__"):
            setattr(dist, name, _contiguous_collective(fn))


def unbatched_p2p_on_gloo() -> None:
    """Use non-batched pipeline p2p (``batch_p2p_comm=False``) on gloo pipeline groups.

    Upstream (megatron-core 0.16.1, ``p2p_communication.py:16 _batched_p2p_ops``): with the
    interleaved (virtual pipeline) schedule at PP=2 the batched ops post send_prev, recv_prev,
    send_next, recv_next to the *same* peer; gloo matches them in order with one tag, so activations
    and gradients swap and per-micro-batch losses come out silently wrong (4.89404 instead of
    4.89699). Non-batched ``_p2p_ops`` orders them by rank parity and is correct.

    Fix: ``P2PCommunicator.__init__`` gives the communicator a private copy of the config with
    ``batch_p2p_comm=False`` when its pipeline group is gloo. The model's config is not changed.

    Safe because: batched vs non-batched p2p move the same tensors; on gloo there is no overlap to
    lose. Non-gloo groups are untouched.
    """
    p2p = importlib.import_module("megatron.core.pipeline_parallel.p2p_communication")
    cls = p2p.P2PCommunicator
    if getattr(cls.__init__, "__unbatched_on_gloo__", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, pp_group, config):
        original(self, pp_group, config)
        if getattr(config, "batch_p2p_comm", False) and _is_gloo(pp_group):
            HITS[f"{_site(1)} batch_p2p_comm=False"] += 1
            self.config = copy.copy(config)
            self.config.batch_p2p_comm = False

    __init__.__unbatched_on_gloo__ = True
    cls.__init__ = __init__


def torch_adam_step_in_checkpoints() -> None:
    """Let the distributed optimizer save and load checkpoints with torch's own Adam.

    Upstream (megatron-core 0.16.1, without Transformer Engine or Apex, i.e. torch.optim.Adam):
    ``DistributedOptimizer.state_dict`` (distrib_optimizer.py:642) asserts that every parameter's
    Adam state has one common ``step``, which fails on a fresh optimizer, the one a run resumes
    into; and ``_set_main_param_and_optimizer_states`` (:940) copies every key of the live state,
    including the ``step`` that ``load_state_dict`` (:822) just set, from the checkpoint's
    ``fully_reshardable`` tensors, which do not hold it (``KeyError: 'step'``). Worse, :822 gives
    every parameter the *same* ``step`` tensor, which torch's Adam increments in place once per
    parameter, so bias correction is wrong from the second step after a resume (silent).

    Fix: a fresh optimizer gets zero Adam state at step 0 before ``state_dict`` (what
    ``load_state_dict`` allocates anyway, and the load overwrites); the per-parameter copy keeps the
    live ``step`` when the checkpoint tensors have none (it was already set from the checkpoint's
    param groups at :822); after ``load_state_dict`` every parameter gets its own ``step`` tensor.

    Safe because: it acts only where upstream would raise; TE/Apex optimizers keep ``step`` in the
    param groups and never reach either path.
    """
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = distrib.DistributedOptimizer
    if getattr(cls.state_dict, "__adam_step__", False):
        return
    original_state_dict = cls.state_dict
    original_set = cls._set_main_param_and_optimizer_states
    original_load = cls.load_state_dict

    @functools.wraps(original_state_dict)
    def state_dict(self):
        inner = self.optimizer
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    if "step" not in state:
                        state["step"] = torch.tensor(0.0)
                        state.setdefault("exp_avg", torch.zeros_like(p.data))
                        state.setdefault("exp_avg_sq", torch.zeros_like(p.data))
        return original_state_dict(self)

    @functools.wraps(original_set)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}  # copying it onto itself keeps it
        return original_set(self, model_param, tensors)

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()  # one counter per parameter, as torch expects

    state_dict.__adam_step__ = True
    cls.load_state_dict = load_state_dict
    cls.state_dict = state_dict
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


def torch_norm_sequence_parallel() -> None:
    """Let the local spec's torch norms run under sequence parallelism, as Transformer Engine's do.

    Upstream (megatron-core 0.16.1, ``transformer/torch_norm.py:32``): ``WrappedTorchNorm`` asserts
    ``not config.sequence_parallel``, so the local layer spec (CPU, or a GPU without TE) cannot
    use sequence parallelism at all. Nothing in the norm itself depends on it: under SP each TP rank
    normalises its own slice of the sequence with the full (replicated) weight, and the weight's
    gradient is a partial sum that ``finalize_model_grads`` all-reduces over the TP group for every
    parameter marked ``sequence_parallel`` (``_allreduce_non_tensor_model_parallel_grads``). TE's
    norms set that mark; torch's do not.

    Fix: build the torch norm as upstream does with SP off, then mark its parameters
    ``sequence_parallel = True``, exactly what ``TENorm`` does.

    Safe because: a norm is per token, so slicing the sequence does not change its output; the one
    difference, the gradient reduction, is the one TE relies on. Without SP nothing changes.
    """
    torch_norm = importlib.import_module("megatron.core.transformer.torch_norm")
    cls = torch_norm.WrappedTorchNorm
    if getattr(cls.__new__, "__sequence_parallel__", False):
        return
    original = cls.__new__

    @functools.wraps(original)
    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original(cls, plain, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        HITS[f"{_site(1)} sequence_parallel torch norm"] += 1
        return norm

    __new__.__sequence_parallel__ = True
    cls.__new__ = __new__


PATCHES = {
    f.__name__: f
    for f in (
        cuda_calls_to_cpu,
        rng_tracker_on_cpu,
        tensor_cuda_is_noop,
        cuda_type_strings_on_cpu,
        gloo_contiguous_collectives,
        unbatched_p2p_on_gloo,
        torch_adam_step_in_checkpoints,
        torch_norm_sequence_parallel,
    )
}

# Everything a CPU machine (tests, CI, the CPU demo) needs.
CPU_PATCHES = list(PATCHES)
# Safe on any machine: what a CUDA machine may still want (gloo groups, torch Adam without TE/Apex).
PORTABLE_PATCHES = [
    "gloo_contiguous_collectives",
    "unbatched_p2p_on_gloo",
    "torch_adam_step_in_checkpoints",
    "torch_norm_sequence_parallel",  # only reached by the local spec (no Transformer Engine)
]


def apply(names: list[str] | tuple[str, ...]) -> list[str]:
    """Apply the named patches (each once), in the given order; return the names applied so far."""
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        raise ValueError(f"unknown megatron patch(es) {unknown}; known: {sorted(PATCHES)}")
    from megatron.core.package_info import __version__

    if __version__ not in TESTED_MEGATRON_VERSIONS:
        warnings.warn(
            f"megatron_patches were checked against megatron-core {TESTED_MEGATRON_VERSIONS}, "
            f"this is {__version__}: run tests/megatron_patches before trusting results",
            stacklevel=2,
        )
    for name in names:
        if name not in _APPLIED:
            PATCHES[name]()
            _APPLIED.append(name)
    return applied()


def apply_for_this_machine() -> list[str]:
    """CPU_PATCHES on a CPU build, PORTABLE_PATCHES where CUDA exists."""
    return apply(CPU_PATCHES if not torch.cuda.is_available() else PORTABLE_PATCHES)
