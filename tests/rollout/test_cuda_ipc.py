"""The colocated (CUDA IPC) weight sync, as far as a CPU machine allows.

What runs here: which rank feeds which engine and TP slot, the flattened-bucket payload (read back
by SGLang's own serializer and `FlattenedTensorBucket` in the server environment; on CPU the tensor
travels by value, on a GPU the same object as a CUDA handle), the device-UUID rewrite of a CUDA
handle's arguments, and the
export every rank takes part in (`everywhere=True`: each rank's stream equals rank 0's plain export at
TP2 and PP2). What cannot run here: the CUDA handles themselves and the server mapping them on its
GPU (tests/rollout/test_actor_sync.py runs the whole path against a real CPU server).
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from pipeline.rollout.transports import cuda_ipc
from tests.actor.common import setup_actor
from tests.actor.tiny_hf import make_tiny_hf
from tests.distributed import run_distributed
from tests.rollout.sglang_support import SERVER_PYTHON, needs_sglang


def test_each_rank_feeds_its_engine_slot():
    ranks = [[0, 1], [2, 3]]  # colocated: engine e on the GPUs of ranks [e*tp, (e+1)*tp)
    assert [cuda_ipc.engine_of(r, ranks) for r in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), None]


def test_a_cuda_handle_names_its_gpu_by_uuid():
    args = ("cls", (2, 3), (3, 1), 0, "storage_cls", torch.bfloat16, 1, b"handle", 12, 0, False)
    out = cuda_ipc.with_device_uuid(args, uuid_of=lambda i: f"GPU-uuid-{i}")
    assert out[6] == "GPU-uuid-1" and out[:6] == args[:6] and out[7:] == args[7:]


def test_flattened_bucket_layout():
    bucket = [
        ("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
        ("b", torch.tensor([1, 2], dtype=torch.bfloat16)),
    ]
    packed = cuda_ipc.flatten(bucket)
    flat, meta = packed["flattened_tensor"], packed["metadata"]
    assert flat.dtype == torch.uint8 and flat.numel() == 6 * 4 + 2 * 2
    assert [(m.name, tuple(m.shape), m.dtype, m.start_idx, m.end_idx) for m in meta] == [
        ("a", (2, 3), torch.float32, 0, 24),
        ("b", (2,), torch.bfloat16, 24, 28),
    ]
    for (name, t), m in zip(bucket, meta, strict=True):
        assert torch.equal(flat[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape), t), name
    flat[0] = 99  # a fresh buffer: the live tensors are not views of it
    assert bucket[0][1][0, 0] == 0


@needs_sglang
def test_sglang_reads_the_payload_as_its_own_flattened_bucket():
    bucket = [
        ("model.layers.0.mlp.down_proj.weight", torch.randn(5, 7)),
        ("model.norm.weight", torch.randn(7).to(torch.bfloat16)),
        ("lm_head.weight", torch.randn(3, 7, dtype=torch.float16)),
    ]
    packed = cuda_ipc.flatten(bucket)
    payload = cuda_ipc.serialize(packed)
    code = (
        "import base64, sys, torch\n"
        "from sglang.srt.utils import MultiprocessingSerializer\n"
        "from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata\n"
        "d = MultiprocessingSerializer.deserialize(base64.b64decode(sys.stdin.read()))\n"
        "meta = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,"
        " end_idx=m.end_idx, numel=m.numel) for m in d['metadata']]\n"
        "for name, t in FlattenedTensorBucket(flattened_tensor=d['flattened_tensor'], metadata=meta)"
        ".reconstruct_tensors():\n"
        "    print(name, t.dtype, tuple(t.shape), repr(t.float().sum().item()))\n"
    )
    r = subprocess.run(
        [str(SERVER_PYTHON), "-c", code], input=payload, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = r.stdout.strip().splitlines()
    want = [f"{n} {t.dtype} {tuple(t.shape)} {t.float().sum().item()!r}" for n, t in bucket]
    assert got == want


def _export_everywhere(rank, world_size, hf_dir, layout):
    from megatron.core import parallel_state as ps

    from pipeline.actor.config import ActorConfig
    from pipeline.actor.export import export_hf_weights
    from pipeline.hf_io import read_config

    actor = setup_actor(ActorConfig(**layout), hf_dir)
    hf = read_config(hf_dir)
    mine = [(n, t.clone()) for n, t in export_hf_weights(actor, hf, everywhere=True)]
    plain = [(n, t.clone()) for n, t in export_hf_weights(actor, hf)]
    ps.destroy_model_parallel()
    return mine, plain


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "model_type, layout", [("qwen2", dict(tp=2)), ("qwen2", dict(pp=2)), ("llama", dict(pp=2))]
)
def test_every_rank_exports_what_rank_0_exports(tmp_path, model_type, layout):
    hf_dir = str(make_tiny_hf(tmp_path / model_type, model_type))  # qwen2 tied, llama untied
    results = run_distributed(_export_everywhere, 2, hf_dir, layout)
    reference = results[0][1]  # rank 0's plain export: what the other sync methods send
    assert reference and results[1][1] == []
    for rank in range(2):
        mine = results[rank][0]
        assert [n for n, _ in mine] == [n for n, _ in reference], rank
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(mine, reference, strict=True)), rank
