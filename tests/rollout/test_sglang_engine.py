"""A real SGLang server on CPU: sampled log-probs equal teacher-forced fp32 ones, and every weight-sync
path (broadcast over gloo, update_weights_from_tensor, disk) leaves the server computing the new model's
log-probs, with the weight version advanced. One server for the whole module (~35 s, 2.3 GB to start).
"""

from __future__ import annotations

import threading

import pytest

from pipeline.rollout import SamplingParams
from pipeline.rollout.sglang_engine import SGLangEngine
from pipeline.rollout.transports.common import bucketed
from pipeline.rollout.verify import WeightSyncError, check_weight_sync
from tests.rollout.sglang_support import (
    needs_sglang,
    prompts,
    save_tiny_model,
    sglang_config,
    state_stream,
    teacher_forced,
)

pytestmark = [pytest.mark.slow, needs_sglang]
TOL = 1e-4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path, model = save_tiny_model(tmp_path_factory.mktemp("model_a"), seed=0)
    engine = SGLangEngine(sglang_config(path, bucket_bytes=16 * 1024))  # small buckets: several rounds
    try:
        yield engine, model
    finally:
        engine.shutdown()


def probe():
    seqs = [p + r for p, r in zip(prompts(4, seed=7), prompts(4, seed=8))]
    return seqs, [len(p) for p in prompts(4, seed=7)]


def max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_teacher_forced_fp32_logprobs(served, temperature):
    engine, model = served
    ps = prompts(16)
    samples = engine.generate(ps, SamplingParams(max_new_tokens=24, temperature=temperature))
    assert [s.prompt_ids for s in samples] == ps
    assert all(len(s.response_ids) == len(s.logprobs) > 0 for s in samples)
    assert all(
        s.finish_reason in ("stop", "length") and s.weight_version == engine.weight_version for s in samples
    )
    ref = teacher_forced(
        model, [s.prompt_ids + s.response_ids for s in samples], [len(p) for p in ps], temperature
    )
    diff = max_diff([s.logprobs for s in samples], ref)
    m = engine.metrics
    print(
        f"T={temperature}: max |sglang - teacher-forced| = {diff:.2e}; {m['rollout/tokens_per_s']:.0f} tok/s"
    )
    assert diff <= TOL


def test_stop_tokens_finish_with_stop_and_length_otherwise(served):
    engine, _ = served
    every = SamplingParams(max_new_tokens=8, stop_token_ids=list(range(84)))
    assert all(
        s.finish_reason == "stop" and len(s.response_ids) == 1 for s in engine.generate(prompts(3), every)
    )
    none = engine.generate(prompts(3), SamplingParams(max_new_tokens=5, stop_token_ids=[]))
    assert all(
        s.finish_reason == "length" and len(s.response_ids) == 5 for s in none if s.finish_reason != "stop"
    )


@pytest.mark.parametrize("method, seed, version", [("distributed", 1, 1), ("tensor", 2, 2), ("disk", 3, 3)])
def test_sync_makes_the_engine_compute_the_new_models_logprobs(served, tmp_path, method, seed, version):
    engine, _ = served
    _, new = save_tiny_model(tmp_path / "new", seed=seed)
    seqs, lens = probe()
    trainer = teacher_forced(new, seqs, lens)
    assert max_diff(engine.logprobs(seqs, lens), trainer) > 1e-2  # the engine still serves other weights
    engine.update_weights(state_stream(new), version=version, method=method)
    m = dict(engine.metrics)
    worst = check_weight_sync(engine, seqs, lens, trainer)
    print(f"{method}: {m['sync/tensors']} tensors, {m['sync/mb']:.3f} MB in {m['sync/time_s']:.3f} s "
          f"({m['sync/mb_per_s']:.1f} MB/s); probe max |diff| = {worst:.2e}")  # fmt: skip
    assert worst <= TOL and engine.weight_version == version
    samples = engine.generate(prompts(2), SamplingParams(max_new_tokens=4))
    assert all(s.weight_version == version for s in samples)  # the server tags samples with the version


def test_verify_stops_the_step_when_the_engine_serves_other_weights(served, tmp_path):
    engine, _ = served
    _, other = save_tiny_model(tmp_path / "other", seed=11)
    seqs, lens = probe()
    with pytest.raises(WeightSyncError, match="trainer.sync_tolerance"):
        check_weight_sync(engine, seqs, lens, teacher_forced(other, seqs, lens))


def test_names_the_server_ignores_are_caught_by_verification(served, tmp_path):
    """SGLang's Qwen2 loader skips names it does not know without an error: verification must catch it."""
    engine, _ = served
    _, new = save_tiny_model(tmp_path / "new", seed=5)
    seqs, lens = probe()
    renamed = ((name.replace("model.", "decoder."), t) for name, t in state_stream(new))
    engine.update_weights(renamed, version=98, method="distributed")
    with pytest.raises(WeightSyncError, match="do not match the served model"):
        check_weight_sync(engine, seqs, lens, teacher_forced(new, seqs, lens))


def test_buckets_respect_the_byte_limit():
    import torch

    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100])]
    sizes = [[n for n, _ in b] for b in bucketed(named, bucket_bytes=4 * 25)]
    assert sizes == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]


def test_pause_holds_new_requests_until_resume(served):
    engine, _ = served
    assert engine.health()
    engine.pause()
    out: dict = {}
    rollout = threading.Thread(
        target=lambda: out.update(s=engine.generate(prompts(2), SamplingParams(max_new_tokens=4)))
    )
    try:
        rollout.start()
        rollout.join(timeout=3.0)
        assert rollout.is_alive(), "a paused server answered"
    finally:
        engine.resume()
    rollout.join(timeout=120)
    assert len(out["s"]) == 2 and engine.health()
