"""The HTTP client of SGLang servers: generation with retries, teacher-forced log-probs, control calls.

Generation: prompts go out as `input_ids` (never text: tokenisers differ) in requests of
`batch_size` prompts, at most `max_inflight` at a time, through the router (or round-robin over the
engines without one). A request that fails (connection refused or reset, timeout, 5xx, or an abort
the client did not ask for) is resubmitted; before that, with a `fleet` (`lifecycle.ServerFleet`,
the servers' owner), dead engines are restarted and put back behind the router. Each prompt gets
exactly one sample: results are written once, by prompt index.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import aiohttp

from pipeline.rollout.base import RolloutAborted, RolloutError, Sample, SamplingParams
from pipeline.rollout.server import ServerError, http_json, post_checked

log = logging.getLogger(__name__)


def sampling_payload(params: SamplingParams, eos_token_ids: Iterable[int] = ()) -> dict:
    """Our SamplingParams as SGLang's `sampling_params` (top_k -1 = off in both)."""
    out = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": sorted(set(params.stop_token_ids) | set(eos_token_ids)),
        "skip_special_tokens": False,
        "no_stop_trim": True,  # keep the stop token in output_ids, like LocalEngine
    }
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    return out


def _version(meta: dict, default: int) -> int:
    v = meta.get("weight_version")
    return int(v) if isinstance(v, str | int) and str(v).isdigit() else default


def parse_output(prompt: list[int], out: dict, default_version: int) -> Sample:
    """One `/generate` result -> Sample. `output_token_logprobs` rows are `[logprob, token_id, text]`."""
    meta = out["meta_info"]
    ids = list(out["output_ids"])
    rows = meta.get("output_token_logprobs") or []
    if len(rows) != len(ids) or any(int(r[1]) != t for r, t in zip(rows, ids)):
        raise RolloutError(f"SGLang returned {len(rows)} log-probs for {len(ids)} tokens (or other ids)")
    reason = (meta.get("finish_reason") or {}).get("type", "length")
    return Sample(
        prompt_ids=list(prompt),
        response_ids=ids,
        logprobs=[float(r[0]) for r in rows],
        finish_reason="length" if reason == "length" else "stop",
        weight_version=_version(meta, default_version),
        meta={"engine_finish_reason": reason},
    )


class _RetryableError(Exception):
    pass


