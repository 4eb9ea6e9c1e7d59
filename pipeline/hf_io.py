"""Hugging Face model directories on disk: the one place that reads and writes their files.

    HFWeights(dir)                 lazy {name: tensor} over *.safetensors (one file or an index of shards)
    read_config(dir)               config.json as a dict (read_json: any JSON object file)
    torch_dtype(name)              "bf16" / "bfloat16" / "fp32" / ... -> torch dtype (DTYPES: the table)
    is_weight_file(name)           which files of a directory are weights (the rest are side files)
    copy_side_files(src, dst)      config, tokenizer and generation files, no weights
    save_hf_shards(...)            stream tensors into safetensors shards with a known layout (exports)
    write_weights_dir(dir, buckets, side_files_from)   one safetensors shard per bucket + index (disk sync)

Errors about the files themselves (missing, truncated, not JSON) are `ConversionError`s whose one-line
message names the file and what is wrong with it. Used by the actor's loader, the converters, the
preflight checks and the rollout's disk weight sync.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"

# ---------------------------------------------------------------------- dtype names

# Canonical name (what actor.dtype accepts) -> torch dtype; ALIASES are the short names tools take.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# torch dtype <-> the dtype string of a safetensors header.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_SAFETENSORS = {s: t for t, s in SAFETENSORS_DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config name: "float32", "bfloat16", "float16" or "fp32", "bf16", "fp16"."""
    return DTYPES[ALIASES.get(name, name)]


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical config name of a torch dtype (inverse of `torch_dtype`)."""
    return next(name for name, t in DTYPES.items() if t == dtype)


# ---------------------------------------------------------------------- reading


class HFWeights(Mapping):
    """Lazy `{name: tensor}` over a HF directory's safetensors, with shapes and dtypes read from the
    headers; each `hf[name]` reads that one tensor (memory-mapped).

    With ``model.safetensors.index.json`` the index says which shard holds each tensor; without it
    every ``*.safetensors`` file is read. Fails early on a missing shard file, a truncated or corrupt
    file, or an index that names tensors a shard does not hold.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        index = path / INDEX_FILE
        files: dict[str, Path] = {}
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no 'weight_map' mapping of tensor names to shard files")
            missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
            if missing:
                raise ConversionError(f"{path}: shard file(s) {missing} listed in {index.name} are missing")
            files = {k: path / f for k, f in weight_map.items()}
        else:
            for f in sorted(path.glob("*.safetensors")):
                try:
                    with safe_open(f, framework="pt") as h:
                        files.update(dict.fromkeys(h.keys(), f))
                except Exception as e:  # truncated or corrupt file
                    raise ConversionError(
                        f"{f}: cannot read this safetensors file ({e}); is it complete?"
                    ) from e
        if not files:
            raise ConversionError(f"{path}: no *.safetensors weights found")
        self._files, self._headers = files, {}
        by_file: dict[Path, list[str]] = {}
        for k, f in files.items():
            by_file.setdefault(f, []).append(k)
        for f, names in by_file.items():
            try:
                with safe_open(f, framework="pt") as h:
                    present = set(h.keys())
                    for n in names:
                        if n in present:
                            s = h.get_slice(n)
                            self._headers[n] = (tuple(s.get_shape()), s.get_dtype())
            except Exception as e:  # truncated or corrupt shard
                raise ConversionError(f"{f}: cannot read this shard ({e}); is it complete?") from e
            absent = sorted(set(names) - present)
            if absent:
                raise ConversionError(
                    f"{f} lacks {len(absent)} tensor(s) the index assigns to it, e.g. {absent[:3]}: partial shard?"
                )

    def shape(self, key: str) -> tuple[int, ...]:
        return self._headers[key][0]

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of `key`, from the header (a dtype the table lacks: from the tensor)."""
        stored = self._headers[key][1]
        return _FROM_SAFETENSORS[stored] if stored in _FROM_SAFETENSORS else self[key].dtype

    def __getitem__(self, key):
        with safe_open(self._files[key], framework="pt") as h:
            return h.get_tensor(key)

    def __iter__(self):
        return iter(self._files)

    def __len__(self):
        return len(self._files)


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or ConversionError naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e}); is the file complete?") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def read_config(hf_dir: str | Path) -> dict:
    """`config.json` of a HF model directory as a dict."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    return read_json(path)


# ---------------------------------------------------------------------- which files are weights

WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|msgpack|h5)$|.*\.safetensors\.index\.json$")


def is_weight_file(name: str) -> bool:
    """Weights (any framework's) or a safetensors index; everything else in a HF dir is a side file."""
    return bool(WEIGHT_FILES.match(name))


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """config.json, tokenizer and generation files: everything in `src` that is not weights."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not is_weight_file(f.name):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


# ---------------------------------------------------------------------- writing


def shard_file(k: int, n: int) -> str:
    """Hugging Face's name of shard `k` (from 0) of `n`."""
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(out_dir) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_hf_shards(named: Iterator, out_dir: Path, *, layout, dtype: torch.dtype, shard_bytes: int) -> dict:
    """Stream `(hf_name, tensor)` into model-0000k-of-0000n.safetensors (+ index) without holding a shard.

    The shapes are known beforehand (`layout`: `[(name, shape)]` in the order `named` yields), so each
    shard's safetensors header is written first and tensors are appended as they arrive: memory is one
    tensor. One shard is written as model.safetensors without an index.
    """
    size = torch.tensor([], dtype=dtype).element_size()
    shards, cur, cur_bytes = [], [], 0
    for name, shape in layout:
        nbytes = torch.Size(shape).numel() * size
        if cur and cur_bytes + nbytes > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape, nbytes))
        cur_bytes += nbytes
    shards.append(cur)
    n = len(shards)
    files = [shard_file(k, n) if n > 1 else "model.safetensors" for k in range(n)]
    it = iter(named)
    weight_map, total = {}, 0
    for fname, shard in zip(files, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nbytes in shard:
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out_dir / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, shape, _ in shard:
                got, tensor = next(it)
                if got != name or tuple(tensor.shape) != shape:
                    raise ConversionError(
                        f"export order/shape mismatch: expected {name} {shape}, got {got} {tuple(tensor.shape)}"
                    )
                f.write(memoryview(tensor.to(dtype).contiguous().view(torch.uint8).numpy()))  # no copy
                weight_map[name] = fname
                total += tensor.numel() * size
    if next(it, None) is not None:
        raise ConversionError("the checkpoint holds more tensors than config.json implies")
    if n > 1:
        write_index(out_dir, weight_map, total)
    return {"shards": n, "tensors": len(weight_map), "bytes": total}


def write_weights_dir(path: Path, buckets: Iterable[list], *, side_files_from: Path) -> tuple[int, int]:
    """A loadable HF directory in `path` (which must exist): the side files of `side_files_from` and one
    safetensors shard per bucket of `(hf_name, tensor)` pairs, always with an index. Returns (bytes,
    tensors) written. The rollout's disk weight sync writes each weight version this way."""
    from safetensors.torch import save_file

    path = Path(path)
    copy_side_files(side_files_from, path)
    buckets = list(buckets)  # the shard names carry their count
    nbytes = ntensors = 0
    weight_map = {}
    for k, bucket in enumerate(buckets):
        shard = shard_file(k, len(buckets))
        save_file({n: t.detach().cpu().contiguous() for n, t in bucket}, str(path / shard), {"format": "pt"})
        for n, t in bucket:
            weight_map[n] = shard
            nbytes += t.numel() * t.element_size()
            ntensors += 1
    write_index(path, weight_map, nbytes)
    return nbytes, ntensors
