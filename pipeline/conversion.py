"""HF safetensors <-> Megatron torch_dist checkpoints, one tensor at a time (the tools' engine).

torch_dist stores every tensor with its global shape, layer tensors stacked on a leading layer axis
(keys carry no layer index), so a checkpoint written here in one process loads at any TP/PP. The
shard layout comes from a *one-layer* model of the same configuration (`Template`): its sharded state
dict gives each key, TP split and `_extra_state` object; the other layers are the same entries at
another layer offset. Saving hands torch.distributed.checkpoint meta tensors and computes each chunk
only when the writer asks for it (`_LazyPlanner.resolve_data`), so peak memory is about one layer
plus the largest tensor. Reading asks torch.distributed.checkpoint for one layer at a time.

Directory written by `hf_to_torch_dist`:  metadata.json, common.pt, .metadata, __0_0.distcp, and
``hf/`` (config.json, tokenizer and generation files) so the export back to HF needs nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.actor.hf_mapping import get_mapping
from pipeline.actor.hf_mapping.common import padded_vocab_size
from pipeline.actor.hf_mapping.family import Dims, WeightsMismatch, check_hf_names
from pipeline.errors import ConversionError
from pipeline.hf_io import HFWeights, copy_side_files, read_config, read_json, torch_dtype

HF_SUBDIR = "hf"
_LAYER0 = "decoder.layers.0."


# ---------------------------------------------------------------------- HF side


def check_hf(hf: HFWeights, hf_config: dict) -> list:
    """The mapping's rules for `hf_config` after checking names and shapes (no data read)."""
    mapping = get_mapping(hf_config.get("model_type"))
    rules = mapping.rules(hf_config)
    check_hf_names(hf.keys(), rules, hf_config["model_type"])
    for r in rules:
        for name, shape in zip(r.hf, r.hf_shapes):
            if shape is not None and hf.shape(name) != tuple(shape):
                raise WeightsMismatch(
                    f"{name}: config.json implies shape {tuple(shape)}, the weights have {hf.shape(name)}"
                )
    return rules