class EngineClient:
    """Talks to the servers at `urls` (and the fleet's router); restarts nothing itself."""

    def __init__(self, cfg, urls: list[str], *, eos_token_ids: list[int], fleet=None, metrics: dict):
        self.cfg, self.urls, self.fleet = cfg, list(urls), fleet
        self.eos_token_ids = list(eos_token_ids)
        self.metrics = metrics  # the engine's dict: rollout/* go in here
        self._aborting = False
        self._rr = 0

    @property
    def url(self) -> str:
        """The router's address, or the first engine's without a router."""
        router = self.fleet.router if self.fleet is not None else None
        return router.url if router is not None else self.urls[0]

    # ---- generation -------------------------------------------------------------------------
    async def agenerate(
        self, prompts: list[list[int]], params: SamplingParams, *, version: int, abort_check=None
    ) -> list[Sample]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("SGLangEngine.generate: empty prompt")
        self._aborting = False
        results: list[Sample | None] = [None] * len(prompts)
        chunks = [list(range(lo, min(lo + self.cfg.batch_size, len(prompts)))) for lo in range(0, len(prompts), self.cfg.batch_size)]  # fmt: skip
        # Every request at once unless capped: SGLang's scheduler queues and batches them itself.
        inflight = self.cfg.max_inflight or len(chunks)
        sem = asyncio.Semaphore(inflight)
        stats = {"retries": 0}
        t0 = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s)
        monitor = asyncio.create_task(self._watch_engines(abort_check))
        try:
            connector = aiohttp.TCPConnector(limit=inflight)  # aiohttp's default caps at 100
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                await asyncio.gather(
                    *(
                        self._run_chunk(session, sem, idx, prompts, params, results, stats, version)
                        for idx in chunks
                    )
                )
        finally:
            monitor.cancel()
        dt = time.perf_counter() - t0
        if self.fleet is not None:  # leave every engine up for the next rollout
            if not self.fleet.all_alive():
                self.fleet.kick_recovery()
            await asyncio.get_running_loop().run_in_executor(None, self.fleet.join_recovery)
        tokens = sum(len(s.response_ids) for s in results)
        self.metrics.update(
            {
                "rollout/time_s": dt,
                "rollout/samples": len(prompts),
                "rollout/response_tokens": tokens,
                "rollout/tokens_per_s": tokens / dt if dt > 0 else 0.0,
                "rollout/retries": stats["retries"],
                "rollout/engine_restarts": sum(self.fleet.restarts) if self.fleet is not None else 0,
                "rollout/max_inflight_requests": inflight,
            }
        )
        return results  # type: ignore[return-value]

    async def _run_chunk(self, session, sem, idx, prompts, params, results, stats, version) -> None:
        payload = {
            "input_ids": [prompts[i] for i in idx],
            "sampling_params": sampling_payload(params, self.eos_token_ids),
            "return_logprob": True,
        }
        delay = self.cfg.retry_backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            if self._aborting:
                raise RolloutAborted("rollout aborted")
            async with sem:
                url = self._next_url()
                try:
                    outs = await self._post_generate(session, url, payload)
                    samples = [parse_output(prompts[i], o, version) for i, o in zip(idx, outs)]
                except (_RetryableError, aiohttp.ClientError, TimeoutError, ConnectionError) as e:
                    if attempt == self.cfg.max_retries:
                        raise RolloutError(
                            f"request for prompts {idx[0]}..{idx[-1]} failed {attempt + 1} times: {e!r}"
                        ) from e
                    stats["retries"] += 1
                    log.warning("rollout request to %s failed (%r); recovering and resubmitting", url, e)
                else:
                    for i, s in zip(idx, samples, strict=True):
                        assert results[i] is None, f"prompt {i} answered twice"
                        results[i] = s
                    return
            if self.fleet is not None:
                self.fleet.kick_recovery()  # in the background: the other engines keep serving meanwhile
                if not self.fleet.any_alive():
                    await asyncio.get_running_loop().run_in_executor(None, self.fleet.join_recovery)
            await asyncio.sleep(delay)
            delay *= 2

    async def _watch_engines(self, abort_check: Callable[[], bool] | None, every_s: float = 1.0) -> None:
        """Once a second: abort the rollout if `abort_check()` asks (a preemption); restart a dead
        engine as soon as its process is gone, even while the router hides it."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            if abort_check is not None and not self._aborting and abort_check():
                log.warning("aborting the running rollout (abort requested, e.g. preemption)")
                await loop.run_in_executor(None, self.abort)
                continue
            if self.fleet is not None:
                alive = await loop.run_in_executor(None, self.fleet.all_alive)
                if not alive:
                    self.fleet.kick_recovery()

    async def _post_generate(self, session: aiohttp.ClientSession, url: str, payload: dict) -> list[dict]:
        async with session.post(f"{url}/generate", json=payload) as resp:
            text = await resp.text()
            if resp.status >= 500 or resp.status in (408, 429):
                raise _RetryableError(f"HTTP {resp.status}: {text[:300]}")
            if resp.status != 200:
                raise RolloutError(f"/generate answered HTTP {resp.status}: {text[:500]}")
        outs = json.loads(text)
        outs = outs if isinstance(outs, list) else [outs]
        if len(outs) != len(payload["input_ids"]):
            raise _RetryableError(f"{len(outs)} outputs for {len(payload['input_ids'])} prompts")
        for o in outs:
            if (o.get("meta_info", {}).get("finish_reason") or {}).get("type") == "abort":
                raise _RetryableError(f"request aborted by the server: {o['meta_info']['finish_reason']}")
        return outs

    def _next_url(self) -> str:
        if (self.fleet is not None and self.fleet.router is not None and self.cfg.use_router) or len(
            self.urls
        ) == 1:
            return self.url
        alive = self.fleet.alive_urls() if self.fleet is not None else []
        alive = alive or self.urls
        self._rr += 1
        return alive[self._rr % len(alive)]

    def abort(self) -> None:
        """Abort every running request; `generate` then fails with RolloutAborted instead of retrying."""
        self._aborting = True
        self.control("abort_request", {"abort_all": True})

    # ---- teacher-forced log-probs (sync verification) ------------------------------------------
    def logprobs(
        self, sequences: list[list[int]], prompt_lens: list[int], temperature: float = 1.0, *, engine: int = 0
    ) -> list[list[float]]:
        """Log-probs of each sequence's tokens after its prompt, as server `engine` computes them (prefill)."""
        if temperature != 1.0:
            raise ValueError("SGLangEngine.logprobs: prefill log-probs are at temperature 1")
        payload = {
            "input_ids": sequences,
            "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
            "return_logprob": True,
            "logprob_start_len": [max(n - 1, 0) for n in prompt_lens],
        }
        outs = post_checked(self.urls[engine], "generate", payload, timeout=self.cfg.request_timeout_s)
        result = []
        for seq, n, o in zip(sequences, prompt_lens, outs, strict=True):
            rows = o["meta_info"]["input_token_logprobs"]
            rows = [r for r in rows if r[0] is not None]  # the first prompt token has none
            lp = [float(r[0]) for r in rows][-(len(seq) - n) :]
            if len(lp) != len(seq) - n:
                raise ServerError(f"expected {len(seq) - n} input log-probs, got {len(rows)}")
            result.append(lp)
        return result

    # ---- control ------------------------------------------------------------------------------
    def control(self, endpoint: str, payload: dict, *, urls: list[str] | None = None, timeout: float = 600.0):
        """POST to every engine at once; raise ServerError naming the engine that refused."""
        urls = urls or self.urls
        with ThreadPoolExecutor(len(urls)) as pool:
            return list(pool.map(lambda url: post_checked(url, endpoint, payload, timeout=timeout), urls))

    def pause(self) -> None:
        """Stop scheduling; running requests are retracted and continue after resume()."""
        self.control("pause_generation", {"mode": "retract"})

    def resume(self) -> None:
        self.control("continue_generation", {})

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Give device memory back: `tags` of "weights", "kv_cache", "cuda_graph" (None: all).

        On GPU this needs the servers started with `--enable-memory-saver` (colocated engines are);
        released weights are gone, not kept: the next sync fills them again.
        """
        self.control("release_memory_occupation", {"tags": list(tags)} if tags else {})

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Take back what `release_memory(tags)` gave (None: all)."""
        self.control("resume_memory_occupation", {"tags": list(tags)} if tags else {})

    def health(self) -> bool:
        """Every server answers a one-token generation."""
        return all(http_json(f"{u}/health_generate", timeout=30)[0] == 200 for u in self.urls)
