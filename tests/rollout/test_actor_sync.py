"""Weight sync from a live Megatron actor (TP1 and TP2, gloo) to a real SGLang server on CPU: the
export generator streams HF tensors straight into `update_weights_from_distributed`, and afterwards the
server's log-probs of a probe equal the actor's own teacher-forced ones (<= 1e-4, fp32).
"""

from __future__ import annotations

import pytest
import torch

from pipeline.batch import Batch
from pipeline.rollout import Sample, SamplingParams
from pipeline.rollout.sglang_engine import SGLangEngine
from pipeline.rollout.verify import check_weight_sync
from pipeline.tiny import char_tokenizer
from tests.actor.common import setup_actor
from tests.actor.tiny_hf import make_tiny_hf
from tests.distributed import run_distributed
from tests.rollout.sglang_support import needs_sglang, sglang_config

pytestmark = [pytest.mark.slow, pytest.mark.multiproc, needs_sglang]
B, S, R = 4, 12, 6


def tiny_actor_model(path, seed):
    make_tiny_hf(path, "qwen2", seed=seed)  # vocab 250 (padded to 256 in Megatron), tied embeddings
    char_tokenizer().save_pretrained(path)  # SGLang loads a tokenizer; prompts travel as ids
    return str(path)


def probe_batch() -> Batch:
    ids = torch.randint(0, 250, (B, S), generator=torch.Generator().manual_seed(5))
    return Batch.from_samples(
        [Sample(row[: S - R].tolist(), row[S - R :].tolist(), [0.0] * R, "stop", 0) for row in ids]
    )


def _sync_worker(rank, world_size, tp, hf_dir, urls, cfg, version):
    from megatron.core import parallel_state as ps

    from pipeline.actor.config import ActorConfig
    from pipeline.actor.export import export_hf_weights
    from pipeline.hf_io import read_config

    actor = setup_actor(ActorConfig(tp=tp, max_tokens_per_micro_batch=2 * S), hf_dir)
    batch = probe_batch()
    trainer = actor.compute_log_prob(batch, entropy=False)["log_prob"]  # every rank takes part
    trainer = trainer[batch.loss_mask.bool()].view(B, R)  # each sample's response tokens
    stream = export_hf_weights(actor, read_config(hf_dir))  # every rank drives it; rank 0 yields
    result = None
    if rank == 0:
        engine = SGLangEngine.attach(cfg, urls)
        try:
            engine.update_weights(stream, version=version, method="distributed")
            worst = check_weight_sync(engine, batch.tokens.view(B, S).tolist(), [S - R] * B, trainer.tolist())
            samples = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3))
            result = (worst, dict(engine.metrics), [s.weight_version for s in samples])
        finally:
            engine.shutdown()  # leaves the weight-update group; the servers stay up
    else:
        for _ in stream:
            pass
    ps.destroy_model_parallel()
    return result


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tiny_actor_model(tmp_path_factory.mktemp("served"), seed=0)
    engine = SGLangEngine(sglang_config(path))
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.mark.parametrize("tp, seed, version", [(1, 1, 1), (2, 2, 2)])
def test_actor_weights_reach_the_server_over_gloo(server, tmp_path, tp, seed, version):
    hf_dir = tiny_actor_model(tmp_path / "actor", seed=seed)
    results = run_distributed(_sync_worker, 2, tp, hf_dir, server.engine_urls, server.cfg, version)
    worst, metrics, versions = results[0]
    print(f"TP{tp}: {metrics['sync/tensors']} tensors, {metrics['sync/mb']:.2f} MB, "
          f"{metrics['sync/mb_per_s']:.1f} MB/s; probe max |engine - actor| = {worst:.2e}")  # fmt: skip
    assert worst <= 1e-4 and versions == [version]


def _colocated_worker(rank, world_size, layout, hf_dir, urls, cfg, version):
    """The colocated path: every rank builds the buckets, the engine's rank hands them over in SGLang's
    flattened-bucket format (by value on CPU, as a CUDA IPC handle on a GPU)."""
    from megatron.core import parallel_state as ps

    from pipeline.actor.config import ActorConfig
    from pipeline.actor.export import export_hf_buckets
    from pipeline.hf_io import read_config
    from pipeline.rollout.transports.cuda_ipc import ColocatedSync

    actor = setup_actor(ActorConfig(max_tokens_per_micro_batch=2 * S, **layout), hf_dir)
    batch = probe_batch()
    trainer = actor.compute_log_prob(batch, entropy=False)["log_prob"]  # every rank takes part
    trainer = trainer[batch.loss_mask.bool()].view(B, R)  # each sample's response tokens
    sync = ColocatedSync([[0]], urls, rank)  # the CPU server as the engine on rank 0's device
    sync.begin()
    nbytes = sum(
        sync.push(bucket, version)
        for bucket in export_hf_buckets(actor, read_config(hf_dir), bucket_bytes=16 << 10, everywhere=True)
    )
    sync.end()
    result = None
    if rank == 0:
        engine = SGLangEngine.attach(cfg, urls)
        worst = check_weight_sync(engine, batch.tokens.view(B, S).tolist(), [S - R] * B, trainer.tolist())
        samples = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3))
        result = (worst, nbytes, [s.weight_version for s in samples])
    ps.destroy_model_parallel()
    return result


@pytest.mark.parametrize("layout, seed, version", [(dict(tp=2), 3, 3), (dict(pp=2), 4, 4)])
def test_colocated_sync_hands_buckets_over_as_handles(server, tmp_path, layout, seed, version):
    hf_dir = tiny_actor_model(tmp_path / "actor", seed=seed)
    worst, nbytes, versions = run_distributed(
        _colocated_worker, 2, layout, hf_dir, server.engine_urls, server.cfg, version
    )[0]
    print(f"{layout}: {nbytes / 1e6:.2f} MB in 16 KiB buckets; probe max |engine - actor| = {worst:.2e}")
    assert worst <= 1e-4 and versions == [version] and nbytes > 0