def check_out_dir(out: str | Path, force: bool, inputs: dict[str, Path]) -> Path:
    """Refuse an output directory that is, contains or is inside an input (`{"--hf-dir": path}`), or
    that exists and is not empty without `force` (replacing it would delete what the user gave)."""
    out = Path(out)
    real = out.resolve()
    for flag, path in inputs.items():
        inp = Path(path).resolve()
        if real == inp:
            how = "is"
        elif inp.is_relative_to(real):
            how = "contains"
        elif real.is_relative_to(inp):
            how = "is inside"
        else:
            continue
        raise ConversionError(
            f"--out-dir {out} {how} the input {flag} {path}; writing there could destroy the input, "
            "choose a directory outside it"
        )
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out-dir {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConversionError(f"--out-dir {out} exists and is not empty; pass --force to replace it")
    return out


@contextmanager
def staged_out_dir(out: str | Path, force: bool, inputs: dict[str, Path]) -> Iterator[Path]:
    """Yield a new empty sibling of `out` to write into; it replaces `out` only when the block ends
    without an error, and is removed otherwise, so a failure never leaves a partial output in place.

    `check_out_dir` first. A sibling left by a killed run (`.NAME.partial-PID`, PID gone) is removed."""
    out = check_out_dir(out, force, inputs).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # empty, or replaced with --force: moved aside first, removed once tmp is in place
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# ---------------------------------------------------------------------- Megatron side


def init_single_process() -> None:
    """A one-process gloo group and megatron's parallel state at TP=PP=1, with the CPU patches."""
    import socket

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    import megatron_patches

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    megatron_patches.apply(megatron_patches.CPU_PATCHES)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(0)


class Template:
    """Sharded-state-dict entries of one layer (and the non-layer tensors) for `hf_config`.

    `entries(layer)` gives `(megatron_name, ShardedBase)` for layer `layer` (or, for None, the
    embedding, final norm and output layer), each ShardedTensor's data a placeholder of `make(shape)`.
    Needs `init_single_process()` first.
    """

    def __init__(self, hf_config: dict, *, padded_vocab: int, dtype: torch.dtype):
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
        from megatron.core.dist_checkpointing.utils import extract_sharded_base

        from pipeline.actor.config import ActorConfig
        from pipeline.actor.model import build_model

        self.layers = hf_config["num_hidden_layers"]
        small = dict(hf_config, num_hidden_layers=1, vocab_size=1)  # one layer, a 128-row vocab
        model = build_model(small, ActorConfig(dtype="float32"))[0]
        self._layer, self._other = [], []
        for name, value in model.sharded_state_dict().items():
            parts = value.build() if isinstance(value, ShardedTensorFactory) else value
            for sh in extract_sharded_base(parts)[0] if isinstance(parts, dict | list) else [parts]:
                if hasattr(sh, "global_shape") and sh.key in (
                    "embedding.word_embeddings.weight",
                    "output_layer.weight",
                ):
                    shape = (padded_vocab, *sh.global_shape[1:])
                    sh = dataclasses.replace(
                        sh, data=None, global_shape=shape, local_shape=shape, dtype=dtype
                    )
                elif hasattr(sh, "dtype"):
                    sh = dataclasses.replace(sh, data=None, dtype=dtype)
                (self._layer if name.startswith(_LAYER0) else self._other).append((name, sh))
        del model

    def entries(self, layer: int | None, make) -> list:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        out = []
        if layer is None:
            for name, sh in self._other:
                out.append((name, sh if isinstance(sh, ShardedObject) else _with_data(sh, make)))
            return out
        n = self.layers
        for name, sh in self._layer:
            mname = f"decoder.layers.{layer}." + name[len(_LAYER0) :]
            if isinstance(sh, ShardedObject):
                out.append((mname, dataclasses.replace(sh, global_shape=(n,), global_offset=(layer,))))
                continue
            moved = dataclasses.replace(
                sh,
                data=None,
                global_shape=(n, *sh.global_shape[1:]),
                global_offset=(layer, *sh.global_offset[1:]),
                axis_fragmentations=(n, *sh.axis_fragmentations[1:]),
            )
            out.append((mname, _with_data(moved, make)))
        return out


def _with_data(sh, make):
    sh = dataclasses.replace(sh)
    sh.data = make(sh.local_shape, sh.dtype)
    return sh


def _chunk_of(full: torch.Tensor, sh_offset, prepend: int, offsets, sizes) -> torch.Tensor:
    """The part of the full Megatron tensor that a DCP write item covers."""
    idx = tuple(slice(o, o + s) for o, s in zip(offsets[prepend:], sizes[prepend:]))
    return full[idx].reshape(sizes).contiguous()


def hf_to_torch_dist(
    hf_dir, out_dir, *, tp: int = 1, dtype: str | None = None, progress: bool = True
) -> dict:
    """Write `hf_dir` as a torch_dist checkpoint in `out_dir` (which must be empty or new).

    `tp` only sets the vocab padding (128 x tp, as the actor does); the embedding and output layer
    tolerate another padding at load, so the checkpoint loads at any TP/PP. Returns a summary.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from tqdm import tqdm

    from pipeline.megatron_compat import to_torch_dcp_state, torch_dist_save_planner

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config = read_config(hf_dir)
    hf = HFWeights(hf_dir)
    rules = {r.megatron: r for r in check_hf(hf, hf_config)}
    dims = Dims.of(hf_config)
    padded = padded_vocab_size(dims.vocab, tp)
    target = torch_dtype(dtype) if dtype else hf.dtype(next(iter(hf)))
    init_single_process()
    template = Template(hf_config, padded_vocab=padded, dtype=target)

    def meta(shape, dt):
        return torch.empty(shape, dtype=dt, device="meta")

    state, where = {}, {}
    for layer in [None, *range(dims.layers)]:
        for i, (name, sh) in enumerate(template.entries(layer, meta)):
            state[f"{name}#{i}"] = sh  # fc1's gate and up halves share a name
            if hasattr(sh, "global_offset") and hasattr(sh, "prepend_axis_num"):
                if name not in rules:
                    raise ConversionError(f"megatron parameter {name} has no HF mapping rule")
                where[(sh.key, tuple(sh.global_offset))] = (name, sh.prepend_axis_num)
    pyt_state = to_torch_dcp_state(state)
    bar = tqdm(total=len(where), desc="HF -> torch_dist", unit="tensor", disable=not progress)
    cache: dict = {}

    class _LazyPlanner(torch_dist_save_planner()):
        def resolve_data(self, item):
            key = (item.index.fqn, tuple(item.tensor_data.chunk.offsets)) if item.tensor_data else None
            if key not in where:
                return super().resolve_data(item)  # a ShardedObject's bytes
            name, prepend = where[key]
            if cache.get("name") != name:  # fc1's gate and up chunks share one computed tensor
                rule = rules[name]
                tensors = [hf[n] for n in rule.hf]
                cache.clear()
                cache.update(name=name, full=rule.to_megatron(tensors, dims, padded).to(target))
                bar.update(1)
            c = item.tensor_data.chunk
            return _chunk_of(cache["full"], key[1], prepend, c.offsets, c.sizes)

    out_dir.mkdir(parents=True, exist_ok=True)
    dcp_save(
        pyt_state,
        storage_writer=FileSystemWriter(str(out_dir), thread_count=1, single_file_per_rank=False),
        planner=_LazyPlanner(flatten_state_dict=False),
    )
    bar.close()
    cache.clear()
    common = {
        "content": "model",  # no optimizer, scheduler or RNG state
        "hf_config": hf_config,
        "extra": {"layout": {"tp": tp, "pp": 1, "dp": 1, "vpp": 1}, "step_count": 0, "controllers": {}},
    }
    torch.save(common, out_dir / "common.pt")
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), str(out_dir))
    copy_side_files(hf_dir, out_dir / HF_SUBDIR)
    return {"tensors": len(where), "padded_vocab": padded, "dtype": str(target)}


def check_torch_dist(ckpt_dir) -> None:
    """A torch_dist checkpoint's metadata is readable and every data file holds the bytes it lists
    (a truncated or missing `.distcp` file is named), before anything is read or written."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = Path(ckpt_dir)
    if not (ckpt / "metadata.json").is_file():
        raise ConversionError(f"{ckpt}: not a torch_dist checkpoint (no metadata.json)")
    read_json(ckpt / "metadata.json")
    try:
        md = FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # missing, truncated or corrupt .metadata (a pickle)
        raise ConversionError(f"{ckpt / '.metadata'}: cannot read the checkpoint's index ({e})") from None
    needed: dict[str, int] = {}
    for info in md.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        f = ckpt / name
        have = f.stat().st_size if f.is_file() else None
        if have is None or have < size:
            state = "is missing" if have is None else f"has {have} of its {size} bytes"
            raise ConversionError(f"{f} {state}: the checkpoint is incomplete")


def read_torch_dist(
    ckpt_dir, hf_config: dict, *, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(global megatron name, full tensor)` from a torch_dist checkpoint, reading one layer
    at a time (converted checkpoints and the actor's own; optimizer entries are ignored).

    Names use the checkpoint's canonical (Transformer Engine) spelling of the fused pre-norms, so
    map them with `te=True`. Reads with torch.distributed.checkpoint directly (`_SlicePlanner`):
    dist_checkpointing cannot ask for one layer of L in a one-process group.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from tqdm import tqdm

    reader = FileSystemReader(str(ckpt_dir))
    md = reader.read_metadata().state_dict_metadata
    rank = {
        r.megatron: i for i, r in enumerate(get_mapping(hf_config["model_type"]).rules(hf_config, te=True))
    }
    known = set(rank)
    layers = hf_config["num_hidden_layers"]
    prefix = "decoder.layers."
    stacked = sorted(k for k in md if k.startswith(prefix) and f"{prefix}0.{k[len(prefix) :]}" in known)
    flat = [k for k in md if k in known]
    groups = [[(k, None) for k in flat if k == "embedding.word_embeddings.weight"]]
    groups += [[(k, layer) for k in stacked] for layer in range(layers)]
    groups += [[(k, None) for k in flat if k != "embedding.word_embeddings.weight"]]
    for group in tqdm(groups, desc="torch_dist -> HF", unit="layer", disable=not progress):
        wanted = {}
        for key, layer in group:
            size, dtype = tuple(md[key].size), md[key].properties.dtype
            if layer is None:
                wanted[key] = ((0,) * len(size), torch.empty(size, dtype=dtype))
            else:
                if size[0] != layers:
                    raise ConversionError(f"{key}: stored for {size[0]} layers, config.json says {layers}")
                wanted[key] = ((layer,) + (0,) * (len(size) - 1), torch.empty((1, *size[1:]), dtype=dtype))
        try:
            with warnings.catch_warnings():  # no_dist=True: one process reads, whatever group exists
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp_load({}, storage_reader=reader, planner=_SlicePlanner(wanted), no_dist=True)
        except Exception as e:  # a data file whose bytes are there but do not decode
            files = sorted({i.relative_path for k, i in reader.storage_data.items() if k.fqn in wanted})
            raise ConversionError(
                f"{ckpt_dir}: cannot read {', '.join(files) or 'its data files'} "
                f"({' '.join(str(e).split())[:300]}); is the checkpoint intact?"
            ) from None
        named = [
            (key, wanted[key][1])
            if layer is None
            else (f"{prefix}{layer}.{key[len(prefix) :]}", wanted[key][1][0])
            for key, layer in group
        ]
        yield from sorted(named, key=lambda kv: rank[kv[0]])  # the rule table's order


def _slice_planner_cls():
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(LoadPlanner):
        """Reads chosen regions of stored tensors: {key: (global offsets, destination tensor)}."""

        def __init__(self, wanted):
            self.wanted = wanted

        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            self.metadata = metadata

        def create_local_plan(self):
            items = []
            for key, (offsets, dest) in self.wanted.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
                items += create_read_items_for_chunk_list(
                    key, self.metadata.state_dict_metadata[key], [chunk]
                )
            return LoadPlan(items)

        def create_global_plan(self, global_plan):
            return global_plan

        def finish_plan(self, central_plan):
            return central_plan

        def load_bytes(self, read_item, value):
            pass

        def resolve_tensor(self, read_item):
            dest = self.wanted[read_item.dest_index.fqn][1]
            for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                dest = dest.narrow(dim, o, n)
            return dest

        def commit_tensor(self, read_item, tensor):
            pass

    return SlicePlanner


def _SlicePlanner(wanted):  # noqa: N802 - a class built on first use (keeps torch.distributed imports lazy)
    return _slice_planner_cls()(wanted)


def stored_dtype(ckpt_dir) -> torch.dtype:
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ckpt_dir)).read_metadata()
    for key, m in md.state_dict_metadata.items():
        if key == "embedding.word_embeddings.weight":
            return m.properties.dtype
    return torch.float32


def hf_layout(hf_config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every exported HF tensor's name and shape, in export order, from config.json alone."""
    rules = get_mapping(hf_config["model_type"]).rules(hf_config)
    return [(n, tuple(shape)) for r in rules if r.export for n, shape in zip(r.hf, r.hf_shapes)]


def load_model_checkpoint(chunks, ckpt_dir) -> None:
    """Load only the model part of a torch_dist checkpoint into `chunks` (any TP/PP/VPP layout),
    with the same state-dict keys as `MegatronActor.load_checkpoint` ("model" or "model{i}")."""
    from megatron.core import dist_checkpointing

    from pipeline.actor.weights import unwrap

    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    state = {n: unwrap(c).sharded_state_dict() for n, c in zip(names, chunks)}
    loaded = dist_checkpointing.load(state, str(ckpt_dir))
    for n, c in zip(names, chunks):
        unwrap(c).load_state_dict(loaded[n])


def peak_rss_mb() -> float:
    """This process's peak resident set size (ru_maxrss) in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cli_errors(fn):
    """Run `fn()`; turn bad-input errors into one clear line on stderr and exit status 2, a failing
    disk (OSError) into one line and status 1. SIGTERM unwinds like Ctrl-C, so `staged_out_dir`
    removes its partial output on either."""
    import signal
    import sys

    from pipeline.actor.hf_mapping import UnsupportedArchitecture

    def _terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        return fn()
    except (ConversionError, WeightsMismatch, UnsupportedArchitecture) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        raise SystemExit(130) from None
