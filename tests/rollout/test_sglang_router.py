"""Two real SGLang servers behind sglang-router: killing one mid-rollout loses no request and answers
none twice; the dead engine is restarted. About 4 minutes (four server starts) and 5 GB.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pipeline.rollout import SamplingParams
from pipeline.rollout.sglang_engine import SGLangEngine
from tests.rollout.sglang_support import needs_sglang, prompts, save_tiny_model, sglang_config

pytestmark = [pytest.mark.slow, needs_sglang]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path, model = save_tiny_model(tmp_path_factory.mktemp("model"), seed=0)
    engine = SGLangEngine(sglang_config(path, num_engines=2, batch_size=2, max_inflight=4))
    try:
        yield engine
    finally:
        engine.shutdown()


def test_router_spreads_requests_over_both_engines(pair):
    ps = prompts(8)
    samples = pair.generate(ps, SamplingParams(max_new_tokens=8))
    assert [s.prompt_ids for s in samples] == ps and pair.router is not None and pair.health()
    for i in range(2):
        log = pair.servers[i].log_path.read_text()
        assert "POST /generate" in log, f"engine {i} got no request through the router"


@pytest.mark.parametrize("through_router, victim_index", [(True, 1), (False, 0)])
def test_killing_an_engine_mid_rollout_loses_no_request(pair, through_router, victim_index):
    """Through the router (which fails over by itself) and with the client spreading requests over the
    engines directly (its own resubmission path: connection errors, restart, resubmit)."""
    pair.cfg.use_router = through_router
    ps = prompts(48, seed=3)
    params = SamplingParams(max_new_tokens=128, stop_token_ids=[])
    victim = pair.servers[victim_index]
    pid, requests_before = victim.pid, victim.log_path.read_text().count("POST /generate")
    out: dict = {}
    rollout = threading.Thread(target=lambda: out.update(samples=pair.generate(ps, params)))
    rollout.start()
    deadline = time.monotonic() + 60
    while victim.log_path.read_text().count("POST /generate") == requests_before:  # it is serving us
        assert time.monotonic() < deadline and rollout.is_alive(), "the victim never got a request"
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)  # the whole server: tokenizer manager, scheduler, detokenizer
    try:
        rollout.join(timeout=600)
    finally:
        pair.cfg.use_router = True
    assert not rollout.is_alive(), "rollout did not finish"
    samples = out["samples"]
    assert len(samples) == len(ps) and [s.prompt_ids for s in samples] == ps  # each prompt answered once
    assert all(len(s.response_ids) == len(s.logprobs) > 0 for s in samples)
    restarts = 1 if through_router else 2  # over the module
    assert pair.metrics["rollout/engine_restarts"] == restarts and pair.servers[victim_index].pid != pid
    if not through_router:
        assert pair.metrics["rollout/retries"] >= 1  # the client itself saw the failure and resubmitted
    print({k: round(v, 3) for k, v in pair.metrics.items() if k.startswith("rollout/")})
    assert pair.health()  # the restarted engine is back behind the router
    again = pair.generate(prompts(8, seed=4), SamplingParams(max_new_tokens=8))
    assert len(again) == 8
