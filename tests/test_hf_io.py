"""pipeline.hf_io: reading and writing Hugging Face directories (no model, no megatron)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline import hf_io
from pipeline.errors import ConversionError

TENSORS = {
    "model.embed_tokens.weight": torch.arange(12, dtype=torch.bfloat16).reshape(4, 3),
    "model.norm.weight": torch.ones(3, dtype=torch.float32),
    "lm_head.weight": torch.full((4, 3), 2.0, dtype=torch.float16),
}


def _check_reads_back(hf: hf_io.HFWeights) -> None:
    assert sorted(hf) == sorted(TENSORS) and len(hf) == len(TENSORS)
    for name, t in TENSORS.items():
        assert hf.shape(name) == tuple(t.shape)
        assert hf.dtype(name) == t.dtype
        assert torch.equal(hf[name], t) and hf[name].dtype == t.dtype


def test_single_file_is_read_lazily_with_header_shapes_and_dtypes(tmp_path):
    save_file(TENSORS, str(tmp_path / "model.safetensors"))
    _check_reads_back(hf_io.HFWeights(tmp_path))


def test_several_files_without_an_index_are_all_read(tmp_path):
    names = sorted(TENSORS)
    save_file({n: TENSORS[n] for n in names[:1]}, str(tmp_path / "a.safetensors"))
    save_file({n: TENSORS[n] for n in names[1:]}, str(tmp_path / "b.safetensors"))
    _check_reads_back(hf_io.HFWeights(tmp_path))


def test_write_weights_dir_gives_an_indexed_sharded_dir_with_the_side_files(tmp_path):
    src, out = tmp_path / "model", tmp_path / "out"
    src.mkdir(), out.mkdir()
    (src / "config.json").write_text('{"model_type": "qwen2"}')
    (src / "tokenizer.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, str(src / "model.safetensors"))  # a weight file: not copied
    names = sorted(TENSORS)
    buckets = [[(n, TENSORS[n]) for n in names[:2]], [(names[2], TENSORS[names[2]])]]
    nbytes, ntensors = hf_io.write_weights_dir(out, buckets, side_files_from=src)
    assert ntensors == 3 and nbytes == sum(t.numel() * t.element_size() for t in TENSORS.values())
    files = sorted(f.name for f in out.iterdir())
    assert files == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == nbytes
    assert index["weight_map"][names[2]] == "model-00002-of-00002.safetensors"
    _check_reads_back(hf_io.HFWeights(out))
    assert hf_io.read_config(out) == {"model_type": "qwen2"}


def test_save_hf_shards_streams_a_known_layout_into_readable_shards(tmp_path):
    layout = [(n, tuple(t.shape)) for n, t in TENSORS.items()]
    stats = hf_io.save_hf_shards(
        iter(TENSORS.items()), tmp_path, layout=layout, dtype=torch.float32, shard_bytes=60
    )
    assert stats == {"shards": 2, "tensors": 3, "bytes": 4 * (12 + 3 + 12)}
    hf = hf_io.HFWeights(tmp_path)
    assert all(hf.dtype(n) == torch.float32 and torch.equal(hf[n], t.float()) for n, t in TENSORS.items())
    with pytest.raises(ConversionError, match="export order/shape mismatch"):
        hf_io.save_hf_shards(
            iter(reversed(TENSORS.items())), tmp_path, layout=layout, dtype=torch.float32, shard_bytes=60
        )


def test_missing_or_unreadable_files_are_named_in_one_line(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        hf_io.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConversionError, match=r"config\.json: not valid JSON"):
        hf_io.read_config(tmp_path)
    with pytest.raises(ConversionError, match=r"no \*\.safetensors weights found"):
        hf_io.HFWeights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(ConversionError, match=r"model\.safetensors: cannot read this safetensors file"):
        hf_io.HFWeights(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": []}')
    with pytest.raises(ConversionError, match="no 'weight_map' mapping"):
        hf_io.HFWeights(tmp_path)


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
    ],
)
def test_dtype_names_round_trip(name, dtype):
    assert hf_io.torch_dtype(name) == dtype
    assert hf_io.torch_dtype(hf_io.dtype_name(dtype)) == dtype
    assert hf_io.dtype_name(dtype) in hf_io.DTYPES  # the canonical name: what actor.dtype accepts
    st = hf_io.SAFETENSORS_DTYPES[dtype]
    assert st == {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[hf_io.dtype_name(dtype)]


@pytest.mark.parametrize(
    "name, weight",
    [
        ("model.safetensors", True),
        ("model-00001-of-00002.safetensors", True),
        ("model.safetensors.index.json", True),
        ("pytorch_model.bin", True),
        ("optimizer.pt", True),
        ("flax_model.msgpack", True),
        ("tf_model.h5", True),
        ("config.json", False),
        ("generation_config.json", False),
        ("tokenizer.json", False),
        ("tokenizer_config.json", False),
        ("merges.txt", False),
        ("pytorch_model.bin.index.json", False),  # copied as a side file, as before
    ],
)
def test_weight_file_selection(name, weight):
    assert hf_io.is_weight_file(name) is weight


def test_copy_side_files_copies_everything_but_weights(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors", "model.safetensors.index.json"):
        (src / name).write_text("{}")
    (src / "sub").mkdir()  # directories are not side files
    assert hf_io.copy_side_files(src, tmp_path / "dst") == ["config.json", "tokenizer.json"]
    assert sorted(f.name for f in (tmp_path / "dst").iterdir()) == ["config.json", "tokenizer.json"]
