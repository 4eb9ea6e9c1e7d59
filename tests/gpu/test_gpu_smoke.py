"""GPU checks, run by tools/gpu_smoke.sh on a machine with one NVIDIA GPU (skipped on CPU machines).

Never run yet: no GPU was available where they were written. Each test names the property it checks;
tools/gpu_smoke.sh runs them one by one and records the output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.actor.tiny_hf import make_tiny_hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_smoke.sh)"),
]
REPO = Path(__file__).resolve().parents[2]
SGLANG_PYTHON = Path(os.environ.get("SGLANG_PYTHON", REPO / ".venv-sglang" / "bin" / "python"))


@pytest.fixture(scope="module")
def world():
    """One rank on cuda:0 with Megatron's parallel state (TP = PP = 1)."""
    import torch.distributed as dist

    from tests.distributed import free_port

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    import megatron_patches

    megatron_patches.apply_for_this_machine()
    yield
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    dist.destroy_process_group()


def _actor(hf_dir, **kwargs):
    from megatron.core import parallel_state as ps

    from pipeline.actor.actor import MegatronActor, initialize_parallel
    from pipeline.actor.config import ActorConfig
    from pipeline.hf_io import read_config

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    cfg = ActorConfig(micro_batch_size=2, **kwargs)
    hf = read_config(hf_dir)
    initialize_parallel(cfg, hf)
    return MegatronActor(cfg, hf, hf_dir=hf_dir)


def _batch(vocab=250, b=4, s=16, r=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    return {
        "input_ids": ids.cuda(),
        "attention_mask": torch.ones(b, s).cuda(),
        "response_mask": torch.ones(b, r).cuda(),
    }


def test_transformer_engine_spec_gives_the_local_specs_log_probs(world, tmp_path):
    from megatron.core.models.gpt import gpt_layer_specs

    if not getattr(gpt_layer_specs, "HAVE_TE", False):
        pytest.skip("Transformer Engine is not installed in this environment")
    hf_dir = str(make_tiny_hf(tmp_path / "m", "qwen2"))
    batch = _batch()
    local = _actor(hf_dir, layer_spec="local").compute_log_prob(batch)
    te = _actor(hf_dir, layer_spec="transformer_engine").compute_log_prob(batch)
    d_lp = (local["log_prob"] - te["log_prob"]).abs().max().item()
    d_h = (local["entropy"] - te["entropy"]).abs().max().item()
    print(f"TE vs local spec, fp32: max |dlogp| = {d_lp:.2e}, max |dH| = {d_h:.2e}")
    assert d_lp < 1e-4 and d_h < 1e-4


def test_actor_offload_frees_the_gpu_and_continues_bit_for_bit(world, tmp_path):
    from pipeline.algorithms.config import LossConfig

    hf_dir = str(make_tiny_hf(tmp_path / "m", "qwen2"))
    batch = _batch()
    batch["advantages"] = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).cuda()
    loss = LossConfig(method="ppo")
    results = []
    for offload in (False, True):
        actor = _actor(hf_dir, lr=1e-3)
        batch["old_log_prob"] = actor.compute_log_prob(batch)["log_prob"]
        first = actor.train_step(batch, loss)
        if offload:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            moved = actor.offload()
            freed = before - torch.cuda.memory_allocated()
            print(f"offload moved {moved} bytes; {freed} bytes of GPU memory freed")
            assert freed >= 0.9 * (moved["weights"] + moved["grads"] + moved["optimizer"])
            actor.onload()
        second = actor.train_step(batch, loss)
        results.append((first["loss"], second["loss"], second["grad_norm"]))
    assert results[0] == results[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not SGLANG_PYTHON.exists():
        pytest.skip(f"no SGLang environment at {SGLANG_PYTHON} (tools/setup_gpu_env.sh)")
    from pipeline.rollout import RolloutConfig
    from pipeline.rollout.sglang_engine import SGLangEngine
    from pipeline.tiny import char_tokenizer

    path = make_tiny_hf(tmp_path_factory.mktemp("served"), "qwen2", seed=5)
    char_tokenizer().save_pretrained(path)
    cfg = RolloutConfig(model_path=str(path), engine="sglang", device="cuda", dtype="float32",
                        python=str(SGLANG_PYTHON), sync_method="tensor", mem_fraction_static=0.3,
                        max_total_tokens=0, log_dir=str(tmp_path_factory.mktemp("logs")))  # fmt: skip
    from pipeline.rollout.server import EngineServer, free_port

    srv = EngineServer(
        cfg, 0, host="127.0.0.1", port=free_port(), log_dir=cfg.log_dir, gpus=[0], memory_saver=True
    )
    engine = SGLangEngine(cfg, servers=[srv])
    try:
        yield engine
    finally:
        engine.shutdown()


def test_sglang_serves_on_the_gpu_and_releases_its_memory(server):
    from pipeline.rollout import SamplingParams

    samples = server.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=8))
    assert len(samples) == 2 and all(len(s.response_ids) >= 1 for s in samples)
    server.release_memory()
    server.resume_memory()
    assert len(server.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))) == 1


def test_cuda_ipc_sync_from_the_actor_on_the_same_gpu(world, server, tmp_path):
    from pipeline.actor.export import export_hf_buckets
    from pipeline.hf_io import read_config
    from pipeline.rollout.transports.cuda_ipc import ColocatedSync
    from pipeline.rollout.verify import check_weight_sync

    hf_dir = str(make_tiny_hf(tmp_path / "actor", "qwen2", seed=6))
    actor = _actor(hf_dir)
    batch = _batch()
    trainer = actor.compute_log_prob(batch, entropy=False)["log_prob"]
    sync = ColocatedSync([[0]], server.engine_urls, 0)
    sync.begin()
    for bucket in export_hf_buckets(actor, read_config(hf_dir), bucket_bytes=1 << 16, everywhere=True):
        sync.push(bucket, 7)
    sync.end()
    worst = check_weight_sync(server, batch["input_ids"].tolist(), [8] * 4, trainer.tolist(), tolerance=1e-3)
    print(f"CUDA IPC sync: probe max |engine - actor| = {worst:.2e}")


def test_three_rl_steps_on_one_gpu(tmp_path):
    if not SGLANG_PYTHON.exists():
        pytest.skip(f"no SGLang environment at {SGLANG_PYTHON}")
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", "configs/gpu_smoke.yaml",
         f"trainer.run_dir={run_dir}", f"rollout.python={SGLANG_PYTHON}"],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3
